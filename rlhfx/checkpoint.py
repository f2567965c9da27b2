"""Checkpoints: one Orbax CheckpointManager holding named parameter trees, metadata and the data iterator.

  ckpt = Checkpointer(workdir / "checkpoints", keep=3)
  ckpt.save(step, {"policy": params, "opt_state": opt_state}, metadata={...}, data_iterator=it)
  trees, metadata = ckpt.restore(step, {"policy": abstract_params, ...}, data_iterator=it)

Trees are saved with `StandardSave` and restored onto whatever shardings the
abstract tree carries (ShapeDtypeStructs with `.sharding`), so a checkpoint
written on one mesh restores on another. Saves are asynchronous; the manager
keeps the last `keep` complete checkpoints and deletes an old one only after a
newer one is complete.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

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
    items[_META] = ocp.args.JsonSave(metadata or {})
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


def abstract(tree, shardings) -> Any:
  """ShapeDtypeStructs carrying target shardings, for `Checkpointer.restore`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
