"""Checkpoints: one Orbax CheckpointManager holding named parameter trees, metadata and the data iterator.

  ckpt = Checkpointer(workdir / "checkpoints", keep=3)
  ckpt.save(step, {"policy": params, "opt_state": opt_state}, metadata={...}, data_iterator=it)
  trees, metadata = ckpt.restore(step, {"policy": abstract_params, ...}, data_iterator=it)

Trees are saved with `StandardSave` and restored onto whatever shardings the
abstract tree carries (ShapeDtypeStructs with `.sharding`), so a checkpoint
written on one mesh restores on another. Saves are asynchronous; the manager
keeps the last `keep` complete checkpoints and deletes an old one only after a
newer one is complete.

Every array's shape, dtype and fingerprint (`fingerprints`: a position-weighted
sum of its bits, mod 2^32, computed on the device) go into the metadata at save
time and are checked at restore: a checkpoint whose files are damaged raises
`Damaged`, and `resume` moves it to <workdir>/rejected_checkpoints and takes the
newest one that passes. A checkpoint of another state (shapes that differ) is a
`CheckpointError`, and is left where it is.

A train loop calls, in order: `resume` (the manager, and the state and data iterator
restored from the latest complete checkpoint), then after each step `save_or_stop` (a save when due; SIGTERM
asks for a save and a clean stop), inside `with Preemption(directory) as preemption:`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from rlhfx import sharding, storage, workdir as workdirs
from rlhfx.models.hf_config import CheckpointError
from rlhfx.preemption import Preempted, Preemption, interruptible, raise_on_sigterm  # noqa: F401 (re-exported)

_META = "metadata"
_DATA = "data_iterator"


class Damaged(CheckpointError):
  """A checkpoint whose files cannot be read or whose arrays differ from the fingerprints saved with them."""


def _fingerprint(x: jax.Array) -> jax.Array:
  """sum_i bits(x_i) * (2654435761 i + 1) mod 2^32 over the elements (any change of one element changes it)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_ or x.dtype.itemsize == 1:
    bits = x.astype(jnp.uint32)
  elif x.dtype.itemsize == 2:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  else:  # 4 bytes, or 8 (as two 4-byte words in a last axis)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  index = jnp.zeros(bits.shape, jnp.uint32)
  for axis in range(bits.ndim):  # the flat index, without reshaping a sharded array
    stride = math.prod(bits.shape[axis + 1:])
    index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
  return jnp.sum(bits * (index * jnp.uint32(2654435761) + jnp.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _all_fingerprints(leaves: dict[str, jax.Array]) -> dict[str, jax.Array]:
  return {k: _fingerprint(x) for k, x in leaves.items()}  # one program per tree structure, compiled once


def _keyed(trees: dict[str, Any]) -> dict[str, Any]:
  """{"<tree>/<key path>": leaf} of every array (or ShapeDtypeStruct) leaf of the named trees."""
  return {f"{name}/{jax.tree_util.keystr(path, simple=True, separator='/')}": x for name, tree in trees.items()
          for path, x in jax.tree_util.tree_leaves_with_path(tree) if hasattr(x, "shape")}


def fingerprints(trees: dict[str, Any]) -> dict[str, list]:
  """{"<tree>/<key path>": [shape, dtype, fingerprint]} of every array leaf (one device program, one read)."""
  leaves = _keyed(trees)
  sums = jax.device_get(_all_fingerprints(leaves))
  return {k: [list(x.shape), str(x.dtype), int(sums[k])] for k, x in leaves.items()}


class Checkpointer:
  """Named trees + JSON metadata (with the arrays' fingerprints) + Grain iterator state, per step."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
               identity: dict | None = None):
    self.directory = storage.path(directory)  # Orbax writes gs:// straight (TensorStore's GCS driver)
    self.identity = dict(identity or {})  # saved with every checkpoint and checked on restore (the algorithm)
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
    meta = {"step": step, **self.identity, **(metadata or {}), "fingerprints": fingerprints(trees)}
    items[_META] = ocp.args.JsonSave(meta)
    if data_iterator is not None:
      items[_DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    with self._disk_errors(step):
      self._manager.wait_until_finished()  # the previous save's space is taken (Orbax's save would wait too)
      self._check_space(step, sum(x.nbytes for x in jax.tree.leaves(trees) if hasattr(x, "nbytes")))
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
      if wait:
        self._manager.wait_until_finished()
    logging.info("checkpoint: saving step %d to %s", step, self.directory)

  def restore(self, step: int, abstract_trees: dict[str, Any], *, data_iterator=None) -> tuple[dict, dict]:
    """Restore the named trees onto the shardings of `abstract_trees` (and the iterator's position), checked
    against the fingerprints saved with them: `Damaged` if a file is unreadable or an array differs,
    CheckpointError if the checkpoint holds arrays of other shapes."""
    meta = self.metadata(step)
    if meta.get("step", step) != step:
      raise Damaged(f"step {step}: the folder's name says step {step}, its metadata step {meta.get('step')}")
    for key, value in self.identity.items():
      if key in meta and meta[key] != value:
        raise CheckpointError(f"checkpoint step {step} in {self.directory} is a {key} {meta[key]!r} run's, this "
                              f"run's {key} is {value!r}; use a new --workdir")
    saved = meta.get("fingerprints")
    if saved is not None:
      expected = {k: v[:2] for k, v in saved.items() if k.split("/")[0] in abstract_trees}
      wanted = {k: [list(x.shape), str(x.dtype)] for k, x in _keyed(abstract_trees).items()}
      for key in sorted(set(expected) | set(wanted)):
        if expected.get(key) != wanted.get(key):
          raise CheckpointError(f"checkpoint step {step} in {self.directory} holds another state than this run's: "
                                f"{key} is {expected.get(key, 'absent')} there, {wanted.get(key, 'absent')} here "
                                f"(another model or config?); use a new --workdir")
    items = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_trees.items()}
    items[_META] = ocp.args.JsonRestore()
    if data_iterator is not None:
      items[_DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored, error = self._manager.restore(step, args=ocp.args.Composite(**items)), None
    except Exception as e:  # noqa: BLE001 (a damaged file fails in many ways; the message keeps the first line)
      restored, error = None, e
    if not sharding.all_processes(error is None):  # every process decides alike (each reads its own files)
      detail = f"{type(error).__name__}: {_first_line(error)}" if error else "on another process"
      raise Damaged(f"step {step}: unreadable ({detail})") from error
    trees = {name: restored[name] for name in abstract_trees}
    held = getattr(trees.get("state"), "step", None)
    if held is not None and int(jax.device_get(held)) != step:
      raise Damaged(f"step {step}: its state has taken {int(jax.device_get(held))} steps, not {step}")
    if saved is not None:
      found = fingerprints(trees)
      bad = [k for k in found if found[k][2] != saved[k][2]]
      if bad:
        raise Damaged(f"step {step}: {len(bad)} array(s) differ from what was saved, first {bad[0]}")
    else:
      logging.warning("checkpoint step %d has no fingerprints (written by an older rlhfx): not verified", step)
    return trees, dict(restored[_META] or {})

  def metadata(self, step: int) -> dict:
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
    except Exception as e:  # noqa: BLE001
      raise Damaged(f"step {step}: metadata unreadable ({type(e).__name__}: {_first_line(e)})") from e
    if not isinstance(restored[_META], dict):
      raise Damaged(f"step {step}: metadata missing")
    return dict(restored[_META])

  def reject(self, step: int) -> Path:
    """Move checkpoint `step` to <directory>/../rejected_checkpoints/<step> (kept, never used); returns where."""
    target = self.directory.parent / "rejected_checkpoints" / str(step)
    n = 1
    while target.exists():
      target, n = target.with_name(f"{step}.{n}"), n + 1
    target.parent.mkdir(parents=True, exist_ok=True)
    storage.move(self.directory / str(step), target)
    self._manager.reload()
    return target

  def wait(self) -> None:
    with self._disk_errors(None):
      self._manager.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()
      for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):  # a save that failed: nothing to keep
        storage.rmtree(tmp)

  def _check_space(self, step: int, nbytes: int) -> None:
    """Refuse a save the disk cannot hold (before any file is written: no partial checkpoint, no noise). A bucket
    has no free-space figure: what `workdir.claim` checked (it exists, it takes a write) is what is known."""
    if storage.is_remote(self.directory):
      return
    free = shutil.disk_usage(self.directory).free
    if free < nbytes * 1.05 + 2**20:
      raise CheckpointError(f"saving a checkpoint of step {step} to {self.directory} failed: "
                            f"{os.strerror(errno.ENOSPC)} ({nbytes / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB "
                            f"free); complete checkpoints kept: {self._complete_steps() or 'none'}")

  @contextlib.contextmanager
  def _disk_errors(self, step: int | None):
    """A full or read-only disk while saving, as one CheckpointError naming the complete checkpoints."""
    try:
      yield
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 (Orbax re-raises a background thread's error, TensorStore's as text)
      code = _disk_errno(e)
      if code is None and not storage.is_remote(self.directory):
        raise
      cause = os.strerror(code) if code is not None else storage._cause(e)  # TensorStore retried it already
      kept = [s for s in self._complete_steps() if s != step]
      raise CheckpointError(f"saving a checkpoint{f' of step {step}' if step else ''} to {self.directory} failed: "
                            f"{cause}; complete checkpoints kept: {kept or 'none'}") from None

  def _complete_steps(self) -> list[int]:
    return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()  # also after an error: a save in flight completes


DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}


def _first_line(error: BaseException) -> str:
  return (str(error).splitlines() or [""])[0][:200]


def _disk_errno(error: BaseException) -> int | None:
  """The errno of a full / read-only / forbidden disk behind `error` (an OSError in its chain, or TensorStore's
  "[os_error_code='28']" text), else None."""
  while error is not None:
    code = error.errno if isinstance(error, OSError) else None
    match = re.search(r"os_error_code='(\d+)'", str(error))
    code = code if code is not None else int(match.group(1)) if match else None
    if code in DISK_ERRNOS:
      return code
    error = error.__cause__ or error.__context__
  return None


def abstract(tree, shardings) -> Any:
  """ShapeDtypeStructs carrying target shardings, for `Checkpointer.restore`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def resume(config, workdir: Path, state, train_iter, frozen: dict | None = None) -> tuple[Checkpointer, Any, int]:
  """(the run's Checkpointer, state, first step): the state (and iterator) restored from the latest complete
  checkpoint onto the current state's shardings, if there is one.

  Where every array of the state and of the `frozen` trees lives is written to <workdir>/placement.json
  (key path -> shape, dtype, PartitionSpec, bytes on one device), after the restore; then the config and inputs
  (`workdir.record`). A checkpoint of another algorithm's run is an error; one whose folder name, metadata and
  state disagree on the step is damaged (the previous one is taken).
  """
  checkpointer = Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints,
                              async_save=config.train.async_checkpoints, identity={"algorithm": config.algorithm})
  target = abstract(state, jax.tree.map(lambda x: x.sharding, state))
  restored, start = restore_latest(checkpointer, {"state": target}, train_iter)
  if start:
    state = restored["state"]
    if jax.process_index() == 0:
      print(f"resumed from step {start} ({checkpointer.directory})", flush=True)
  if jax.process_index() == 0:
    trees = {"state": state, **{k: v for k, v in (frozen or {}).items() if v is not None}}
    placement = {"step": start, "mesh": dict(state.step.sharding.mesh.shape),
                 **{name: sharding.describe(tree) for name, tree in trees.items()}}
    storage.write_text(workdir / "placement.json", json.dumps(placement, indent=1))
  workdirs.record(config, workdir)  # the run has started: what it was made from is the workdir's record now
  return checkpointer, state, start


def restore_latest(checkpointer: Checkpointer, abstract_trees: dict, data_iterator=None) -> tuple[dict, int]:
  """(trees, step) of the newest checkpoint that passes verification, ({}, 0) when there is none; a damaged
  one is reported and moved aside (`Checkpointer.reject`). CheckpointError when every checkpoint was damaged."""
  steps = sorted(checkpointer.all_steps(), reverse=True)
  for step in steps:
    try:
      trees, _ = checkpointer.restore(step, abstract_trees, data_iterator=data_iterator)
      return trees, step
    except Damaged as e:
      sharding.sync(f"checkpoint_{step}_damaged")
      where = checkpointer.reject(step) if jax.process_index() == 0 else None
      print(f"checkpoint damaged, not used: {e}; moved to {where}", flush=True)
  if steps:
    raise CheckpointError(f"no checkpoint in {checkpointer.directory} passes verification (steps {steps} moved to "
                          f"{checkpointer.directory.parent / 'rejected_checkpoints'}); rerun to start from step 0")
  return {}, 0


def due(step: int, train_config, preempted: bool) -> bool:
  """Save after this step: every `checkpoint_every` steps, at the last step, and when preempted."""
  return step % train_config.checkpoint_every == 0 or step == train_config.num_steps or preempted


def save_or_stop(step: int, state, data_iterator, train_config, log, checkpointer, preemption: Preemption) -> bool:
  """The end of a training step: save when `due` (the step's metrics checked finite first: only a state whose
  metrics are finite is saved); True when SIGTERM asks the loop to stop (saved already)."""
  stop = preemption.reached(step)
  if due(step, train_config, stop):
    log.flush()
    log.writer.publish()  # gs://: the logs of the steps saved go up with the checkpoint
    checkpointer.save(step, {"state": state}, data_iterator=data_iterator)
  return stop
