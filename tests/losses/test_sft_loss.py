"""SFT loss and shared log-prob helpers against NumPy loops."""

import jax.numpy as jnp
import numpy as np

from references import sequence_logps, sft_loss, token_logps


def _numpy_token_logps(logits, tokens):
  out = np.zeros(tokens.shape)
  for b in range(tokens.shape[0]):
    for t in range(1, tokens.shape[1]):
      row = logits[b, t - 1].astype(np.float64)
      out[b, t] = row[tokens[b, t]] - (np.log(np.sum(np.exp(row - row.max()))) + row.max())
  return out


def test_token_logps_and_sft_loss_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
  tokens = rng.integers(0, 11, size=(3, 7))
  loss_mask = np.zeros((3, 7), bool)
  loss_mask[0, 3:] = True
  loss_mask[1, 1:5] = True
  loss_mask[2, 0:2] = True  # position 0 cannot be predicted: ignored
  ref = _numpy_token_logps(logits, tokens)
  np.testing.assert_allclose(token_logps(jnp.asarray(logits), jnp.asarray(tokens)), ref, atol=1e-5)
  mask = loss_mask.copy()
  mask[:, 0] = False
  loss, metrics = sft_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(loss_mask))
  np.testing.assert_allclose(loss, -ref[mask].mean(), rtol=1e-5)
  assert int(metrics["tokens"]) == mask.sum()
  np.testing.assert_allclose(sequence_logps(jnp.asarray(ref), jnp.asarray(mask)), (ref * mask).sum(1), rtol=1e-6)
  # a fixed normaliser scales the same sum
  loss_n, _ = sft_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(loss_mask), normalizer=100.0)
  np.testing.assert_allclose(loss_n, -ref[mask].sum() / 100, rtol=1e-5)


def test_masked_tokens_do_not_matter():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 6, 5)).astype(np.float32)
  tokens = rng.integers(0, 5, size=(2, 6))
  mask = np.array([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]], bool)
  base, _ = sft_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask))
  changed = logits.copy()
  changed[0, 4:] = 100.0  # logits at positions 4, 5 predict tokens 5, 6 of row 0: masked or absent
  tokens2 = tokens.copy()
  tokens2[0, 5] = (tokens[0, 5] + 1) % 5
  other, _ = sft_loss(jnp.asarray(changed), jnp.asarray(tokens2), jnp.asarray(mask))
  np.testing.assert_allclose(base, other, rtol=1e-6)
