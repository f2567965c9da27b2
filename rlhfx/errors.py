"""The errors that mean "your input is wrong" (config, data, checkpoint, tokenizer, divergence), for the CLI.

A config problem exits with status 2, any other input error with status 1; both print one line.
"""

import sys

from absl import app, flags

from rlhfx.config import ConfigError
from rlhfx.data.builders import DataError
from rlhfx.data.tokenize import Overlong, TokenizerError
from rlhfx.metrics import TrainingDiverged
from rlhfx.models.convert import CheckpointError
from rlhfx.workdir import WorkdirError

USER_ERRORS = (ConfigError, DataError, Overlong, TokenizerError, TrainingDiverged, CheckpointError,
               WorkdirError)
CONFIG_EXIT = 2  # like a usage error


def report(program: str, error: Exception) -> None:
  """Print `program: Kind: message` on stderr and exit: status 2 for a config problem, else 1."""
  print(f"{program}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
  sys.exit(CONFIG_EXIT if isinstance(error, ConfigError) else 1)


def run_cli(main_fn, program: str) -> None:
  """absl's app.run, with an override of a field the locked config lacks, or of the wrong kind, as one line."""
  try:
    try:  # parsed here, once: a bad override is a config problem (status 2), not absl's status 1
      argv = flags.FLAGS(sys.argv)
    except flags.Error as e:
      report(program, ConfigError(str(e).splitlines()[0]))
    app.run(main_fn, flags_parser=lambda _: argv)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a field the locked config lacks
    key = str(e).strip("\"'")
    culprits = [a for a in sys.argv[1:] if a.startswith("--config.") and key in a.split("=")[0].split(".")]
    if not culprits:
      raise
    field = culprits[0].split("=")[0].removeprefix("--")
    report(program, ConfigError(f"unknown config field {field} (no {key!r} there); see the config file for the "
                                f"fields"))
