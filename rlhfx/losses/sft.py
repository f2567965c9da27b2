"""Supervised fine-tuning: masked next-token negative log-likelihood."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhfx.losses.common import masked_sum, target_mask

Array = jax.Array


def sft_nll(logps_BxT: Array, loss_mask_BxT: Array, *, normalizer: Array | float | None = None):
  """Mean NLL of completion tokens, -sum_t mask_t log p(x_t | x_<t) / normalizer, from token log-probs
  (logps_BxT[t] = log p(x_t | x_<t), rlhfx.logprobs): (loss, {nll_sum, tokens}).

  `normalizer` defaults to this batch's completion-token count; gradient accumulation passes
  the count of the whole global batch so that k micro-batches of b equal one batch of k*b exactly.
  """
  mask_BxT = target_mask(loss_mask_BxT)
  nll_sum = -masked_sum(logps_BxT, mask_BxT)
  tokens = mask_BxT.sum()
  normalizer = jnp.maximum(tokens, 1) if normalizer is None else normalizer
  return nll_sum / normalizer, {"nll_sum": nll_sum, "tokens": tokens}
