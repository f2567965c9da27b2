"""Batched autoregressive sampling with a KV cache, as one compiled program.

  result = sampling.generate(params, config, prompt_BxP, prompt_mask_BxP, rng,
                             max_new_tokens=64, temperature=1.0, top_k=0, top_p=1.0)
  result.tokens_BxC, result.mask_BxC, result.logps_BxC

Prompts are left-padded (`pad_prompts` does it): every row then writes its next
token into the same cache slot, and positions count only real tokens, so a
padded prompt produces the same tokens as the prompt alone. The prompt is
prefilled once; decoding is a `lax.while_loop` that stops when every row has
emitted EOS or `max_new_tokens` is reached.

A decode step attends over the cache slots written so far, not the whole length:
the steps run in `cache_buckets` loops, each over a cache just long enough for its
steps (prompt + its share of max_new_tokens), grown between loops. The slots not
yet written are masked either way, so the tokens are those of one loop over the
full cache.

`logps_BxC` are log-probabilities of the sampled tokens under softmax(logits /
temperature) before top-k/top-p filtering (temperature 1 when greedy) — the
quantity a PPO update recomputes from the policy.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlhfx.models.config import ModelConfig
from rlhfx.models.transformer import Cache, Transformer, init_cache

Array = jax.Array


@flax.struct.dataclass
class SampleResult:
  tokens_BxC: Array  # generated tokens; pad_id after a row's EOS
  mask_BxC: Array  # True on generated tokens up to and including EOS
  logps_BxC: Array  # log p(token) of each generated token (0 where masked)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0, length: int | None = None):
  """Left-pad token lists to one length -> (tokens_BxP int32, mask_BxP bool) numpy arrays."""
  length = length or max(len(p) for p in prompts)
  if any(len(p) > length for p in prompts):
    raise ValueError(f"a prompt is longer than length={length}")
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), bool)
  for i, prompt in enumerate(prompts):
    if len(prompt):
      tokens[i, length - len(prompt):] = prompt
      mask[i, length - len(prompt):] = True
  return tokens, mask


def filter_logits(logits_BxV: Array, *, top_k: int = 0, top_p: float = 1.0) -> Array:
  """Set logits outside the top-k / nucleus (Holtzman et al. 2020) set to -inf."""
  if top_k and top_k < logits_BxV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_B1, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    # smallest logit still needed to reach mass top_p (the first token is always kept)
    keep_BxV = mass_before_BxV < top_p
    threshold_B1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < threshold_B1, -jnp.inf, logits_BxV)
  return logits_BxV


def categorical(keys_B: Array, logits_BxV: Array) -> Array:
  """token_B ~ softmax(logits_BxV) by inverting the CDF with one uniform draw per row, from the row's own key.

  The same distribution as `jax.random.categorical`, whose Gumbel-max trick draws V
  random numbers per row: on CPU that threefry call cost more than a tiny model's
  whole decode step (BENCHMARKS.md). Tokens with zero probability (-inf logits) never
  come out: the CDF does not rise at them.
  """
  cdf_BxV = jnp.cumsum(jax.nn.softmax(logits_BxV.astype(jnp.float32), axis=-1), axis=-1)
  u_Bx1 = jax.vmap(jax.random.uniform)(keys_B)[:, None] * cdf_BxV[:, -1:]
  return jnp.minimum(jnp.sum(cdf_BxV <= u_Bx1, axis=-1), logits_BxV.shape[-1] - 1).astype(jnp.int32)


def token_keys(rng: Array, rows_B: Array, t_B: Array) -> Array:
  """The key of row `rows_B`'s token `t_B`: each row draws its own stream, so its tokens do not depend on
  which other rows share its batch, slot or step (the static sampler and the engine agree token for token)."""
  return jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(rng, r), t))(rows_B, t_B)


def sample_tokens(logits_BxV, keys_B, temperature: float, top_k: int, top_p: float):
  """(token_B, logp_B) from last-position logits, row b drawing from keys_B[b]."""
  if temperature == 0.0:
    token_B = jnp.argmax(logits_BxV, axis=-1)
    scaled_BxV = logits_BxV
  else:
    scaled_BxV = logits_BxV / temperature
    token_B = categorical(keys_B, filter_logits(scaled_BxV, top_k=top_k, top_p=top_p))
  logp_B = jnp.take_along_axis(jax.nn.log_softmax(scaled_BxV, axis=-1), token_B[:, None], axis=-1)[:, 0]
  return token_B.astype(jnp.int32), logp_B


def cache_lengths(prompt_len: int, max_new_tokens: int, buckets: int) -> list[int]:
  """The cache length of each decode loop: the prompt plus an equal share of the new tokens per loop (a
  multiple of 128 slots from 512 new tokens on, the TPU's lane width), the last one the whole length."""
  step = -(-max_new_tokens // max(buckets, 1))
  if max_new_tokens >= 512:
    step = -(-step // 128) * 128
  ends = sorted({min(max_new_tokens, step * (b + 1)) for b in range(max(buckets, 1))})
  return [prompt_len + e for e in ends]


def _grow(cache: Cache, length: int) -> Cache:
  """The cache with unwritten (masked) slots appended up to `length`."""
  pad = length - cache.mask_BxS.shape[1]
  slots = [(0, 0)] * 3 + [(0, pad), (0, 0)]
  return Cache(k_LxBxKxSxH=jnp.pad(cache.k_LxBxKxSxH, slots), v_LxBxKxSxH=jnp.pad(cache.v_LxBxKxSxH, slots),
               mask_BxS=jnp.pad(cache.mask_BxS, ((0, 0), (0, pad))), index=cache.index)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "temperature", "top_k", "top_p",
                                             "eos_id", "pad_id", "cache_buckets"))
def generate(params, config: ModelConfig, prompt_BxP: Array, prompt_mask_BxP: Array, rng: Array, *,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: int | None = None, pad_id: int = 0, cache_buckets: int = 1) -> SampleResult:
  """Sample up to `max_new_tokens` after left-padded prompts (temperature 0 = greedy)."""
  model = Transformer(config)
  batch, prompt_len = prompt_BxP.shape
  if prompt_len + max_new_tokens > config.max_seq_len and config.positions == "learned":
    raise ValueError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                     f"max_seq_len={config.max_seq_len}")
  lengths = cache_lengths(prompt_len, max_new_tokens, cache_buckets)
  cache = init_cache(config, batch, lengths[0])
  # Prefill: only the last prompt position goes through the LM head.
  hidden_BxPxD, cache = model.apply({"params": params}, prompt_BxP, prompt_mask_BxP, cache=cache,
                                    return_hidden=True)
  logits_BxV = model.apply({"params": params}, hidden_BxPxD[:, -1], method=Transformer.unembed)
  rows_B = jnp.arange(batch)

  def draw(logits_BxV, t):
    return sample_tokens(logits_BxV, token_keys(rng, rows_B, jnp.full((batch,), t)), temperature, top_k, top_p)

  token_B, logp_B = draw(logits_BxV, 0)

  tokens_BxC = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
  logps_BxC = jnp.zeros((batch, max_new_tokens), jnp.float32)
  mask_BxC = jnp.zeros((batch, max_new_tokens), bool)
  done_B = jnp.zeros((batch,), bool)

  def record(t, token_B, logp_B, done_B, tokens_BxC, logps_BxC, mask_BxC):
    live_B = ~done_B
    tokens_BxC = tokens_BxC.at[:, t].set(jnp.where(live_B, token_B, pad_id))
    logps_BxC = logps_BxC.at[:, t].set(jnp.where(live_B, logp_B, 0.0))
    mask_BxC = mask_BxC.at[:, t].set(live_B)
    if eos_id is not None:
      done_B = done_B | (token_B == eos_id)
    return done_B, tokens_BxC, logps_BxC, mask_BxC

  state = (token_B, cache, *record(0, token_B, logp_B, done_B, tokens_BxC, logps_BxC, mask_BxC))

  # step t feeds token t (written at slot prompt_len + t) and samples token t + 1; a loop over a cache of
  # length L runs the steps t0 .. L - prompt_len - 1, counting i from 0 (t = t0 + i): a loop entered with
  # rows left to finish starts at t0, one entered with none runs no step
  t0 = 0
  for length in lengths:
    state = (state[0], _grow(state[1], length), *state[2:])

    def cond(carry, t0=t0, steps=length - prompt_len - t0):
      i, (_, _, done_B, *_) = carry
      return (t0 + i + 1 < max_new_tokens) & (i < steps) & ~jnp.all(done_B)

    def body(carry, t0=t0):
      i, (token_B, cache, done_B, tokens_BxC, logps_BxC, mask_BxC) = carry
      logits_Bx1xV, cache = model.apply({"params": params}, token_B[:, None], ~done_B[:, None], cache=cache)
      t = t0 + i + 1
      token_B, logp_B = draw(logits_Bx1xV[:, 0], t)
      return i + 1, (token_B, cache, *record(t, token_B, logp_B, done_B, tokens_BxC, logps_BxC, mask_BxC))

    state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]
    t0 = length - prompt_len
  *_, tokens_BxC, logps_BxC, mask_BxC = state
  return SampleResult(tokens_BxC=tokens_BxC, mask_BxC=mask_BxC, logps_BxC=logps_BxC)
