"""On-policy losses and estimators against NumPy loops written from the papers' formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from references import entropy_from_logits

from rlhfx.losses import policy as losses


def _batch(seed=0, b=5, c=9):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, c + 1, size=b)
  lengths[0] = c  # one full row
  mask = np.arange(c)[None, :] < lengths[:, None]
  return rng, mask


def _np_gae(rewards, values, mask, gamma, lam):
  b, c = rewards.shape
  adv = np.zeros((b, c))
  for i in range(b):
    n = int(mask[i].sum())
    last = 0.0
    for t in reversed(range(n)):
      next_value = values[i, t + 1] if t + 1 < n else 0.0
      delta = rewards[i, t] + gamma * next_value - values[i, t]
      last = delta + gamma * lam * last
      adv[i, t] = last
  return adv, np.where(mask, adv + values, 0.0)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_gae_equals_numpy_loop(gamma, lam):
  rng, mask = _batch()
  rewards, values = rng.normal(size=mask.shape), rng.normal(size=mask.shape)
  adv, ret = losses.gae(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32), jnp.asarray(mask),
                   gamma=gamma, lam=lam)
  want_adv, want_ret = _np_gae(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(adv, want_adv, atol=1e-5)
  np.testing.assert_allclose(ret, want_ret, atol=1e-5)
  assert np.all(np.asarray(adv)[~mask] == 0)


def test_whiten():
  rng, mask = _batch(1)
  x = rng.normal(size=mask.shape) * 3 + 2
  out = np.asarray(losses.whiten(jnp.asarray(x, jnp.float32), jnp.asarray(mask)))
  vals = x[mask]
  np.testing.assert_allclose(out[mask], (vals - vals.mean()) / vals.std(ddof=1), atol=1e-5)
  assert np.all(out[~mask] == 0)
  kept = np.asarray(losses.whiten(jnp.asarray(x, jnp.float32), jnp.asarray(mask), shift_mean=False))
  np.testing.assert_allclose(kept[mask], (vals - vals.mean()) / vals.std(ddof=1) + vals.mean(), atol=1e-5)


def test_kl_estimators():
  rng, _ = _batch()
  logp, ref = rng.normal(size=(4, 6)) - 3, rng.normal(size=(4, 6)) - 3
  log_r = ref - logp
  want = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": np.exp(log_r) - 1 - log_r}
  for name, value in want.items():
    np.testing.assert_allclose(losses.kl_estimate(jnp.asarray(logp), jnp.asarray(ref), name), value, rtol=1e-6,
                               atol=1e-6)
  assert np.all(np.asarray(losses.kl_estimate(jnp.asarray(logp), jnp.asarray(ref), "k3")) >= 0)
  # all three are exactly zero when policy = reference
  for name in losses.KL_ESTIMATORS:
    assert np.all(np.asarray(losses.kl_estimate(jnp.asarray(logp), jnp.asarray(logp), name)) == 0)
  # k1 and k3 are unbiased estimators of the true KL when tokens come from the policy
  p, q = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.5, 0.3])
  tokens = np.random.default_rng(0).choice(3, size=200_000, p=p)
  true_kl = np.sum(p * np.log(p / q))
  for name in ("k1", "k3"):
    est = np.asarray(losses.kl_estimate(jnp.log(p[tokens]), jnp.log(q[tokens]), name)).mean()
    assert abs(est - true_kl) < 0.01, (name, est, true_kl)


def test_kl_penalized_rewards():
  rng, mask = _batch(2)
  kl, scores = rng.normal(size=mask.shape), rng.normal(size=mask.shape[0])
  rewards, non_score = losses.kl_penalized_rewards(jnp.asarray(scores), jnp.asarray(kl), jnp.asarray(mask), kl_coef=0.3)
  want = np.where(mask, -0.3 * kl, 0.0)
  np.testing.assert_allclose(non_score, want, atol=1e-6)
  for i, n in enumerate(mask.sum(-1)):
    want[i, n - 1] += scores[i]
  np.testing.assert_allclose(rewards, want, atol=1e-6)
  # per sequence: the row's summed penalty on its last real token, the same total
  rewards, non_score = losses.kl_penalized_rewards(jnp.asarray(scores), jnp.asarray(kl), jnp.asarray(mask), kl_coef=0.3,
                                              per_sequence=True)
  want = np.zeros(mask.shape)
  for i, n in enumerate(mask.sum(-1)):
    want[i, n - 1] = -0.3 * kl[i, :n].sum()
  np.testing.assert_allclose(non_score, want, atol=1e-5)
  want[np.arange(len(scores)), mask.sum(-1) - 1] += scores
  np.testing.assert_allclose(rewards, want, atol=1e-5)


def test_adaptive_kl_moves_toward_target():
  ctl = losses.AdaptiveKL(target=6.0, horizon=10_000)
  coef = jnp.float32(0.1)
  up = ctl.update(coef, jnp.float32(12.0), 512)  # KL above target: stronger penalty
  down = ctl.update(coef, jnp.float32(3.0), 512)  # below: weaker
  same = ctl.update(coef, jnp.float32(6.0), 512)
  np.testing.assert_allclose(up, 0.1 * (1 + 0.2 * 512 / 10_000), rtol=1e-6)  # error clipped at +0.2
  np.testing.assert_allclose(down, 0.1 * (1 - 0.2 * 512 / 10_000), rtol=1e-6)  # error -0.5 clipped
  np.testing.assert_allclose(same, 0.1, rtol=1e-6)
  # iterated, a policy whose KL responds to the coefficient settles at the target
  kl_of = lambda c: 0.6 / c  # noqa: E731  (a stronger penalty -> smaller KL)
  for _ in range(400):
    coef = ctl.update(coef, kl_of(coef), 2000)
  np.testing.assert_allclose(kl_of(float(coef)), 6.0, rtol=0.02)


def _np_ppo(logp, old, adv, mask, eps, dual):
  ratio = np.exp(logp - old)
  loss = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps))
  if dual is not None:
    loss = np.where(adv < 0, np.minimum(loss, -dual * adv), loss)
  return loss


@pytest.mark.parametrize("how", losses.AGGREGATIONS)
@pytest.mark.parametrize("dual", [None, 3.0])
def test_ppo_policy_loss(how, dual):
  rng, mask = _batch(3)
  logp, old = rng.normal(size=mask.shape) * 0.5 - 2, rng.normal(size=mask.shape) * 0.5 - 2
  adv = rng.normal(size=mask.shape) * 2
  per_token = _np_ppo(logp, old, adv, mask, 0.2, dual)
  want = {"token_mean": per_token[mask].mean(),
          "sequence_mean": np.mean([per_token[i, mask[i]].mean() for i in range(len(mask))]),
          "fixed": np.where(mask, per_token, 0).sum() / (len(mask) * 16)}[how]
  loss, m = losses.ppo_policy_loss(*(jnp.asarray(a, jnp.float32) for a in (logp, old, adv)), jnp.asarray(mask),
                              clip_eps=0.2, dual_clip=dual, aggregation=how, normaliser=16)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  ratio = np.exp(logp - old)
  clipped = -adv * np.clip(ratio, 0.8, 1.2) > -adv * ratio
  np.testing.assert_allclose(m["clipfrac"], clipped[mask].mean(), rtol=1e-6)
  np.testing.assert_allclose(m["approxkl"], (0.5 * (logp - old) ** 2)[mask].mean(), rtol=1e-5)


def test_ppo_gradient_is_zero_outside_the_clip_region():
  adv = jnp.array([[1.0, -1.0]])
  old = jnp.zeros((1, 2))
  mask = jnp.ones((1, 2), bool)
  # ratio e^0.5 > 1.2 with A > 0: clipped, no gradient; ratio e^0.5 with A < 0: unclipped, gradient
  grad = jax.grad(lambda lp: losses.ppo_policy_loss(lp, old, adv, mask)[0])(jnp.array([[0.5, 0.5]]))
  assert grad[0, 0] == 0 and grad[0, 1] != 0


@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss(clip):
  rng, mask = _batch(4)
  v, old, ret = (rng.normal(size=mask.shape) for _ in range(3))
  if clip is None:
    per = (v - ret) ** 2
  else:
    per = np.maximum((v - ret) ** 2, (old + np.clip(v - old, -clip, clip) - ret) ** 2)
  loss, m = losses.value_loss(*(jnp.asarray(a, jnp.float32) for a in (v, old, ret)), jnp.asarray(mask), clip_range=clip)
  np.testing.assert_allclose(loss, 0.5 * per[mask].mean(), rtol=1e-5)


def test_group_advantages():
  rng = np.random.default_rng(5)
  r = rng.normal(size=(3, 4))
  flat = jnp.asarray(r.reshape(-1), jnp.float32)
  mean = r.mean(-1, keepdims=True)
  np.testing.assert_allclose(losses.group_advantages(flat, 4, kind="grpo"),
                             ((r - mean) / (r.std(-1, ddof=1, keepdims=True) + 1e-4)).reshape(-1), rtol=1e-5)
  np.testing.assert_allclose(losses.group_advantages(flat, 4, kind="dr_grpo"), (r - mean).reshape(-1), atol=1e-6)
  loo = np.array([[r[i, j] - np.delete(r[i], j).mean() for j in range(4)] for i in range(3)])
  np.testing.assert_allclose(losses.group_advantages(flat, 4, kind="rloo"), loo.reshape(-1), atol=1e-5)
  # a group whose samples all score the same carries no signal
  assert np.all(np.asarray(losses.group_advantages(jnp.ones(8), 4, kind="grpo")) == 0)


def test_entropy_from_logits():
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(2, 3, 7)) * 2
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(entropy_from_logits(jnp.asarray(logits, jnp.float32)), -(p * np.log(p)).sum(-1),
                             rtol=1e-5)


def test_bad_names_are_refused():
  with pytest.raises(ValueError, match="aggregation"):
    losses.aggregate(jnp.ones((1, 2)), jnp.ones((1, 2), bool), "mean")
  with pytest.raises(ValueError, match="normaliser"):
    losses.aggregate(jnp.ones((1, 2)), jnp.ones((1, 2), bool), "fixed")
  with pytest.raises(ValueError, match="estimator"):
    losses.kl_estimate(jnp.ones(2), jnp.ones(2), "k4")
