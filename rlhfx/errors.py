"""The errors that mean "your input is wrong" (config, data, checkpoint, tokenizer, divergence), for the CLI."""

import sys

from absl import app

from rlhfx.config import ConfigError
from rlhfx.data.builders import DataError
from rlhfx.data.tokenize import Overlong, TokenizerError
from rlhfx.loop import TrainingDiverged
from rlhfx.models.convert import CheckpointError

USER_ERRORS = (ConfigError, DataError, Overlong, TokenizerError, TrainingDiverged, CheckpointError)


def run_cli(main_fn, program: str) -> None:
  """absl's app.run, with an override of a field the locked config lacks as one line, not a traceback."""
  try:
    app.run(main_fn)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a field the locked config lacks
    key = str(e).strip("\"'")
    culprits = [a for a in sys.argv[1:] if a.startswith("--config.") and key in a.split("=")[0].split(".")]
    if not culprits:
      raise
    field = culprits[0].split("=")[0].removeprefix("--")
    sys.exit(f"{program}: unknown config field {field} (no {key!r} there); see the config file for the fields")
