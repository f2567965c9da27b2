"""The errors that mean "your input is wrong" (config, data, checkpoint, tokenizer, divergence), for the CLI."""

from rlhfx.config import ConfigError
from rlhfx.data.builders import DataError
from rlhfx.data.tokenize import Overlong, TokenizerError
from rlhfx.loop import TrainingDiverged
from rlhfx.models.convert import CheckpointError

USER_ERRORS = (ConfigError, DataError, Overlong, TokenizerError, TrainingDiverged, CheckpointError)
