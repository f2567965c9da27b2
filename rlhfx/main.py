"""rlhfx entry point: python -m rlhfx.main --config=configs/<file>.py[:variant] --workdir=DIR [--config.a.b=v].

  python -m rlhfx.main --config=configs/quickstart.py --workdir=/tmp/quickstart   # train
  python -m rlhfx.main --config=configs/dpo_hh.py:tiny --show_config              # every field, value, comment

The config is checked field by field first (`rlhfx.validation`, in `rlhfx.setup.run`); a problem is one line on
stderr and exit status 2, before any data is built or model loaded. Exit status 0 means the run
reached `train.num_steps`; 75 that SIGTERM stopped it after a checkpoint (rerun to resume); 1 any
other error.
"""

import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rlhfx import algorithms, checkpoint, config as config_lib, errors
from rlhfx.errors import run_cli, usage

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py[:variant])",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and exports")
_SHOW = flags.DEFINE_bool("show_config", False, "print every field of the config with its value and comment, and exit")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax and Grain are chatty at INFO; --verbosity=0 shows it
    logging.set_verbosity(logging.WARNING)
  if _SHOW.value:
    print(config_lib.describe(_CONFIG.value, flags.FLAGS["config"].config_filename))
    return
  if not _WORKDIR.value:
    errors.report("rlhfx", config_lib.ConfigError("--workdir is required: the directory for checkpoints, metrics "
                                                  "and exports (python -m rlhfx.main --help)"))
  checkpoint.raise_on_sigterm()
  try:
    algorithms.train(_CONFIG.value, _WORKDIR.value)  # every config field is checked before anything is built
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # done: a SIGTERM while the interpreter shuts down changes nothing
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
  run_cli(main, "rlhfx", usage("rlhfx", __doc__, ("config", "workdir", "show_config")))


if __name__ == "__main__":
  run()
