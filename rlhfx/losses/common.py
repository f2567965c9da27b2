"""Shared pieces of every loss: masked reductions, paired rows.

The arithmetic on logits (`logits_stats`) and `target_mask` live in `rlhfx.logprobs`, the one
place log-probs are computed; they are imported here for the losses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhfx.logprobs import target_mask  # noqa: F401 (for the losses)

Array = jax.Array


def masked_sum(x_BxT: Array, mask_BxT: Array) -> Array:
  return jnp.sum(jnp.where(mask_BxT, x_BxT, 0.0))


def masked_mean(x_BxT: Array, mask_BxT: Array) -> Array:
  return masked_sum(x_BxT, mask_BxT) / jnp.maximum(mask_BxT.sum(), 1)


def concat_pairs(batch: dict[str, Array]) -> tuple[Array, Array, Array]:
  """Chosen rows then rejected rows: (tokens_2BxT, mask_2BxT, loss_mask_2BxT) for one forward pass."""
  return tuple(jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)
               for k in ("tokens_BxT", "mask_BxT", "loss_mask_BxT"))


def padding_share(batch: dict[str, Array]) -> Array:
  """The share of a batch's token slots that are padding (every `*mask_BxT` but the loss masks)."""
  masks = [v for k, v in batch.items() if k.endswith("mask_BxT") and "loss" not in k]
  return 1.0 - sum(m.sum() for m in masks) / sum(m.size for m in masks)
