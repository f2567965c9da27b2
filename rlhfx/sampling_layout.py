"""The layout a rollout samples in: tensor-parallel groups over the training mesh's devices.

Training shards the policy over fsdp x tensor. Decoding under that layout gathers every
layer's weights again for every generated token (about 7 GiB per chip per token for
Llama-3-8B on a v5p-64: `python -m rlhfx.plan`). Sampling runs instead on a mesh of its
own over the same devices, in the same order: groups of `k` neighbouring chips, each group
holding the policy (LoRA merged, floating leaves in the compute dtype) split k ways over
heads and MLP width, the rollout rows split over the groups.

  config.rollout.mesh = "auto"       # the largest k <= 8 dividing the devices and key/value heads that leaves
                                     # each chip 256 MiB of weights or more (1 for a small model)
  config.rollout.mesh = "tensor=4"   # groups of 4 chips
  config.rollout.mesh = "training"   # sample in the training layout (no reshard)

A training mesh that already is data x 1 x k (one device, pure data parallelism) samples in place.

Each iteration, `reshard` moves the weights from the training layout in one compiled
program; `sample` decodes with no per-token weight traffic and returns its rollout in the
training layout's batch sharding, where scoring and the update read it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlhfx import sharding
from rlhfx.config import ConfigError
from rlhfx.models import load

SPEC = re.compile(r"auto|training|tensor=([1-9][0-9]*)")  # the values config.rollout.mesh takes


@dataclasses.dataclass(frozen=True)
class Layout:
  mesh: Mesh  # data = devices / k, fsdp = 1, tensor = k
  rules: tuple
  params: Any  # NamedShardings of the policy's parameters on `mesh`

  @property
  def tensor(self) -> int:
    return self.mesh.shape["tensor"]

  def batch(self, shape) -> NamedSharding:
    """Rows over the groups when they divide among them, else on every device (a few prompts, many groups)."""
    if shape[0] % self.mesh.shape["data"]:
      return NamedSharding(self.mesh, P())
    return sharding.batch_sharding(self.mesh, len(shape))


AUTO_LIMIT = 8  # auto's largest group: one host's chips on most TPU and GPU machines
AUTO_MIN_SHARE = 256 * 2**20  # auto splits no further than this many bytes of weights per chip


def tensor_size(spec: str, training: Mesh, num_kv_heads: int, weight_bytes: int = 0) -> int | None:
  """k of a `config.rollout.mesh` value on the training mesh; None: sample in the training layout.

  auto takes the largest k up to 8 that divides the devices and the key/value heads and leaves each chip at
  least 256 MiB of the policy's `weight_bytes`: decoding reads every weight a chip holds once per token, so a
  chip's share sets the time per token; below that share (a fraction of a millisecond of HBM time) the
  groups' per-layer all-reduces cost more than the reads they save."""
  m = SPEC.fullmatch(spec)
  if not m:
    raise ConfigError(f"config.rollout.mesh={spec!r}: expected auto, training or tensor=<k>")
  if spec == "training":
    return None
  if spec == "auto":
    return max(k for k in range(1, AUTO_LIMIT + 1) if training.size % k == 0 and num_kv_heads % k == 0
               and (k == 1 or weight_bytes / k >= AUTO_MIN_SHARE))
  return int(m.group(1))


def check(spec: str, training: Mesh, num_kv_heads: int) -> None:
  """One line when the sampling layout cannot be made: k must divide the devices and the key/value heads."""
  k = tensor_size(spec, training, num_kv_heads)
  if k is None:
    return
  if training.size % k:
    raise ConfigError(f"config.rollout.mesh={spec!r}: tensor={k} does not divide the {training.size} devices")
  if num_kv_heads % k:
    raise ConfigError(f"config.rollout.mesh={spec!r}: tensor={k} does not divide the model's {num_kv_heads} "
                      f"key/value heads; use a divisor of {num_kv_heads}")


def weight_bytes(module) -> int:
  """Bytes of the policy's parameters in the compute dtype (what a decode step reads)."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jax.numpy.zeros((1, 4), jax.numpy.int32)))
  itemsize = np.dtype(module.config.jnp_dtype).itemsize
  return sum(int(np.prod(x.shape)) * itemsize for x in jax.tree.leaves(sharding.unbox(shapes["params"])))


def mesh_for(training: Mesh, tensor: int) -> Mesh:
  """data x fsdp x tensor = (n / k) x 1 x k over the training mesh's devices in their order: a group is k
  consecutive devices of the training mesh, whose last axis is its tensor axis (neighbours on the torus)."""
  devices = np.asarray(training.devices).reshape(-1)
  auto = (jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES)
  return Mesh(devices.reshape(devices.size // tensor, 1, tensor), sharding.MESH_AXES, axis_types=auto)


def make(config, module, runtime) -> Layout | None:
  """The sampling layout of `config.rollout.mesh` for the policy `module` (None: the training layout)."""
  check(config.rollout.mesh, runtime.mesh, module.config.num_kv_heads)
  k = tensor_size(config.rollout.mesh, runtime.mesh, module.config.num_kv_heads, weight_bytes(module))
  if k is None or dict(runtime.mesh.shape) == {"data": runtime.mesh.size // k, "fsdp": 1, "tensor": k}:
    return None  # the training layout (or one already data x 1 x k: no weight is gathered while decoding)
  mesh = mesh_for(runtime.mesh, k)
  params = load.param_shardings(module, sharding.Runtime(mesh=mesh, rules=runtime.rules, workdir=None))
  return Layout(mesh=mesh, rules=runtime.rules, params=params)


def sampling_dtype(tree, compute_dtype):
  """Each leaf of the sampled policy in its `load.frozen_dtype` (the compute dtype for floating weights: every
  use casts to it first, so the numbers are those of the training layout's parameters)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.astype(load.frozen_dtype(path, x.dtype, compute_dtype)), tree)


def reshard_program(layout: Layout, policy: Callable, compute_dtype) -> Callable:
  """jit((state) -> the policy's parameters in `layout`): merged, cast and moved in one compiled program."""
  return jax.jit(lambda state: sampling_dtype(policy(state), compute_dtype), out_shardings=layout.params)


def sample_program(layout: Layout, sample: Callable, training: Mesh) -> Callable:
  """jit((params, batch, step) -> rollout) in `layout` (its arguments put there by `inputs`, the prompts as
  `Layout.batch` splits them; trace and call it under `active(layout)`); the rollout (every leaf [rows, ...] 2-D)
  comes back split like a training batch."""
  return jax.jit(sample, in_shardings=(layout.params, None, NamedSharding(layout.mesh, P())),
                 out_shardings=sharding.batch_sharding(training, 2))


def inputs(layout: Layout, batch: dict, step):
  """(batch, step) moved from the training layout to `layout` (the rows over its groups, the step everywhere)."""
  return (jax.device_put(batch, {k: layout.batch(v.shape) for k, v in batch.items()}),
          jax.device_put(step, NamedSharding(layout.mesh, P())))


def describe(params) -> dict[str, dict[str, Any]]:
  """{key path: shape, dtype, PartitionSpec, bytes on one device} of the sampled policy (ShapeDtypeStructs with
  shardings), as `sharding.describe` lists a run's arrays."""
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
    out[jax.tree_util.keystr(path, simple=True, separator="/")] = {
        "shape": list(x.shape), "dtype": str(x.dtype),
        "spec": [list(a) if isinstance(a, tuple) else a for a in spec],
        "device_bytes": int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize,
        "bytes": int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize}
  return out


def record(programs, state, workdir) -> None:
  """Add the sampling layout (its mesh and where each weight of the sampled policy lives) to
  <workdir>/placement.json (process 0)."""
  if programs.layout is None or jax.process_index() != 0:
    return
  import json

  path = workdir / "placement.json"
  placement = json.loads(path.read_text()) if path.exists() else {}
  placement["sampling"] = {"mesh": dict(programs.layout.mesh.shape),
                           "params": describe(jax.eval_shape(programs.reshard, state))}
  path.write_text(json.dumps(placement, indent=1))


def active(layout: Layout):
  """Trace and run under the sampling layout's mesh and rules."""
  return sharding.active(layout.mesh, layout.rules)
