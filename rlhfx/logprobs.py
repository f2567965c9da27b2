"""Log-probs of tokens under a model: the one function every algorithm uses, chunked so the logits never
exist whole.

  logps_BxS, mean_logits_BxS, entropy_BxS = target_logps(model, params, hidden_BxSxD, targets_BxS,
                                                         chunk_size=128, temperature=1.0, entropy=False)
  logps_B, mean_logits_B, tokens_B = completion_logps(model, params, tokens_BxT, mask_BxT, loss_mask_BxT,
                                                      chunk_size=128, window=64)
  logps_BxS, mean_logits_BxS = row_logps(model, params, batch, chunk_size=128)      # every next token (SFT, packed)

`target_logps` takes final hidden states and the token each one predicts (SFT: every
position; DPO/KTO: the completion; PPO/GRPO: the sampled completion under the sampling
temperature). The hidden states go through the LM head `chunk_size` positions at a time
inside a rematerialised `lax.scan`: only one chunk's [B, chunk, V] logits live at once, in
the forward and in the backward pass (the tiled LM head TRL uses, as a scan). The
arithmetic on the logits is `logits_stats`, here and for the losses that take full logits.

With `window=W`, `completion_logps` sends only the W positions of each row that predict
its completion through the last layer's queries and MLP and through the LM head (a
per-row window starting where the completion does), which is all the log-probs need when
no completion is longer than W tokens (`Truncation.max_completion_length`); a row whose
completion is longer gets NaN, never a partial sum.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rlhfx.models import Transformer

Array = jax.Array


def target_mask(loss_mask_BxT: Array) -> Array:
  """The loss mask without position 0, which no logit predicts."""
  return jnp.asarray(loss_mask_BxT).at[:, 0].set(False)


def logits_stats(logits_BxSxV: Array, targets_BxS: Array, *, temperature: float = 1.0, entropy: bool = False):
  """(logps_BxS, mean_logits_BxS, entropy_BxS or None) in float32: log p(targets) under softmax(logits / T),
  the mean raw logit over the vocabulary (a metric), and the entropy of softmax(logits / T)."""
  logits_BxSxV = logits_BxSxV.astype(jnp.float32)
  mean_BxS = logits_BxSxV.mean(-1)
  if temperature != 1.0:
    logits_BxSxV = logits_BxSxV / temperature
  logz_BxS = jax.nn.logsumexp(logits_BxSxV, axis=-1)
  picked_BxS = jnp.take_along_axis(logits_BxSxV, targets_BxS[..., None], axis=-1)[..., 0]
  ent_BxS = None
  if entropy:
    p_BxSxV = jnp.exp(logits_BxSxV - logz_BxS[..., None])
    ent_BxS = logz_BxS - jnp.sum(p_BxSxV * logits_BxSxV, axis=-1)
  return picked_BxS - logz_BxS, mean_BxS, ent_BxS


def _chunk(model: Transformer, params, hidden_BxCxD, targets_BxC, *, temperature: float, entropy: bool):
  logits_BxCxV = model.apply({"params": params}, hidden_BxCxD, method=Transformer.unembed)
  logps_BxC, mean_BxC, ent_BxC = logits_stats(logits_BxCxV, targets_BxC, temperature=temperature, entropy=entropy)
  return logps_BxC, mean_BxC, jnp.zeros_like(logps_BxC) if ent_BxC is None else ent_BxC


def target_logps(model: Transformer, params, hidden_BxSxD: Array, targets_BxS: Array, *,
                 chunk_size: int | None = None, temperature: float = 1.0, entropy: bool = False):
  """(logps_BxS, mean_logits_BxS, entropy_BxS or None): log p(targets[s] | hidden[s]) under softmax(logits / T)."""
  stats = functools.partial(_chunk, model, params, temperature=temperature or 1.0, entropy=entropy)
  length = hidden_BxSxD.shape[1]
  if not chunk_size or chunk_size >= length:
    logps_BxS, mean_BxS, ent_BxS = stats(hidden_BxSxD, targets_BxS)
  else:
    pad = -length % chunk_size
    n = (length + pad) // chunk_size
    h = jnp.pad(hidden_BxSxD, ((0, 0), (0, pad), (0, 0)))
    t = jnp.pad(targets_BxS, ((0, 0), (0, pad)))
    h_NxBxCxD = h.reshape(h.shape[0], n, chunk_size, h.shape[-1]).swapaxes(0, 1)
    t_NxBxC = t.reshape(t.shape[0], n, chunk_size).swapaxes(0, 1)
    chunk = jax.checkpoint(stats)
    _, outs_NxBxC = jax.lax.scan(lambda c, x: (c, chunk(*x)), None, (h_NxBxCxD, t_NxBxC))
    logps_BxS, mean_BxS, ent_BxS = (x.swapaxes(0, 1).reshape(h.shape[0], -1)[:, :length] for x in outs_NxBxC)
  return logps_BxS, mean_BxS, ent_BxS if entropy else None


def row_logps(model: Transformer, params, batch: dict[str, Array], *, chunk_size: int | None = None):
  """(logps_BxS, mean_logits_BxS) of every next token of a batch's rows, S = T - 1: position s holds
  log p(tokens[s + 1] | tokens[:s + 1]). A packed batch's `segments_BxT` and `positions_BxT` keep attention and
  positions inside each sequence."""
  tokens_BxT = batch["tokens_BxT"]
  hidden_BxTxD = model.apply({"params": params}, tokens_BxT, batch["mask_BxT"], batch.get("positions_BxT"),
                             return_hidden=True, segments_BxT=batch.get("segments_BxT"))
  return target_logps(model, params, hidden_BxTxD[:, :-1], tokens_BxT[:, 1:], chunk_size=chunk_size)[:2]


def completion_window(loss_mask_BxT: Array, window: int) -> Array:
  """positions_BxW1: per row, the `window` + 1 positions s..s+W from the one before its first completion token.

  The hidden states at s..s+W-1 predict tokens s+1..s+W. The start s is clamped so the window
  stays inside the row; it then still covers every position after s.
  """
  length = loss_mask_BxT.shape[1]
  first_B = jnp.argmax(loss_mask_BxT, axis=-1).astype(jnp.int32)
  start_B = jnp.clip(first_B - 1, 0, length - window - 1)
  return start_B[:, None] + jnp.arange(window + 1, dtype=jnp.int32)


def completion_logps(model: Transformer, params, tokens_BxT: Array, mask_BxT: Array, loss_mask_BxT: Array, *,
                     chunk_size: int | None = None, window: int | None = None):
  """(sum of completion log-probs_B, mean logit over completion positions_B, completion tokens_B)."""
  targets_BxT = target_mask(loss_mask_BxT)
  count_B = targets_BxT.sum(-1)
  # U: the positions used, the whole row or the completion window; with a window the model's
  # last layer computes only those positions (Transformer select_BxQ) and so does the LM head
  select_BxU = None
  tokens_BxU, targets_BxU = tokens_BxT, targets_BxT
  if window and window + 1 < tokens_BxT.shape[1]:
    select_BxU = completion_window(targets_BxT, window)
    tokens_BxU = jnp.take_along_axis(tokens_BxT, select_BxU, axis=1)
    # slot 0 is context (a prompt token), never a target
    targets_BxU = target_mask(jnp.take_along_axis(targets_BxT, select_BxU, axis=1))
  hidden_BxUxD = model.apply({"params": params}, tokens_BxT, mask_BxT, return_hidden=True, select_BxQ=select_BxU)
  logps_BxS, mean_BxS, _ = target_logps(model, params, hidden_BxUxD[:, :-1], tokens_BxU[:, 1:],
                                        chunk_size=chunk_size)
  targets_BxS = targets_BxU[:, 1:]
  logps_B = jnp.sum(jnp.where(targets_BxS, logps_BxS, 0.0), axis=-1)
  logps_B = jnp.where(targets_BxS.sum(-1) == count_B, logps_B, jnp.nan)  # NaN: completion longer than the window
  mean_logits_B = jnp.sum(jnp.where(targets_BxS, mean_BxS, 0.0), axis=-1) / jnp.maximum(count_B, 1)
  return logps_B, jax.lax.stop_gradient(mean_logits_B), count_B
