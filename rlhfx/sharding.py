"""Device mesh, logical-axis rules, shardings of parameter trees, global batches, a run's runtime set-up.

Model code names logical axes (`nn.with_logical_partitioning`); `config.mesh.rules`
maps them onto the mesh axes `data`, `fsdp` and `tensor`. A mesh axis that does not
divide a dimension is dropped for that dimension (the array is replicated along
it), so odd vocabularies and head counts still run.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlhfx.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both

# (logical axis, mesh axes): parameters first, then activations.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("length", None),
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("members", "data"),  # the members of a sweep program (rlhfx.members): each data-parallel group its own
)


@dataclasses.dataclass
class Runtime:
  mesh: Mesh
  rules: tuple
  workdir: Path


def setup(config, workdir: Path) -> Runtime:
  """Fake CPU devices and multi-process set-up (before any JAX computation) and the mesh."""
  if config.mesh.num_cpu_devices:
    jax.config.update("jax_num_cpu_devices", config.mesh.num_cpu_devices)
  if config.distributed.coordinator_address and config.distributed.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  init_distributed(config.distributed)
  mesh = make_mesh(dict(config.mesh.shape))
  log_mesh(mesh)
  return Runtime(mesh=mesh, rules=rules_from_config(config.mesh.rules), workdir=workdir)


def sync(name: str) -> None:
  """A barrier across processes (a no-op in one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def all_processes(flag: bool) -> bool:
  """True when `flag` is true on every process (a collective: every process calls it)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))


def init_distributed(cfg) -> None:
  """jax.distributed.initialize when configured: explicit coordinator, or auto-detection (Cloud TPU, SLURM)."""
  if cfg.coordinator_address:
    jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                               process_id=cfg.process_id,
                               local_device_ids=list(cfg.local_device_ids) if cfg.local_device_ids else None)
  elif cfg.auto and ("SLURM_JOB_ID" in os.environ or "TPU_WORKER_HOSTNAMES" in os.environ
                     or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ):
    jax.distributed.initialize()


def make_mesh(shape: dict[str, int], devices: Sequence | None = None) -> Mesh:
  """Mesh with axes data x fsdp x tensor; one entry may be -1 (all remaining devices)."""
  devices = list(devices if devices is not None else jax.devices())
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ConfigError(f"config.mesh.shape has unknown axes {sorted(unknown)}; expected {MESH_AXES}")
  sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ConfigError(f"config.mesh.shape={dict(shape)}: at most one axis may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ConfigError(f"config.mesh.shape={dict(shape)}: {len(devices)} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ConfigError(f"config.mesh.shape={dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices; "
                     f"{len(devices)} are available")
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  try:  # laid out along the physical torus where jax knows how
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)
  except NotImplementedError:  # a shape jax cannot map onto this torus: devices in their given order
    return Mesh(np.asarray(devices, dtype=object).reshape(sizes), MESH_AXES, axis_types=auto)


def rules_from_config(rules) -> tuple[tuple[str, Any], ...]:
  """Config rules (list of [logical, mesh axis | list | None]) -> flax logical-axis rules."""
  if not rules:
    return DEFAULT_RULES
  out = []
  for logical, mesh_axes in rules:
    out.append((logical, tuple(mesh_axes) if isinstance(mesh_axes, (list, tuple)) else mesh_axes))
  return tuple(out)


def _spec_for(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules) -> P:
  """PartitionSpec for one array from its logical names, dropping mesh axes that do not divide."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    kept, size = [], 1
    for axis in axes:
      if axis in used or dim % (size * mesh.shape[axis]):
        continue
      kept.append(axis)
      size *= mesh.shape[axis]
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*spec)


@contextlib.contextmanager
def active(mesh: Mesh, rules):
  """Trace and run under `mesh` and the logical-axis rules.

  `jax.set_mesh`, not the legacy `with mesh:`: only the former sets the abstract mesh that
  activation constraints (`constrain`) resolve against. Under `with mesh:` every constraint
  is a no-op, activations lose their batch sharding and XLA all-reduces partial products of
  the FSDP-sharded weights instead of gathering them per layer.
  """
  token = _PLATFORM.set(mesh.devices.flat[0].platform)
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      yield
  finally:
    _PLATFORM.reset(token)


_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("platform", default=None)


def platform() -> str:
  """The platform programs are traced for: the devices of the mesh `active` set (the planner traces for a TPU
  slice on a CPU host), else JAX's default backend."""
  return _PLATFORM.get() or jax.default_backend()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation from its logical axis names (see `active`).

  Like `nn.with_logical_constraint`, but a mesh axis that does not divide a dimension is
  dropped for it (a batch of one, an odd vocabulary), as for parameters. A no-op outside
  `active`.
  """
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh.empty or not rules:
    return x
  return jax.lax.with_sharding_constraint(x, _spec_for(names, x.shape, mesh, rules))


def unbox(boxed_tree) -> Any:
  """The values of an nn.Partitioned tree, without Flax's own constraints (their placement is `tree_shardings`')."""
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, boxed_tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def tree_shardings(boxed_tree, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree whose leaves are nn.Partitioned (or plain: replicated)."""

  def one(leaf):
    if isinstance(leaf, nn.Partitioned):
      return NamedSharding(mesh, _spec_for(leaf.names, leaf.value.shape, mesh, rules))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def describe(tree) -> dict[str, dict[str, Any]]:
  """{key path: shape, dtype, PartitionSpec, bytes on one device} of every array leaf (for placement.json)."""
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    if not isinstance(x, jax.Array):
      continue
    spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else None
    out[jax.tree_util.keystr(path, simple=True, separator="/")] = {
        "shape": list(x.shape), "dtype": str(x.dtype), "spec": None if spec is None else [
            list(a) if isinstance(a, tuple) else a for a in tuple(spec) + (None,) * (x.ndim - len(spec))],
        "device_bytes": max(s.data.nbytes for s in x.addressable_shards), "bytes": x.nbytes}
  return out


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows -> global arrays split over the batch axes of the mesh."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
          for k, v in local_batch.items()}


def gather(tree):
  """Whole arrays on every host (process_allgather across processes)."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def log_mesh(mesh: Mesh) -> None:
  axes = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
  print(f"mesh: {axes} over {mesh.size} {jax.devices()[0].platform} devices in {jax.process_count()} processes "
        f"(this is process {jax.process_index()})", flush=True)
