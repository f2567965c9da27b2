"""rlhfx entry point: python -m rlhfx.main --config=configs/<file>.py[:variant] --workdir=DIR [--config.a.b=v].

The config is checked field by field first (`rlhfx.validation`, in `rlhfx.setup.run`); a problem is one line on
stderr and exit status 2, before any data is built or model loaded. Exit status 0 means the run
reached `train.num_steps`; 75 that SIGTERM stopped it after a checkpoint (rerun to resume); 1 any
other error.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rlhfx import algorithms, checkpoint, errors
from rlhfx.errors import run_cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py[:variant])",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and exports")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax and Grain are chatty at INFO; --verbosity=0 shows it
    logging.set_verbosity(logging.WARNING)
  try:
    algorithms.train(_CONFIG.value, _WORKDIR.value)  # every config field is checked before anything is built
  except errors.USER_ERRORS as e:  # bad config, data or checkpoint: one message, no traceback
    errors.report("rlhfx", e)
  except OSError as e:  # a full, read-only or forbidden disk: one line (the checkpoints saved before are intact)
    if e.errno not in checkpoint.DISK_ERRNOS:
      raise
    errors.report("rlhfx", e)
  except checkpoint.Preempted as e:  # saved and stopped: exit status 75, "resume me" to the launchers
    print(f"rlhfx: {e}", flush=True)
    sys.exit(checkpoint.Preempted.RESUME_EXIT)


def run():
  run_cli(main, "rlhfx")


if __name__ == "__main__":
  run()
