"""`python -m rlhfx.main` that sends itself SIGTERM after step N, as a preemption would (tests only).

  python tests/preempted_run.py N --config=... --workdir=... [--config.a.b=v]

The real signal handler (rlhfx.checkpoint.Preemption) receives it: the run saves a
checkpoint and stops, and a rerun of the same command resumes.
"""

import os
import signal
import sys

from rlhfx import checkpoint, main

AT_STEP = int(sys.argv.pop(1))
_reached = checkpoint.Preemption.reached


def _reached_with_sigterm(self, step: int) -> bool:
  if step == AT_STEP:
    os.kill(os.getpid(), signal.SIGTERM)
  return _reached(self, step)


checkpoint.Preemption.reached = _reached_with_sigterm

if __name__ == "__main__":
  main.run()
