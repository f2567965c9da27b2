"""SIGTERM, whenever it comes: inside a step loop the step ends, is saved and the loop stops (`Preemption`);
anywhere else, and inside user code, the run stops at once (`raise_on_sigterm`, `interruptible`). Either way the
process ends with `Preempted`, which `rlhfx.main` turns into exit status 75, "rerun the same command to resume".
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path

import jax


class Preempted(Exception):
  """A run stopped by SIGTERM after saving a checkpoint: rerun the same command to resume it.

  `python -m rlhfx.main` exits with `RESUME_EXIT` for it, which the launchers read as "resume me"."""

  RESUME_EXIT = 75  # EX_TEMPFAIL: try again

  def __init__(self, step: int | None, directory: Path | None):
    if step is None:  # outside the step loop (set-up, compilation, an evaluation, export): nothing of it is kept
      super().__init__("stopped by SIGTERM (in set-up, compilation, an evaluation, user code or export: what was in "
                       "progress is not kept); the checkpoints saved before are kept: rerun the same command to resume")
    else:
      super().__init__(f"stopped at step {step} (SIGTERM), checkpoint saved in {directory}; rerun the same command "
                       f"to resume")
    self.step = step


_INTERRUPTIBLE = [0]  # > 0 while user code runs (a reward function): SIGTERM stops it at once


@contextlib.contextmanager
def interruptible():
  """While user code runs (which may never return), SIGTERM in a step loop raises `Preempted` at once instead of
  waiting for the step to end: the run stops with the checkpoints saved before, and a rerun redoes the steps."""
  _INTERRUPTIBLE[0] += 1
  try:
    yield
  finally:
    _INTERRUPTIBLE[0] -= 1


def raise_on_sigterm() -> None:
  """From now on SIGTERM outside a step loop raises `Preempted` where the process is (set-up, compilation, the
  first evaluation, the reference pass, export): `rlhfx.main` exits 75, "rerun to resume". Inside a step loop
  `Preemption` takes over: the step ends, is saved, and the loop stops."""
  signal.signal(signal.SIGTERM, _raise_preempted)


def _raise_preempted(signum, frame):
  while frame is not None:  # in a finaliser an exception is ignored: deliver the signal again just after it
    if frame.f_code.co_name == "__del__":
      threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()
      return
    frame = frame.f_back
  logging.warning("SIGTERM received outside the step loop: stopping")
  raise Preempted(None, None)


class Preemption:
  """SIGTERM (or the multi-host preemption notice) sets a flag; the loop saves and stops at the next step, and
  leaving the block raises `Preempted` (after the blocks opened inside it, the checkpointer's, have closed).

    with Preemption(checkpointer.directory) as preemption, checkpointer:
      for step in ...:
        if save_or_stop(step, ..., preemption):
          break
  """

  def __init__(self, directory: Path):
    self.directory = directory
    self.requested = False
    self.step = 0
    self._previous = None

  def __enter__(self) -> "Preemption":
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, kind, *exc) -> None:
    signal.signal(signal.SIGTERM, self._previous)
    if self.requested and kind is None:
      raise Preempted(self.step, self.directory)

  def _handle(self, signum, frame):
    self.requested = True
    if _INTERRUPTIBLE[0]:
      logging.warning("SIGTERM received in user code: stopping at once")
      raise Preempted(None, None)
    logging.warning("SIGTERM received: saving a checkpoint and stopping")

  def reached(self, step: int) -> bool:
    self.step = step
    if jax.process_count() > 1:
      try:
        from jax.experimental import multihost_utils

        self.requested |= multihost_utils.reached_preemption_sync_point(step)
      except Exception:  # noqa: BLE001 (no preemption service): the local flag alone
        pass
    return self.requested
