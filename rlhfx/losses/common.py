"""Shared pieces of every loss: log-probs from logits (the one place they are computed), masked reductions."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


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


def token_logps(logits_BxTxV: Array, tokens_BxT: Array) -> Array:
  """logps_BxT[b, t] = log p(tokens[b, t] | tokens[b, :t]); position 0 (nothing to condition on) is 0."""
  logps_BxS = logits_stats(logits_BxTxV[:, :-1], tokens_BxT[:, 1:])[0]
  return jnp.pad(logps_BxS, ((0, 0), (1, 0)))


def target_mask(loss_mask_BxT: Array) -> Array:
  """The loss mask without position 0, which no logit predicts."""
  return jnp.asarray(loss_mask_BxT).at[:, 0].set(False)


def masked_sum(x_BxT: Array, mask_BxT: Array) -> Array:
  return jnp.sum(jnp.where(mask_BxT, x_BxT, 0.0))


def masked_mean(x_BxT: Array, mask_BxT: Array) -> Array:
  return masked_sum(x_BxT, mask_BxT) / jnp.maximum(mask_BxT.sum(), 1)


def sequence_logps(logps_BxT: Array, mask_BxT: Array) -> Array:
  """Sum of token log-probs over the masked (completion) positions of each row -> logps_B."""
  return jnp.sum(jnp.where(mask_BxT, logps_BxT, 0.0), axis=-1)


def concat_pairs(batch: dict[str, Array]) -> tuple[Array, Array, Array]:
  """Chosen rows then rejected rows: (tokens_2BxT, mask_2BxT, loss_mask_2BxT) for one forward pass."""
  return tuple(jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)
               for k in ("tokens_BxT", "mask_BxT", "loss_mask_BxT"))
