"""One Linen decoder family for GPT-2, Llama 2/3, Qwen2/3, Mistral, SmolLM and Gemma 1/2/3.

Key of shape letters: B batch, T query length, S key/cache length, D model width,
N query heads, K key/value heads, H head dim, F MLP width, V vocab, L layers.

Usage:
  model = Transformer(config)
  logits_BxTxV = model.apply({"params": params}, tokens_BxT, mask_BxT)
  logits_BxTxV, cache = model.apply({"params": params}, tokens_BxT, mask_BxT, cache=cache)

`mask_BxT` marks real tokens (False on padding). Positions default to the count of
real tokens before each one, so left-padded prompts see the same positions as
unpadded ones. With a `Cache`, the new keys and values are written at
`cache.index` and attention covers every filled slot before the query's slot.

Gemma 2/3 mix sliding-window and full-attention layers (`config.layer_types`): every
layer gets both masks and picks its own (statically when unrolled; by a scanned flag
under `scan_layers`), and Gemma 3's sliding layers rotate with their own rope theta.
"""

from __future__ import annotations

import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from rlhfx.models.config import ModelConfig
from rlhfx.models import kernels
from rlhfx.models.layers import apply_rope, attention, _dense, _init, Norm, rope_frequencies, write_cache
from rlhfx.sharding import constrain

Array = jax.Array


@flax.struct.dataclass
class Cache:
  """Key/value cache for all layers, filled left to right."""

  k_LxBxKxSxH: Array  # heads before slots: decoding reads each head's keys contiguously
  v_LxBxKxSxH: Array
  mask_BxS: Array  # True where a slot holds a real token
  index: Array  # int32: the next slot to write, a scalar, or one per row ([B]: the continuous-batching engine)


def init_cache(config: ModelConfig, batch: int, length: int) -> Cache:
  shape = (config.n_layers, batch, config.num_kv_heads, length, config.dim_per_head)
  return Cache(
      k_LxBxKxSxH=jnp.zeros(shape, config.jnp_dtype),
      v_LxBxKxSxH=jnp.zeros(shape, config.jnp_dtype),
      mask_BxS=jnp.zeros((batch, length), bool),
      index=jnp.zeros((), jnp.int32),
  )


class Attention(nn.Module):
  """Multi-head / grouped-query attention over a whole sequence or against a KV cache (one `attention`)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, attn_mask_BxQxS, segments_BxT, layer_cache, index, select_BxQ=None,
               sliding=False):
    """With `select_BxQ`, queries (and the output) are only at those positions of each row; keys and
    values still cover all T (attn_mask_BxQxS is then the mask of the selected rows). A whole sequence
    without a cache runs the fused kernel `config.attention` (rlhfx.models.kernels) on `segments_BxT`.
    `sliding` (a bool, or a traced one under nn.scan) picks Gemma 3's local rope frequencies."""
    cfg = self.config
    n, k, h = cfg.n_heads, cfg.num_kv_heads, cfg.dim_per_head
    xq_BxQxD, q_positions_BxQ = x_BxTxD, positions_BxT
    if select_BxQ is not None:
      xq_BxQxD = jnp.take_along_axis(x_BxTxD, select_BxQ[..., None], axis=1)
      q_positions_BxQ = jnp.take_along_axis(positions_BxT, select_BxQ, axis=1)
    q_BxTxNxH = _dense(cfg, (n, h), -1, ("embed", "heads", "head_dim"), ("heads", "head_dim"), cfg.qkv_bias,
                       "q_proj")(xq_BxQxD)
    k_BxTxKxH = _dense(cfg, (k, h), -1, ("embed", "kv_heads", "head_dim"), ("kv_heads", "head_dim"), cfg.qkv_bias,
                       "k_proj")(x_BxTxD)
    v_BxTxKxH = _dense(cfg, (k, h), -1, ("embed", "kv_heads", "head_dim"), ("kv_heads", "head_dim"), cfg.qkv_bias,
                       "v_proj")(x_BxTxD)
    if cfg.qk_norm:
      q_BxTxNxH = Norm(cfg, "head_dim", name="q_norm")(q_BxTxNxH)
      k_BxTxKxH = Norm(cfg, "head_dim", name="k_norm")(k_BxTxKxH)
    if cfg.positions == "rope":
      inv_freq = rope_frequencies(cfg)
      if cfg.rope_local_theta is not None:  # Gemma 3: the sliding layers' own frequencies
        inv_freq = per_kind(sliding, lambda: rope_frequencies(cfg, local=True), lambda: inv_freq)
      q_BxTxNxH = apply_rope(q_BxTxNxH, q_positions_BxQ, inv_freq)
      k_BxTxKxH = apply_rope(k_BxTxKxH, positions_BxT, inv_freq)
    q_BxTxNxH = constrain(q_BxTxNxH, ("activation_batch", "activation_length", "activation_heads",
                                      "activation_head_dim"))
    scale = cfg.query_scale or 1.0 / math.sqrt(h)
    fused = kernels.fits(cfg.attention, x_BxTxD.shape[1], q_BxTxNxH.dtype, h) and layer_cache is None and (
        select_BxQ is None and cfg.sliding_window is None and cfg.attn_softcap is None)
    if fused:
      out_BxTxNxH, new_cache = kernels.attention(cfg.attention, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segments_BxT,
                                                 scale), None
    else:
      if layer_cache is not None:
        k_BxKxSxH, v_BxKxSxH, new_cache = write_cache(layer_cache, index, k_BxTxKxH, v_BxTxKxH)
      else:
        k_BxKxSxH, v_BxKxSxH, new_cache = k_BxTxKxH.swapaxes(1, 2), v_BxTxKxH.swapaxes(1, 2), None
      out_BxTxNxH = attention(q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, attn_mask_BxQxS, scale, cfg.attn_softcap)
    out_BxTxD = _dense(cfg, cfg.d_model, (-2, -1), ("heads", "head_dim", "embed"), ("embed",), cfg.out_bias,
                       "o_proj")(out_BxTxNxH)
    return out_BxTxD, new_cache


class Mlp(nn.Module):
  """SwiGLU (Llama family), GeGLU with tanh GELU (Gemma) or GELU-tanh (GPT-2) feed-forward block."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.config
    up = _dense(cfg, cfg.ff_dim, -1, ("embed", "mlp"), ("mlp",), cfg.mlp_bias, "up_proj")(x_BxTxD)
    if cfg.mlp in ("swiglu", "geglu"):
      gate = _dense(cfg, cfg.ff_dim, -1, ("embed", "mlp"), ("mlp",), cfg.mlp_bias, "gate_proj")(x_BxTxD)
      h_BxTxF = (nn.silu(gate) if cfg.mlp == "swiglu" else nn.gelu(gate, approximate=True)) * up
    else:
      h_BxTxF = nn.gelu(up, approximate=True)
    h_BxTxF = constrain(h_BxTxF, ("activation_batch", "activation_length", "activation_mlp"))
    return _dense(cfg, cfg.d_model, -1, ("mlp", "embed"), ("embed",), cfg.mlp_bias, "down_proj")(h_BxTxF)


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.)); with post_norms (Gemma 2/3)
  x + norm(attn(norm(x))), then + norm(mlp(norm(.)))."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, layer_cache, positions_BxT, masks, segments_BxT, index, sliding, select_BxQ=None):
    """`masks` = the (full, sliding-window) [B, T, S] attention masks, None where no layer uses one; `sliding` says
    which this layer uses (see per_kind). With `select_BxQ` the block's output is only at those positions (x_BxQxD;
    see Attention)."""
    cfg = self.config
    if not cfg.mixed_attention:  # every layer alike: decided here, whatever the scan passed
      sliding = cfg.is_sliding(0)
    full_BxTxS, window_BxTxS = masks
    attn_mask_BxQxS = per_kind(sliding, lambda: window_BxTxS, lambda: full_BxTxS)
    if select_BxQ is not None:
      attn_mask_BxQxS = jnp.take_along_axis(attn_mask_BxQxS, select_BxQ[..., None], axis=1)
    attn_out, new_cache = Attention(cfg, name="attn")(
        Norm(cfg, name="attn_norm")(x_BxTxD), positions_BxT, attn_mask_BxQxS, segments_BxT, layer_cache, index,
        select_BxQ, sliding)
    if cfg.post_norms:
      attn_out = Norm(cfg, name="attn_post_norm")(attn_out)
    if select_BxQ is not None:
      x_BxTxD = jnp.take_along_axis(x_BxTxD, select_BxQ[..., None], axis=1)
    x_BxTxD = x_BxTxD + attn_out
    mlp_out = Mlp(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x_BxTxD))
    if cfg.post_norms:
      mlp_out = Norm(cfg, name="mlp_post_norm")(mlp_out)
    x_BxTxD = x_BxTxD + mlp_out
    x_BxTxD = constrain(x_BxTxD, ("activation_batch", "activation_length", "activation_embed"))
    return x_BxTxD, new_cache


def per_kind(sliding, when_sliding, otherwise):
  """A layer's value by its attention kind: `sliding` is a Python bool (only that branch is built) or, for the one
  scanned layer of a model that mixes kinds, a traced bool (both built, selected elementwise)."""
  if isinstance(sliding, bool):
    return when_sliding() if sliding else otherwise()
  return jax.tree.map(lambda a, b: jnp.where(sliding, a, b), when_sliding(), otherwise())


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def attention_mask(query_slots, kv_mask_BxS, sliding_window: int | None):
  """[B, T, S] bool: key slot filled, not after the query slot, and inside the window; the query slots are
  [T] (every row alike) or [B, T] (a slot per row)."""
  key_slots_1x1xS = jnp.arange(kv_mask_BxS.shape[1])[None, None, :]
  query_Bx1xT = query_slots[None] if query_slots.ndim == 1 else query_slots
  allowed_BxTxS = key_slots_1x1xS <= query_Bx1xT[:, :, None]
  if sliding_window is not None:
    allowed_BxTxS &= key_slots_1x1xS > query_Bx1xT[:, :, None] - sliding_window
  return kv_mask_BxS[:, None, :] & allowed_BxTxS


class Transformer(nn.Module):
  """Decoder-only LM. Returns float32 logits, or final hidden states with `return_hidden`."""

  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                          embedding_init=_init(("vocab", "embed")))
    if cfg.positions == "learned":
      self.pos_embed = nn.Embed(cfg.max_seq_len, cfg.d_model, dtype=cfg.jnp_dtype,
                                param_dtype=cfg.jnp_param_dtype, embedding_init=_init(("length", "embed"), 0.01))
    block = Block
    if cfg.remat != "none":
      # unrolled, a layer's kind (argument 7, self being 0) stays a Python bool: only its own mask and rope are built
      block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers,
                       static_argnums=() if cfg.scan_layers else (7,))
    if cfg.scan_layers:
      self.layers = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True}, length=cfg.n_layers,
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
          metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
    else:
      self.layers = [block(cfg, name=f"layer_{i}") for i in range(cfg.n_layers)]
    self.final_norm = Norm(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = _dense(cfg, cfg.vocab_size, -1, ("embed", "vocab"), ("vocab",), False, "lm_head")

  def __call__(self, tokens_BxT, mask_BxT=None, positions_BxT=None, *, cache: Cache | None = None,
               return_hidden: bool = False, select_BxQ=None, segments_BxT=None):
    hidden_BxTxD, cache = self.hidden_states(tokens_BxT, mask_BxT, positions_BxT, cache=cache, select_BxQ=select_BxQ,
                                             segments_BxT=segments_BxT)
    out = hidden_BxTxD if return_hidden else self.unembed(hidden_BxTxD)
    return out if cache is None else (out, cache)

  def hidden_states(self, tokens_BxT, mask_BxT=None, positions_BxT=None, *, cache: Cache | None = None,
                    select_BxQ=None, segments_BxT=None):
    """Final hidden states [B, T, D], or [B, Q, D] at the positions `select_BxQ` only.

    `segments_BxT` (packed rows: 0 on padding, 1, 2, ... per example; without a cache) keeps attention
    inside each example; pass `positions_BxT` counting from 0 in each. Default: one segment per row.

    Selecting positions (a reward model reads one per row) lets the last layer compute queries,
    attention output and MLP for those positions alone: every layer's keys and values still
    cover the whole row, so the selected states equal the full pass's there. With scan_layers
    the last layer is not separate, so the whole pass runs and the positions are gathered after.
    """
    cfg = self.config
    batch, length = tokens_BxT.shape
    if mask_BxT is None:
      mask_BxT = jnp.ones((batch, length), bool)
    mask_BxT = mask_BxT.astype(bool)
    if cache is None:
      index = jnp.zeros((), jnp.int32)
      kv_mask_BxS, seen_B = mask_BxT, jnp.zeros((batch,), jnp.int32)
    else:
      index = cache.index
      if index.ndim:  # a write slot per row
        kv_mask_BxS = jax.vmap(lambda m_S, new_T, i: jax.lax.dynamic_update_slice(m_S, new_T, (i,)))(
            cache.mask_BxS, mask_BxT, index)
      else:
        kv_mask_BxS = jax.lax.dynamic_update_slice(cache.mask_BxS, mask_BxT, (0, index))
      seen_B = cache.mask_BxS.sum(-1, dtype=jnp.int32)
    if positions_BxT is None:
      positions_BxT = jnp.maximum(seen_B[:, None] + jnp.cumsum(mask_BxT, -1, dtype=jnp.int32) - 1, 0)
    slots_T = index[..., None] + jnp.arange(length)  # [T], or [B, T] with a slot per row
    sliding = [cfg.is_sliding(i) for i in range(cfg.n_layers)]
    masks = [attention_mask(slots_T, kv_mask_BxS, None) if not all(sliding) else None,  # full attention's and
             attention_mask(slots_T, kv_mask_BxS, cfg.sliding_window) if any(sliding) else None]  # the window's
    if segments_BxT is None:
      segments_BxT = mask_BxT.astype(jnp.int32)
    else:  # packed rows: the dense mask of the XLA path, like the kernels' segment ids
      same_BxTxS = segments_BxT[:, :, None] == segments_BxT[:, None, :]
      masks = [None if m is None else m & same_BxTxS for m in masks]
    masks = tuple(masks)

    x_BxTxD = self.embed(tokens_BxT)
    if cfg.embed_scale:  # Gemma: sqrt(d_model), rounded to the weights' dtype as in HF
      x_BxTxD = x_BxTxD * jnp.asarray(math.sqrt(cfg.d_model), cfg.jnp_param_dtype).astype(x_BxTxD.dtype)
    if cfg.positions == "learned":
      x_BxTxD = x_BxTxD + self.pos_embed(positions_BxT)
    x_BxTxD = constrain(x_BxTxD, ("activation_batch", "activation_length", "activation_embed"))

    kv = None if cache is None else (cache.k_LxBxKxSxH, cache.v_LxBxKxSxH)
    if cfg.scan_layers:
      x_BxTxD, new_kv = self.layers(x_BxTxD, kv, positions_BxT, masks, segments_BxT, index, jnp.asarray(sliding))
      if select_BxQ is not None:
        x_BxTxD = jnp.take_along_axis(x_BxTxD, select_BxQ[..., None], axis=1)
    else:
      new_kv = kv
      for i, layer in enumerate(self.layers):
        layer_kv = None if kv is None else (*new_kv, i)  # the stacked cache, written at layer i
        last = select_BxQ if i == len(self.layers) - 1 else None
        x_BxTxD, layer_new = layer(x_BxTxD, layer_kv, positions_BxT, masks, segments_BxT, index, sliding[i], last)
        new_kv = new_kv if kv is None else layer_new
    hidden_BxTxD = self.final_norm(x_BxTxD)
    if cache is not None:
      cache = Cache(k_LxBxKxSxH=new_kv[0], v_LxBxKxSxH=new_kv[1], mask_BxS=kv_mask_BxS, index=index + length)
    return hidden_BxTxD, cache

  def unembed(self, hidden_BxTxD):
    """Final hidden states -> float32 logits (tied or separate LM head; soft-capped for Gemma 2)."""
    if self.config.tie_embeddings:  # as one 2-D matmul, like Dense
      d = hidden_BxTxD.shape[-1]
      logits = self.embed.attend(hidden_BxTxD.reshape(-1, d)).reshape(*hidden_BxTxD.shape[:-1], -1)
    else:
      logits = self.lm_head(hidden_BxTxD)
    logits = logits.astype(jnp.float32)
    if self.config.logit_softcap is not None:  # Gemma 2
      logits = self.config.logit_softcap * jnp.tanh(logits / self.config.logit_softcap)
    return constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))


def init_params(config: ModelConfig, rng: Array):
  """Randomly initialised parameters (unboxed, no sharding metadata)."""
  tokens = jnp.zeros((1, 4), jnp.int32)
  variables = Transformer(config).init(rng, tokens)
  return nn.meta.unbox(variables["params"])
