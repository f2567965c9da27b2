"""Completion log-probs under a model, without materialising B x T x V logits when chunked.

  logps_B, mean_logits_B, tokens_B = completion_logps(model, params, tokens_BxT, mask_BxT, loss_mask_BxT,
                                                      chunk_size=128, window=64)

With `window=W`, only the W positions of each row that predict its completion go
through the last layer's queries and MLP and through the LM head (a per-row window
starting where the completion does), which is all the log-probs need when no
completion is longer than W tokens (`Truncation.max_completion_length`); a row whose
completion is longer gets NaN, never a partial sum. The final hidden states go
through the LM head `chunk_size` positions at a time inside a rematerialised
`lax.scan`: only one chunk's logits live at once, in the forward and in the
backward pass (the tiled LM head TRL uses, as a scan).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhfx.losses.common import target_mask
from rlhfx.models import Transformer

Array = jax.Array


def _chunk_stats(unembed, hidden_BxCxD, targets_BxC):
  logits_BxCxV = unembed(hidden_BxCxD)
  logz_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
  picked_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
  return picked_BxC - logz_BxC, logits_BxCxV.mean(-1)


def token_logps_and_mean_logits(model: Transformer, params, hidden_BxTxD: Array, tokens_BxT: Array,
                                chunk_size: int | None = None):
  """(logps_BxT, mean_logits_BxT): log p(tokens[t] | tokens[<t]) (0 at t=0) and the mean logit predicting t."""
  unembed = lambda h: model.apply({"params": params}, h, method=Transformer.unembed)  # noqa: E731
  hidden_BxSxD, targets_BxS = hidden_BxTxD[:, :-1], tokens_BxT[:, 1:]
  length = hidden_BxSxD.shape[1]
  if not chunk_size or chunk_size >= length:
    logps_BxS, mean_BxS = _chunk_stats(unembed, hidden_BxSxD, targets_BxS)
  else:
    pad = -length % chunk_size
    n = (length + pad) // chunk_size
    h = jnp.pad(hidden_BxSxD, ((0, 0), (0, pad), (0, 0)))
    t = jnp.pad(targets_BxS, ((0, 0), (0, pad)))
    h_NxBxCxD = h.reshape(h.shape[0], n, chunk_size, h.shape[-1]).swapaxes(0, 1)
    t_NxBxC = t.reshape(t.shape[0], n, chunk_size).swapaxes(0, 1)
    chunk = jax.checkpoint(lambda hc, tc: _chunk_stats(unembed, hc, tc))
    _, (logps_NxBxC, mean_NxBxC) = jax.lax.scan(lambda c, x: (c, chunk(*x)), None, (h_NxBxCxD, t_NxBxC))
    logps_BxS = logps_NxBxC.swapaxes(0, 1).reshape(h.shape[0], -1)[:, :length]
    mean_BxS = mean_NxBxC.swapaxes(0, 1).reshape(h.shape[0], -1)[:, :length]
  return jnp.pad(logps_BxS, ((0, 0), (1, 0))), jnp.pad(mean_BxS, ((0, 0), (1, 0)))


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
  logps_BxU, mean_BxU = token_logps_and_mean_logits(model, params, hidden_BxUxD, tokens_BxU, chunk_size)
  logps_B = jnp.sum(jnp.where(targets_BxU, logps_BxU, 0.0), axis=-1)
  logps_B = jnp.where(targets_BxU.sum(-1) == count_B, logps_B, jnp.nan)  # NaN: completion longer than the window
  mean_logits_B = jnp.sum(jnp.where(targets_BxU, mean_BxU, 0.0), axis=-1) / jnp.maximum(count_B, 1)
  return logps_B, jax.lax.stop_gradient(mean_logits_B), count_B
