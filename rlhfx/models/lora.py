"""LoRA (Hu et al. 2021): low-rank adapters as a separate parameter tree.

  adapters = lora.init(params, patterns=("attn/(q|v)_proj/kernel",), rank=8, rng=key)
  merged = lora.merge(params, adapters, scale=alpha / rank)      # W + scale * A @ B
  lora.save(adapters, "out/adapters", rank=8, alpha=16)           # its own tree on disk

In training (every algorithm, `config.lora.rank > 0`) the trained tree is
`wrap(base, config.lora, rng)` = {"base": base, "lora": adapters}; the optimizer freezes
`FROZEN_BASE` (no update, no optimizer state) and the model sees `effective(params, scale)`.

Adapters are keyed by the kernel's path ("layer_0/attn/q_proj/kernel"). A kernel
[in..., out...] gets A [in, r] (normal, std 1/r... Kaiming-style) and B [r, out]
(zeros), flattened over the kernel's input and output axes, so the merged model
starts equal to the base. Scanned layers (a leading "layers" axis) get one adapter
pair per layer.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhfx.models.hf_config import CheckpointError
from rlhfx.models.peft_io import load_peft
from rlhfx.optim import param_path


def _input_axes(path: str) -> int:
  """Leading input axes of a kernel: 2 for the attention output projection [N, H, D], else 1."""
  return 2 if path.endswith("o_proj/kernel") else 1


def _dims(path: str, kernel) -> tuple[tuple[int, ...], int, int]:
  """(layer axes, d_in, d_out) of an adapted kernel: A is [*layers, d_in, r], B [*layers, r, d_out]."""
  lead = 1 if path.startswith("layers/") else 0
  n_in = _input_axes(path)
  return (tuple(kernel.shape[:lead]), math.prod(kernel.shape[lead:lead + n_in]),
          math.prod(kernel.shape[lead + n_in:]))


def targets(params, patterns: Sequence[str]) -> list[str]:
  compiled = [re.compile(p) for p in patterns]
  found = [param_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  hits = [p for p in found if p.endswith("kernel") and any(c.search(p) for c in compiled)]
  if not hits:
    raise ValueError(f"LoRA patterns {list(patterns)} match no kernel; kernels look like {found[:3]}")
  return hits


def init(params, *, patterns: Sequence[str], rank: int, rng: jax.Array) -> dict[str, dict[str, jax.Array]]:
  """Adapters for every kernel whose path matches a pattern: {path: {"a": [(L,) in, r], "b": [(L,) r, out]}}."""
  leaves = {param_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
  adapters = {}
  for i, path in enumerate(targets(params, patterns)):
    kernel = leaves[path]
    batch, d_in, d_out = _dims(path, kernel)
    a = jax.random.normal(jax.random.fold_in(rng, i), (*batch, d_in, rank), jnp.float32) / math.sqrt(d_in)
    adapters[path] = {"a": a.astype(kernel.dtype), "b": jnp.zeros((*batch, rank, d_out), kernel.dtype)}
  return adapters


def shardings(adapters: dict, params) -> dict:
  """Each adapter's sharding from its kernel's (`params` leaves carry `.sharding`): A [in, r] split like the
  kernel's first input axis, B [r, out] like its first output axis, the rank replicated."""
  leaves = {param_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
  out = {}
  for path, ab in adapters.items():
    kernel = leaves[path]
    lead = 1 if path.startswith("layers/") else 0
    spec = tuple(kernel.sharding.spec) + (None,) * (kernel.ndim - len(kernel.sharding.spec))
    n_in = _input_axes(path)
    named = lambda *axes: jax.sharding.NamedSharding(kernel.sharding.mesh, jax.sharding.PartitionSpec(*axes))  # noqa: E731
    out[path] = {"a": named(*spec[:lead], spec[lead], None), "b": named(*spec[:lead], None, spec[lead + n_in])}
  return out


FROZEN_BASE = r"(^|/)base/(?!score/)"  # optimizer patterns: the base is frozen, a reward model's score head trains


def frozen(cfg) -> tuple[str, ...]:
  """The optimizer's frozen patterns for `config.lora`: the base when adapters are trained."""
  return (FROZEN_BASE,) if cfg.rank else ()


def scale(cfg) -> float:
  """alpha / rank of `config.lora` (1.0 without LoRA, where `effective` does not use it)."""
  return cfg.alpha / cfg.rank if cfg.rank else 1.0


def from_peft(base, cfg) -> dict:
  """The adapters of the PEFT directory `config.lora.init_from`, checked against `config.lora` and the kernels."""
  scanned = any(param_path(p).startswith("layers/") for p, _ in jax.tree_util.tree_leaves_with_path(base))
  adapters, settings = load_peft(cfg.init_from, scanned=scanned)
  if (settings["rank"], settings["alpha"]) != (cfg.rank, float(cfg.alpha)):
    raise CheckpointError(f"config.lora.init_from={cfg.init_from!r}: its adapters have r={settings['rank']}, "
                     f"lora_alpha={settings['alpha']:g}; set config.lora.rank={settings['rank']} and "
                     f"config.lora.alpha={settings['alpha']:g} to continue them")
  leaves = {param_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(base)}
  for path, ab in adapters.items():
    if path not in leaves:
      raise CheckpointError(f"config.lora.init_from={cfg.init_from!r}: an adapter on {path}, which this model lacks")
    batch, d_in, d_out = _dims(path, leaves[path])
    want_a, want_b = (*batch, d_in, cfg.rank), (*batch, cfg.rank, d_out)
    if ab["a"].shape != want_a or ab["b"].shape != want_b:
      raise CheckpointError(f"config.lora.init_from={cfg.init_from!r}: the adapter on {path} has A {ab['a'].shape}, "
                       f"B {ab['b'].shape}; this model needs {want_a}, {want_b}")
  return {p: {k: jnp.asarray(v, leaves[p].dtype) for k, v in ab.items()} for p, ab in adapters.items()}


def wrap(base, cfg, seed: int) -> dict:
  """{"base": base, "lora": adapters} with adapters per `config.lora` (A drawn from `seed`, or the PEFT adapter
  `config.lora.init_from` to continue), each placed like its kernel; `base` itself when config.lora.rank is 0
  (no LoRA: every parameter trains). On ShapeDtypeStructs (the planner) nothing is drawn or allocated."""
  if not cfg.rank:
    return base
  if cfg.get("init_from"):
    make = lambda b: from_peft(b, cfg)  # noqa: E731
  else:
    make = lambda b: init(b, patterns=tuple(cfg.patterns), rank=cfg.rank, rng=jax.random.key(seed))  # noqa: E731
  if isinstance(jax.tree.leaves(base)[0], jax.ShapeDtypeStruct):  # the planner: structs, nothing allocated
    adapters = jax.eval_shape(make, base)
    return {"base": base, "lora": jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                               adapters, shardings(adapters, base))}
  adapters = make(base)
  if not all(isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding) for x in jax.tree.leaves(base)):
    return {"base": base, "lora": adapters}  # unplaced parameters (one device, tests): adapters stay as made
  return {"base": base, "lora": jax.device_put(adapters, shardings(adapters, base))}


def is_wrapped(params) -> bool:
  return isinstance(params, dict) and set(params) == {"base", "lora"}


def effective(params, scale: float):
  """The parameters the model runs with: `params`, or base + adapters when `params` is `wrap`'s tree (the base
  under stop_gradient, so only the adapters and a score head get gradients)."""
  if not is_wrapped(params):
    return params
  # like FROZEN_BASE: a reward model's or critic's score head under the base still trains
  base = {k: v if k == "score" else jax.lax.stop_gradient(v) for k, v in params["base"].items()}
  return merge(base, params["lora"], scale=scale)


def merge(params, adapters: dict, *, scale: float):
  """Base params with W + scale * A @ B on every adapted kernel (differentiable in the adapters)."""
  def one(path, kernel):
    name = param_path(path)
    if name not in adapters:
      return kernel
    a, b = adapters[name]["a"], adapters[name]["b"]
    delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32)) * scale
    return (kernel.astype(jnp.float32) + delta.reshape(kernel.shape)).astype(kernel.dtype)

  return jax.tree_util.tree_map_with_path(one, params)


def save(adapters: dict, directory: str | os.PathLike, *, rank: int, alpha: float, patterns: Sequence[str]) -> Path:
  """adapters.safetensors ("<path>.a", "<path>.b") + adapter_config.json."""
  from safetensors.numpy import save_file

  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tensors = {f"{path}.{k}": np.asarray(v) for path, ab in adapters.items() for k, v in ab.items()}
  save_file(tensors, str(directory / "adapters.safetensors"))
  (directory / "adapter_config.json").write_text(json.dumps({"rank": rank, "alpha": alpha,
                                                             "patterns": list(patterns)}, indent=2))
  return directory


def load(directory: str | os.PathLike) -> tuple[dict, dict]:
  """(adapters, adapter_config) written by `save`."""
  from safetensors.numpy import load_file

  directory = Path(directory)
  tensors = load_file(str(directory / "adapters.safetensors"))
  adapters: dict = {}
  for name, value in tensors.items():
    path, kind = name.rsplit(".", 1)
    adapters.setdefault(path, {})[kind] = value
  return adapters, json.loads((directory / "adapter_config.json").read_text())
