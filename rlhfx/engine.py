"""Continuous batching with prefix sharing: S slots decode the B = N x G rows of N prompts, G samples each.

  result = engine.generate(params, config, prompt_NxP, prompt_mask_NxP, rng, group_size=G, slots=S,
                           max_new_tokens=C, temperature=1.0, eos_id=eos)
  result.tokens_BxC, result.mask_BxC, result.logps_BxC     # row r: prompt r // G (jnp.repeat's order)

Each prompt is prefilled once; a row admitted to a slot gets its prompt's keys and values
copied into the slot and samples its first token from the prompt's last logits. Every
step decodes one token in every busy slot; a row that emits EOS or reaches C tokens frees
its slot, and the next waiting row takes it. When no row waits and at most half the slots
are busy, the busy ones move into a batch half as wide (`STAGES` widths: S, S/2, S/4, S/8),
so a step costs what the rows still running cost. The program ends when every row is done.
With completions of varied length the slots stay busy, where the static sampler
(`rlhfx.sampling.generate`) keeps every row's place until the longest one ends.

Each row draws its own random stream (`sampling.token_keys`: the row's index and its
token's), and a slot computes what the row would compute anywhere else: a row's tokens are
the same whichever slot or step it ran in, and the same as the static sampler's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rlhfx.models.config import ModelConfig
from rlhfx.models.transformer import Cache, Transformer, init_cache
from rlhfx.sampling import SampleResult, sample_tokens, token_keys
from rlhfx.sharding import constrain

Array = jax.Array
STAGES = 4  # slot-batch widths S, S/2, ..., S / 2**(STAGES - 1): each a loop of its own in the program


def _narrow(state, width: int):
  """The state with its busy slots (at most `width`) moved, in order, into a batch of `width` slots."""
  cache, row_S, t_S, token_S, next_row, out = state
  keep_W = jnp.argsort(row_S < 0, stable=True)[:width]  # busy slots first
  cache = Cache(k_LxBxKxSxH=cache.k_LxBxKxSxH[:, keep_W], v_LxBxKxSxH=cache.v_LxBxKxSxH[:, keep_W],
                mask_BxS=cache.mask_BxS[keep_W], index=cache.index[keep_W])
  return cache, row_S[keep_W], t_S[keep_W], token_S[keep_W], next_row, out


@functools.partial(jax.jit, static_argnames=("config", "group_size", "slots", "max_new_tokens", "temperature",
                                             "top_k", "top_p", "eos_id", "pad_id"))
def generate(params, config: ModelConfig, prompt_NxP: Array, prompt_mask_NxP: Array, rng: Array, *,
             group_size: int, slots: int, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: int | None = None, pad_id: int = 0) -> SampleResult:
  """Sample `group_size` completions of each left-padded prompt in `slots` slots (temperature 0 = greedy)."""
  model = Transformer(config)
  n, p = prompt_NxP.shape
  rows, c = n * group_size, max_new_tokens
  s = min(slots, rows)
  if p + c > config.max_seq_len and config.positions == "learned":
    raise ValueError(f"prompt ({p}) + max_new_tokens ({c}) exceeds the model's max_seq_len={config.max_seq_len}")

  # each prompt once: its keys and values, and the logits its first tokens are drawn from
  hidden_NxPxD, prefix = model.apply({"params": params}, prompt_NxP, prompt_mask_NxP, cache=init_cache(config, n, p),
                                     return_hidden=True)
  first_logits_NxV = model.apply({"params": params}, hidden_NxPxD[:, -1], method=Transformer.unembed)

  def draw(logits_SxV, row_S, t_S):
    return sample_tokens(logits_SxV, token_keys(rng, jnp.maximum(row_S, 0), t_S), temperature, top_k, top_p)

  def record(out, row_S, t_S, token_S, logp_S, write_S):
    """Write each slot's token at (its row, t) where `write_S` (elsewhere: an index past the end, dropped).
    The outputs and the slots' few numbers are kept whole on every device (under a mesh): a step then moves
    S tokens between devices, not the outputs."""
    tokens_BxC, logps_BxC, mask_BxC = out
    row_S, t_S, token_S, logp_S, write_S = (constrain(x, (None,)) for x in (row_S, t_S, token_S, logp_S, write_S))
    at = (jnp.where(write_S, row_S, rows), t_S)
    return tuple(constrain(x, (None, None)) for x in (
        tokens_BxC.at[at].set(token_S, mode="drop"), logps_BxC.at[at].set(logp_S, mode="drop"),
        mask_BxC.at[at].set(True, mode="drop")))

  def ends(token_S, t_S):
    stop_S = t_S >= c - 1
    return stop_S | (token_S == eos_id) if eos_id is not None else stop_S

  def admit(state):
    """Free slots take the next waiting rows: prompt keys/values copied in, the first token drawn."""
    cache, row_S, t_S, token_S, next_row, out = state
    s = row_S.shape[0]
    free_S = row_S < 0
    new_row_S = next_row + jnp.cumsum(free_S) - 1
    take_S = free_S & (new_row_S < rows)
    prompt_S = jnp.where(take_S, new_row_S // group_size, 0)
    put = take_S[None, :, None, None, None]
    k = cache.k_LxBxKxSxH.at[:, :, :, :p].set(jnp.where(put, prefix.k_LxBxKxSxH[:, prompt_S],
                                                          cache.k_LxBxKxSxH[:, :, :, :p]))
    v = cache.v_LxBxKxSxH.at[:, :, :, :p].set(jnp.where(put, prefix.v_LxBxKxSxH[:, prompt_S],
                                                          cache.v_LxBxKxSxH[:, :, :, :p]))
    slot_mask_SxT = jnp.concatenate([prompt_mask_NxP[prompt_S], jnp.zeros((s, c), bool)], axis=1)
    cache = Cache(k_LxBxKxSxH=k, v_LxBxKxSxH=v,
                  mask_BxS=jnp.where(take_S[:, None], slot_mask_SxT, cache.mask_BxS),
                  index=jnp.where(take_S, p, cache.index))
    first_S, logp_S = draw(first_logits_NxV[prompt_S], new_row_S, jnp.zeros((s,), jnp.int32))
    out = record(out, new_row_S, jnp.zeros((s,), jnp.int32), first_S, logp_S, take_S)
    row_S = jnp.where(take_S & ~ends(first_S, jnp.zeros((s,), jnp.int32)), new_row_S, row_S)
    return (cache, row_S, jnp.where(take_S, 0, t_S), jnp.where(take_S, first_S, token_S),
            next_row + take_S.sum(), out)

  def admit_while_free(state):
    """Admit until no slot is free or no row waits (a row may end at its first token and free its slot)."""
    def waiting(st):
      return jnp.any(st[1] < 0) & (st[4] < rows)
    return jax.lax.while_loop(waiting, admit, state)

  def step(state):
    """One token in every busy slot; a row that ends frees its slot; free slots admit waiting rows."""
    cache, row_S, t_S, token_S, next_row, out = state
    busy_S = row_S >= 0
    logits_Sx1xV, new = model.apply({"params": params}, token_S[:, None], busy_S[:, None], cache=cache)
    cache = Cache(k_LxBxKxSxH=new.k_LxBxKxSxH, v_LxBxKxSxH=new.v_LxBxKxSxH, mask_BxS=new.mask_BxS,
                  index=jnp.where(busy_S, new.index, cache.index))
    t_S = t_S + 1
    token_S, logp_S = draw(logits_Sx1xV[:, 0], row_S, t_S)
    out = record(out, row_S, t_S, token_S, logp_S, busy_S)
    row_S = jnp.where(busy_S & ends(token_S, t_S), -1, row_S)
    return admit_while_free((cache, row_S, t_S, token_S, next_row, out))

  cache = init_cache(config, s, p + c)
  cache = Cache(k_LxBxKxSxH=cache.k_LxBxKxSxH, v_LxBxKxSxH=cache.v_LxBxKxSxH, mask_BxS=cache.mask_BxS,
                index=jnp.full((s,), p, jnp.int32))
  out = (jnp.full((rows, c), pad_id, jnp.int32), jnp.zeros((rows, c), jnp.float32), jnp.zeros((rows, c), bool))
  # every slot takes a row (one that ends at its first token leaves its slot to the first step's admission)
  state = admit((cache, jnp.full((s,), -1, jnp.int32), jnp.zeros((s,), jnp.int32), jnp.zeros((s,), jnp.int32),
                 jnp.int32(0), out))
  widths = [w for w in (s >> k for k in range(STAGES)) if w >= 1]
  for width, narrower in zip(widths, widths[1:] + [0]):
    def running(st, narrower=narrower):
      busy = jnp.sum(st[1] >= 0)
      unfinished = (busy > 0) | (st[4] < rows)
      return unfinished & ((st[4] < rows) | (busy > narrower))  # a narrower stage takes over the drained tail
    state = jax.lax.while_loop(running, step, state)
    if narrower:
      state = _narrow(state, narrower)
  tokens_BxC, logps_BxC, mask_BxC = state[5]
  return SampleResult(tokens_BxC=tokens_BxC, mask_BxC=mask_BxC, logps_BxC=logps_BxC)
