"""A run's model: its config from `config.model`, parameters placed on the mesh, frozen copies.

  model_config, _ = load.model_config(config, load_params=False)  # a Hugging Face model: config.json only
  trees = load.Trees(runtime, seed=config.seed, pretrained=load.pretrained(config))  # a run
  trees = load.Trees(runtime, abstract=True)                                         # the planner
  params = trees.params(Transformer(model_config))
  reference = trees.frozen(params, model_config.jnp_dtype)

`Trees` is how an algorithm's `init` makes every tree once for both: arrays on the mesh for a
run, ShapeDtypeStructs with the same shapes, dtypes and shardings for the planner.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhfx import sharding
from rlhfx.config import ConfigError, init_seed
from rlhfx.models.config import PRESETS, ModelConfig, get_preset
from rlhfx.models.convert import from_hf, hf_model_config
from rlhfx.models.heads import from_lm_params
from rlhfx.models.llama2c import from_llama2c


def resolve_attention(choice: str, platform: str) -> str:
  """config.model.attention -> the path on `platform`: "auto" is splash on TPU, cudnn on GPU, xla elsewhere."""
  if choice != "auto":
    return choice
  return {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}.get(platform, "xla")


def compute_dtype(dtype: str, platform: str) -> str:
  """The compute dtype on `platform`: as asked, except bfloat16 on CPU, which computes in float32.

  XLA:CPU's bf16 matmuls are slower than its float32 ones (BENCHMARKS.md), so a config written for an
  accelerator (bf16) runs its CPU smoke tests at float32 speed, and says so; the parameters keep
  `param_dtype`.
  """
  if dtype == "bfloat16" and platform == "cpu":
    _say_float32_on_cpu()
    return "float32"
  return dtype


@functools.cache
def _say_float32_on_cpu() -> None:
  logging.warning("model.dtype=bfloat16 computes in float32 on CPU (XLA:CPU's bf16 matmuls are slower than its "
                  "float32 ones); on TPU and GPU it is bfloat16")


def model_config(config, load_params: bool = True, platform: str | None = None) -> tuple[ModelConfig, Any]:
  """(ModelConfig, numpy params or None for random init) from config.model; without `load_params` a Hugging
  Face model's config.json alone is read and the params are None (the planner). `platform` (default: JAX's
  backend) picks the attention path of `config.model.attention="auto"` and the compute dtype
  (`compute_dtype`: bfloat16 is float32 on CPU)."""
  m = config.model
  overrides = {k: m[k] for k in ("dtype", "param_dtype", "remat", "scan_layers")}
  platform = platform or jax.default_backend()
  overrides["attention"] = resolve_attention(m.attention, platform)
  overrides["dtype"] = compute_dtype(m.dtype, platform)
  shape = {k: m[k] for k in ("vocab_size", "n_layers", "d_model") if m[k] is not None}
  if m.max_seq_len is not None:
    overrides["max_seq_len"] = m.max_seq_len
  params = None
  if m.init_from:
    if m.init_from.startswith("llama2c:"):
      result, params = from_llama2c(m.init_from.removeprefix("llama2c:"))
      result = result.replace(**overrides)
    elif load_params:
      result, params = from_hf(m.init_from, **overrides)
    else:
      result = hf_model_config(m.init_from, **overrides)
    changed = {k: v for k, v in shape.items() if getattr(result, k) != v}
    if changed:  # a pretrained model's shapes come from its checkpoint
      k, v = next(iter(changed.items()))
      raise ConfigError(f"config.model.{k}={v} differs from the pretrained model's {k}={getattr(result, k)} "
                        f"(config.model.init_from={m.init_from!r}); leave config.model.{k} unset")
  else:
    overrides.update(shape)
    if m.preset not in PRESETS:
      raise ConfigError(f"config.model.preset={m.preset!r} is not a preset; known presets: {sorted(PRESETS)}")
    result = get_preset(m.preset, **overrides)
  return result, params


def pretrained(config):
  """The numpy params of `config.model.init_from`, converted to `model_config(config)`'s dtypes, or None."""
  return model_config(config)[1] if config.model.init_from else None


def check_tokenizer(model_config: ModelConfig, tokenizer) -> None:
  """The tokenizer must fit the model's vocabulary; a missing pad token becomes EOS."""
  if len(tokenizer) > model_config.vocab_size:
    raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                      f"{model_config.vocab_size}; set config.model.vocab_size or config.data.tokenizer")
  if tokenizer.pad_token_id is None:
    tokenizer.pad_token = tokenizer.eos_token


def _init_fn(module: nn.Module):
  return lambda rng: module.init(rng, jnp.zeros((1, 4), jnp.int32))["params"]


def param_shardings(module: nn.Module, runtime: sharding.Runtime):
  """Shardings of a module's parameters from their logical axis names and the config's rules."""
  boxed = jax.eval_shape(lambda: _init_fn(module)(jax.random.key(0)))  # traced: nothing runs
  return sharding.tree_shardings(boxed, runtime.mesh, runtime.rules)


def abstract_params(module: nn.Module, runtime: sharding.Runtime):
  """ShapeDtypeStructs of a module's parameters carrying their shardings (restore targets, the planner)."""
  shapes = sharding.unbox(jax.eval_shape(lambda: _init_fn(module)(jax.random.key(0))))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                      param_shardings(module, runtime))


def put(params, shardings):
  """Host (numpy) params -> global arrays with the given shardings (each process builds its shards)."""
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]), params, shardings)


def sharded_params(module: nn.Module, runtime: sharding.Runtime, rng, params=None):
  """Sharded parameters of `module`: random init compiled with out_shardings (never whole on one host), or
  `params` (numpy) placed onto the same shardings."""
  shardings = param_shardings(module, runtime)
  if params is not None:
    return put(params, shardings)
  with sharding.active(runtime.mesh, runtime.rules):
    return jax.jit(lambda k: sharding.unbox(_init_fn(module)(k)), out_shardings=shardings)(rng)


def frozen_dtype(path, dtype, compute_dtype):
  """The dtype a frozen tree (reference, reward model) stores a leaf in: floating leaves in the compute dtype.

  Every use casts weights to the compute dtype first (Dense, Embed, Norm), so the model computes the
  same numbers from it in half the memory under bfloat16; a reward model's score head ("score", float32
  by design) and integer leaves keep their dtype.
  """
  if any(getattr(k, "key", None) == "score" for k in path) or not jnp.issubdtype(dtype, jnp.floating):
    return dtype
  return compute_dtype


def frozen_copy(tree, compute_dtype):
  """A copy of a frozen tree, each leaf in its `frozen_dtype`, on the same shardings."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.array(x, dtype=frozen_dtype(path, x.dtype, compute_dtype), copy=True), tree)


def frozen_structs(tree, compute_dtype):
  """The ShapeDtypeStructs of `frozen_copy(tree, compute_dtype)` (the planner)."""
  return jax.tree_util.tree_map_with_path(lambda path, x: jax.ShapeDtypeStruct(
      x.shape, frozen_dtype(path, x.dtype, compute_dtype), sharding=x.sharding), tree)


@dataclasses.dataclass(frozen=True)
class Trees:
  """Where a run's parameter trees come from: initialised or loaded onto the mesh (a run), or their
  ShapeDtypeStructs with the same shardings (`abstract`: the planner, nothing allocated)."""

  runtime: sharding.Runtime
  abstract: bool = False
  seed: int = 0
  pretrained: Any = None  # numpy params of config.model.init_from (None: random init)

  @classmethod
  def of_run(cls, config, runtime: sharding.Runtime) -> "Trees":
    """A run's: random init from config.init_seed (or seed), or config.model.init_from's weights."""
    return cls(runtime, seed=init_seed(config), pretrained=pretrained(config))

  def params(self, module: nn.Module):
    """A module's parameters: the pretrained ones when given, else a random init from the seed."""
    if self.abstract:
      return abstract_params(module, self.runtime)
    return sharded_params(module, self.runtime, jax.random.key(self.seed), self.pretrained)

  def score_params(self, module: nn.Module):
    """A ScoreModel's parameters: the pretrained language model as its backbone (when given) under a random head."""
    if self.abstract:
      return abstract_params(module, self.runtime)
    params = sharded_params(module, self.runtime, jax.random.key(self.seed))
    if self.pretrained is None:
      return params
    return put(from_lm_params(self.pretrained, jax.device_get(params["score"])), param_shardings(module, self.runtime))

  def frozen(self, tree, compute_dtype):
    """A frozen copy of `tree` (`frozen_copy`)."""
    return (frozen_structs if self.abstract else frozen_copy)(tree, compute_dtype)

  def copy(self, tree):
    """A copy of `tree` with its own buffers (a tree that trains apart from the one it starts from)."""
    return tree if self.abstract else jax.tree.map(lambda x: jnp.array(x, copy=True), tree)

  def zeros(self, shape: tuple[int, ...], dtype):
    """A zero array replicated on every device."""
    replicated = jax.sharding.NamedSharding(self.runtime.mesh, jax.sharding.PartitionSpec())
    if self.abstract:
      return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
    return jax.device_put(jnp.zeros(shape, dtype), replicated)
