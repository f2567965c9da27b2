"""`python -m rlhfx.main` that sends itself SIGTERM after step N, as a preemption would (tests only).

  python tests/preempted_run.py N --config=... --workdir=... [--config.a.b=v]
  python tests/preempted_run.py N --together --config=... --root=... [--runs=...]    # python -m rlhfx.together

The real signal handler (rlhfx.checkpoint.Preemption) receives it: the run saves a
checkpoint and stops, and a rerun of the same command resumes.
"""

import os
import signal
import sys

import importlib

from rlhfx import checkpoint

AT_STEP = int(sys.argv.pop(1))
TOGETHER = sys.argv[1:2] == ["--together"] and sys.argv.pop(1)
_reached = checkpoint.Preemption.reached


def _reached_with_sigterm(self, step: int) -> bool:
  if step == AT_STEP:
    os.kill(os.getpid(), signal.SIGTERM)
  return _reached(self, step)


checkpoint.Preemption.reached = _reached_with_sigterm

if __name__ == "__main__":  # each command defines its own flags: import only the one that runs
  importlib.import_module("rlhfx.together" if TOGETHER else "rlhfx.main").run()
