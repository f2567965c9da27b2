"""The layers of the decoder (rlhfx.models.transformer): norms, rotary embeddings, dense layers, attention.

Key of shape letters: B batch, T query length, S key/cache length, N query heads,
K key/value heads, H head dim, G query heads per key/value head.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhfx.models.config import ModelConfig

Array = jax.Array


def _init(axes: tuple[str, ...], stddev: float = 0.02):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)


def _ones(axes):
  return nn.with_logical_partitioning(nn.initializers.ones, axes)


def _zeros(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros, axes)


class Norm(nn.Module):
  """LayerNorm or RMSNorm over the last axis, computed in float32 (Gemma's: times 1 + w)."""

  config: ModelConfig
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dim = x.shape[-1]
    x32 = x.astype(jnp.float32)
    if cfg.norm == "layernorm":
      x32 = x32 - x32.mean(-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + cfg.norm_eps)
    if cfg.norm_offset:  # Gemma: y x (1 + w) in float32, then cast; the weights start at 0
      scale = self.param("scale", _zeros((self.axis_name,)), (dim,), cfg.jnp_param_dtype)
      return (y * (cfg.norm_offset + scale.astype(jnp.float32))).astype(cfg.jnp_dtype)
    scale = self.param("scale", _ones((self.axis_name,)), (dim,), cfg.jnp_param_dtype)
    y = y.astype(cfg.jnp_dtype) * scale.astype(cfg.jnp_dtype)
    if cfg.norm == "layernorm":
      y = y + self.param("bias", _zeros((self.axis_name,)), (dim,), cfg.jnp_param_dtype).astype(cfg.jnp_dtype)
    return y


def rope_frequencies(config: ModelConfig, local: bool = False) -> np.ndarray:
  """Inverse frequencies [H/2] of rotary embeddings, with linear or Llama-3 scaling; `local`: a Gemma 3 sliding
  layer's (rope_local_theta, unscaled)."""
  dim = config.dim_per_head
  theta = config.rope_local_theta if local else config.rope_theta
  inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  scaling = {} if local else config.rope_scaling_dict
  if scaling.get("rope_type") == "linear":
    inv_freq = inv_freq / scaling["factor"]
  elif scaling.get("rope_type") == "llama3":
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def apply_rope(x_BxTxNxH: Array, positions_BxT: Array, inv_freq: np.ndarray) -> Array:
  """Rotary embeddings, rotate-half convention (Su et al. 2021, eq. 34; as in Hugging Face)."""
  angles_BxTxH2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  cos = jnp.cos(angles_BxTxH2)[:, :, None, :]
  sin = jnp.sin(angles_BxTxH2)[:, :, None, :]
  x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


class Dense(nn.Module):
  """A linear layer over the trailing `in_dims` axes, computed as one 2-D matmul [rows, in] x [in, out].

  The parameters are nn.DenseGeneral's (kernel: contracted shape + features; bias: features), but
  the activations are flattened to 2-D first: XLA:CPU runs the weight-gradient dot of a 3-D
  input (contracting batch x length) with layout copies, at about half speed (BENCHMARKS.md).
  """

  features: tuple[int, ...]
  in_dims: int
  use_bias: bool
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  kernel_axes: tuple[str, ...]
  bias_axes: tuple[str, ...]

  @nn.compact
  def __call__(self, x):
    in_shape = x.shape[-self.in_dims:]
    n_in, n_out = math.prod(in_shape), math.prod(self.features)
    kernel = self.param("kernel", _init(self.kernel_axes), in_shape + self.features, self.param_dtype)
    y = jnp.dot(x.reshape(-1, n_in).astype(self.dtype), kernel.reshape(n_in, n_out).astype(self.dtype))
    y = y.reshape(x.shape[:-self.in_dims] + self.features)
    if self.use_bias:
      y = y + self.param("bias", _zeros(self.bias_axes), self.features, self.param_dtype).astype(self.dtype)
    return y


def _dense(cfg: ModelConfig, features, axis, kernel_axes, bias_axes, use_bias, name):
  features = tuple(features) if isinstance(features, (tuple, list)) else (features,)
  in_dims = len(axis) if isinstance(axis, (tuple, list)) else 1
  return Dense(features=features, in_dims=in_dims, use_bias=use_bias, dtype=cfg.jnp_dtype,
               param_dtype=cfg.jnp_param_dtype, kernel_axes=kernel_axes, bias_axes=bias_axes, name=name)


def write_cache(layer_cache, index, k_BxTxKxH, v_BxTxKxH):
  """Write new keys and values at slot `index` -> (keys_BxKxSxH, values_BxKxSxH, updated cache).

  `layer_cache` is (k_LxBxKxSxH, v_LxBxKxSxH, layer): the stacked cache of all layers, written at
  `layer` only (in place inside a decode loop, where copying per-layer slices back into the stack
  cost whole-cache copies every step); or (k_BxKxSxH, v_BxKxSxH): one layer's, under nn.scan.
  """
  if len(layer_cache) == 2:  # one layer's cache: a stack of one
    k_BxKxSxH, v_BxKxSxH, (k_1xBxKxSxH, v_1xBxKxSxH) = write_cache(
        (layer_cache[0][None], layer_cache[1][None], 0), index, k_BxTxKxH, v_BxTxKxH)
    return k_BxKxSxH, v_BxKxSxH, (k_1xBxKxSxH[0], v_1xBxKxSxH[0])
  cache_k, cache_v, layer = layer_cache
  if jnp.ndim(index):  # a slot per row, one new token each (the continuous-batching engine)
    rows_B = jnp.arange(k_BxTxKxH.shape[0])
    cache_k = cache_k.at[layer, rows_B, :, index, :].set(k_BxTxKxH[:, 0].astype(cache_k.dtype))
    cache_v = cache_v.at[layer, rows_B, :, index, :].set(v_BxTxKxH[:, 0].astype(cache_v.dtype))
    return cache_k[layer], cache_v[layer], (cache_k, cache_v)
  at = (layer, 0, 0, index, 0)
  cache_k = jax.lax.dynamic_update_slice(cache_k, k_BxTxKxH.swapaxes(1, 2)[None].astype(cache_k.dtype), at)
  cache_v = jax.lax.dynamic_update_slice(cache_v, v_BxTxKxH.swapaxes(1, 2)[None].astype(cache_v.dtype), at)
  return cache_k[layer], cache_v[layer], (cache_k, cache_v)


def attention(q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, mask_BxTxS, scale: float, softcap: float | None = None):
  """Softmax attention with head-major keys and values (the KV cache's layout), for training and decoding.

  Grouped query heads attend to their key/value head as one [G*T, S] block. The mask enters as an additive
  bias (its gradient is the identity: no select in the backward pass), and the softmax is normalised after
  the value product: exp(scores - max) @ v / sum(exp), which divides [T, H] rather than [T, S] and saves
  a pass over the probabilities forward and backward. A query with no visible key (padding before a row's
  first token) is zeroed, so it gets the mean of all values, as with jax.nn.dot_product_attention, and
  passes no gradient to queries or keys through the bias. With `softcap` c the scaled scores become
  c tanh(scores / c) before the mask (Gemma 2). On the CPU this is faster than
  `jax.nn.dot_product_attention` forward and backward (BENCHMARKS.md).
  """
  b, t, n, h = q_BxTxNxH.shape
  k, s = k_BxKxSxH.shape[1], k_BxKxSxH.shape[2]
  g = n // k
  sees_a_key_BxTx1x1 = mask_BxTxS.any(-1)[:, :, None, None]
  q_BxTxNxH = jnp.where(sees_a_key_BxTx1x1, q_BxTxNxH, 0)
  q_BxKxGTxH = q_BxTxNxH.reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, h)
  scores_BxKxGTxS = jnp.einsum("bkqh,bksh->bkqs", q_BxKxGTxH, k_BxKxSxH.astype(q_BxTxNxH.dtype),
                               preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    scores_BxKxGTxS = softcap * jnp.tanh(scores_BxKxGTxS / softcap)
  bias_Bx1x1xTxS = jnp.where(mask_BxTxS, 0.0, jnp.finfo(jnp.float32).min)[:, None, None]
  scores_BxKxGxTxS = scores_BxKxGTxS.reshape(b, k, g, t, s) + bias_Bx1x1xTxS
  weights_BxKxGxTxS = jnp.exp(scores_BxKxGxTxS - jax.lax.stop_gradient(scores_BxKxGxTxS.max(-1, keepdims=True)))
  out_BxKxGTxH = jnp.einsum("bkqs,bksh->bkqh", weights_BxKxGxTxS.reshape(b, k, g * t, s).astype(q_BxTxNxH.dtype),
                            v_BxKxSxH.astype(q_BxTxNxH.dtype), preferred_element_type=jnp.float32)
  out_BxKxGxTxH = out_BxKxGTxH.reshape(b, k, g, t, h) / weights_BxKxGxTxS.sum(-1, keepdims=True)
  return out_BxKxGxTxH.astype(q_BxTxNxH.dtype).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
