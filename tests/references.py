"""Log-probs of full logits, for the tests: the straightforward forms the library's chunked paths are checked
against (built on rlhfx.logprobs.logits_stats, itself checked against NumPy loops)."""

import jax.numpy as jnp

from rlhfx.logprobs import logits_stats
from rlhfx.losses.sft import sft_nll


def token_logps(logits_BxTxV, tokens_BxT):
  """logps_BxT[b, t] = log p(tokens[b, t] | tokens[b, :t]); position 0 (nothing to condition on) is 0."""
  return jnp.pad(logits_stats(logits_BxTxV[:, :-1], tokens_BxT[:, 1:])[0], ((0, 0), (1, 0)))


def sequence_logps(logps_BxT, mask_BxT):
  """Sum of token log-probs over the masked (completion) positions of each row -> logps_B."""
  return jnp.sum(jnp.where(mask_BxT, logps_BxT, 0.0), axis=-1)


def sft_loss(logits_BxTxV, tokens_BxT, loss_mask_BxT, *, normalizer=None):
  """Mean NLL of the completion tokens of full logits (rlhfx.losses.sft.sft_nll of `token_logps`)."""
  return sft_nll(token_logps(logits_BxTxV, tokens_BxT), loss_mask_BxT, normalizer=normalizer)


def entropy_from_logits(logits_BxCxV):
  """Per-token entropy of softmax(logits), as rlhfx.logprobs computes it beside the log-probs."""
  return logits_stats(logits_BxCxV, jnp.zeros(logits_BxCxV.shape[:-1], jnp.int32), entropy=True)[2]
