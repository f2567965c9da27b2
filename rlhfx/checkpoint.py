"""Checkpoints: one Orbax CheckpointManager holding named parameter trees, metadata and the data iterator.

  ckpt = Checkpointer(workdir / "checkpoints", keep=3)
  ckpt.save(step, {"policy": params, "opt_state": opt_state}, metadata={...}, data_iterator=it)
  trees, metadata = ckpt.restore(step, {"policy": abstract_params, ...}, data_iterator=it)

Trees are saved with `StandardSave` and restored onto whatever shardings the
abstract tree carries (ShapeDtypeStructs with `.sharding`), so a checkpoint
written on one mesh restores on another. Saves are asynchronous; the manager
keeps the last `keep` complete checkpoints and deletes an old one only after a
newer one is complete.

A train loop calls, in order: `resume` (the manager, and the state and data iterator
restored from the latest complete checkpoint), then per step `due` and `save`, inside
`with Preemption() as preemption:` (SIGTERM asks for a save and a clean stop).
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from rlhfx import sharding

_META = "metadata"
_DATA = "data_iterator"


class Checkpointer:
  """Named trees + JSON metadata + Grain iterator state, per step."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The latest complete checkpoint (incomplete, interrupted saves are ignored)."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, trees: dict[str, Any], *, metadata: dict | None = None, data_iterator=None,
           wait: bool = False) -> None:
    items = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
    items[_META] = ocp.args.JsonSave(metadata if metadata is not None else {"step": step})
    if data_iterator is not None:
      items[_DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    if wait:
      self._manager.wait_until_finished()
    logging.info("checkpoint: saving step %d to %s", step, self.directory)

  def restore(self, step: int, abstract_trees: dict[str, Any], *, data_iterator=None) -> tuple[dict, dict]:
    """Restore the named trees onto the shardings of `abstract_trees` (and the iterator's position)."""
    items = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_trees.items()}
    items[_META] = ocp.args.JsonRestore()
    if data_iterator is not None:
      items[_DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    trees = {name: restored[name] for name in abstract_trees}
    return trees, dict(restored[_META] or {})

  def metadata(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
    return dict(restored[_META] or {})

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()  # also after an error: a save in flight completes


def abstract(tree, shardings) -> Any:
  """ShapeDtypeStructs carrying target shardings, for `Checkpointer.restore`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def resume(config, workdir: Path, state, train_iter, frozen: dict | None = None) -> tuple[Checkpointer, Any, int]:
  """(the run's Checkpointer, state, first step): the state (and iterator) restored from the latest complete
  checkpoint onto the current state's shardings, if there is one.

  Where every array of the state and of the `frozen` trees lives is written to <workdir>/placement.json
  (key path -> shape, dtype, PartitionSpec, bytes on one device), after the restore.
  """
  checkpointer = Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints,
                              async_save=config.train.async_checkpoints)
  start = checkpointer.latest_step() or 0
  if start:
    target = abstract(state, jax.tree.map(lambda x: x.sharding, state))
    trees, _ = checkpointer.restore(start, {"state": target}, data_iterator=train_iter)
    state = trees["state"]
    if jax.process_index() == 0:
      print(f"resumed from step {start} ({checkpointer.directory})", flush=True)
  if jax.process_index() == 0:
    trees = {"state": state, **{k: v for k, v in (frozen or {}).items() if v is not None}}
    placement = {"step": start, "mesh": dict(state.step.sharding.mesh.shape),
                 **{name: sharding.describe(tree) for name, tree in trees.items()}}
    (workdir / "placement.json").write_text(json.dumps(placement, indent=1))
  return checkpointer, state, start


def due(step: int, train_config, preempted: bool) -> bool:
  """Save after this step: every `checkpoint_every` steps, at the last step, and when preempted."""
  return step % train_config.checkpoint_every == 0 or step == train_config.num_steps or preempted


class Preempted(Exception):
  """A run stopped by SIGTERM after saving a checkpoint: rerun the same command to resume it.

  `python -m rlhfx.main` exits with `RESUME_EXIT` for it, which the launchers read as "resume me"."""

  RESUME_EXIT = 75  # EX_TEMPFAIL: try again

  def __init__(self, step: int, directory: Path):
    super().__init__(f"stopped at step {step} (SIGTERM), checkpoint saved in {directory}; rerun the same command "
                     f"to resume")
    self.step = step


class Preemption:
  """SIGTERM (or the multi-host preemption notice) sets a flag; the loop saves and stops at the next step.

    with Preemption() as preemption:
      for step in ...:
        stop = preemption.reached(step)
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> "Preemption":
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint and stopping")
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      try:
        from jax.experimental import multihost_utils

        self.requested |= multihost_utils.reached_preemption_sync_point(step)
      except Exception:  # noqa: BLE001 (no preemption service): the local flag alone
        pass
    return self.requested
