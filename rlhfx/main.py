"""rlhfx entry point: python -m rlhfx.main --config=configs/<file>.py[:variant] --workdir=DIR [--config.a.b=v]."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py[:variant])",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and exports")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax and Grain are chatty at INFO; --verbosity=0 shows it
    logging.set_verbosity(logging.WARNING)
  from rlhfx import algorithms, errors

  try:
    algorithms.train(_CONFIG.value, _WORKDIR.value)
  except errors.USER_ERRORS as e:  # bad config, data or checkpoint: one message, no traceback
    sys.exit(f"rlhfx: {type(e).__name__}: {e}")


def run():
  try:
    app.run(main)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a field the locked config lacks
    key = str(e).strip("\"'")
    culprits = [a for a in sys.argv[1:] if a.startswith("--config.") and key in a.split("=")[0].split(".")]
    if not culprits:
      raise
    field = culprits[0].split("=")[0].removeprefix("--")
    sys.exit(f"rlhfx: unknown config field {field} (no {key!r} there); see the config file for the fields")


if __name__ == "__main__":
  run()
