"""Preference losses against NumPy references, and the properties the papers state."""

import jax.numpy as jnp
import numpy as np
import pytest

from rlhfx.losses import preference as P
from rlhfx.losses.reward import bradley_terry_loss


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _inputs(seed=0, n=16):
  rng = np.random.default_rng(seed)
  a = {k: rng.normal(size=n) * 5 - 20 for k in ("pc", "pr", "rc", "rr")}
  a["lc"], a["lr"] = rng.integers(3, 30, size=n).astype(np.float64), rng.integers(3, 30, size=n).astype(np.float64)
  x = P.PairLogps(chosen_B=jnp.asarray(a["pc"], jnp.float32), rejected_B=jnp.asarray(a["pr"], jnp.float32),
                  ref_chosen_B=jnp.asarray(a["rc"], jnp.float32), ref_rejected_B=jnp.asarray(a["rr"], jnp.float32),
                  chosen_tokens_B=jnp.asarray(a["lc"], jnp.float32),
                  rejected_tokens_B=jnp.asarray(a["lr"], jnp.float32))
  return a, x


def _h(a):
  return (a["pc"] - a["rc"]) - (a["pr"] - a["rr"])


REFERENCES = {
    "sigmoid": (dict(beta=0.3, label_smoothing=0.1),
                lambda a, beta, label_smoothing: np.mean(-(1 - label_smoothing) * _log_sigmoid(beta * _h(a))
                                                         - label_smoothing * _log_sigmoid(-beta * _h(a)))),
    "robust": (dict(beta=0.3, label_smoothing=0.2),
               lambda a, beta, label_smoothing: np.mean((-(1 - label_smoothing) * _log_sigmoid(beta * _h(a))
                                                         + label_smoothing * _log_sigmoid(-beta * _h(a)))
                                                        / (1 - 2 * label_smoothing))),
    "ipo": (dict(beta=0.5), lambda a, beta: np.mean(((a["pc"] - a["rc"]) / a["lc"] - (a["pr"] - a["rr"]) / a["lr"]
                                                     - 1 / (2 * beta)) ** 2)),
    "ipo_sum": (dict(beta=0.5), lambda a, beta: np.mean((_h(a) - 1 / (2 * beta)) ** 2)),
    "sigmoid_norm": (dict(beta=0.5), lambda a, beta: np.mean(-_log_sigmoid(
        beta * ((a["pc"] - a["rc"]) / a["lc"] - (a["pr"] - a["rr"]) / a["lr"])))),
    "exo_pair": (dict(beta=0.3, label_smoothing=0.01),
                 lambda a, beta, label_smoothing: np.mean(
                     _sigmoid(beta * _h(a)) * (_log_sigmoid(beta * _h(a)) - np.log(1 - label_smoothing))
                     + _sigmoid(-beta * _h(a)) * (_log_sigmoid(-beta * _h(a)) - np.log(label_smoothing)))),
    "nca_pair": (dict(beta=0.3), lambda a, beta: np.mean(-_log_sigmoid(beta * (a["pc"] - a["rc"]))
                                                          - 0.5 * _log_sigmoid(-beta * (a["pc"] - a["rc"]))
                                                          - 0.5 * _log_sigmoid(-beta * (a["pr"] - a["rr"])))),
    "bco_pair": (dict(beta=0.3), lambda a, beta: np.mean(-_log_sigmoid(beta * (a["pc"] - a["rc"]))
                                                          - _log_sigmoid(-beta * (a["pr"] - a["rr"])))),
    "sppo_hard": (dict(beta=0.3), lambda a, beta: np.mean((a["pc"] - a["rc"] - 0.5 / beta) ** 2
                                                           + (a["pr"] - a["rr"] + 0.5 / beta) ** 2)),
    "apo_zero": (dict(beta=0.3), lambda a, beta: np.mean(1 - _sigmoid(beta * (a["pc"] - a["rc"]))
                                                          + _sigmoid(beta * (a["pr"] - a["rr"])))),
    "apo_down": (dict(beta=0.3), lambda a, beta: np.mean(_sigmoid(beta * (a["pc"] - a["rc"])) + 1
                                                          - _sigmoid(beta * _h(a)))),
    "discopop": (dict(beta=0.05, discopop_tau=0.5),
                 lambda a, beta, discopop_tau: np.mean(
                     (1 - _sigmoid(beta * _h(a) / discopop_tau)) * -_log_sigmoid(beta * _h(a))
                     + _sigmoid(beta * _h(a) / discopop_tau) * np.exp(-beta * _h(a)))),
    "hinge": (dict(beta=0.2), lambda a, beta: np.mean(np.maximum(0, 1 - beta * _h(a)))),
    "simpo": (dict(beta=2.0, gamma=0.4),
              lambda a, beta, gamma: np.mean(-_log_sigmoid(beta * a["pc"] / a["lc"] - beta * a["pr"] / a["lr"]
                                                           - gamma))),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_losses_equal_numpy(name):
  a, x = _inputs()
  kwargs, ref = REFERENCES[name]
  loss, metrics = P.LOSSES[name](**kwargs)(x)
  np.testing.assert_allclose(loss, ref(a, **kwargs), rtol=1e-5)
  assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
          "logps/rejected"} <= set(metrics)


def test_orpo_equals_numpy():
  rng = np.random.default_rng(3)
  lc, lr = rng.integers(3, 20, 8).astype(float), rng.integers(3, 20, 8).astype(float)
  pc, pr = -rng.uniform(0.1, 3, 8) * lc, -rng.uniform(0.1, 3, 8) * lr
  x = P.PairLogps(chosen_B=jnp.asarray(pc), rejected_B=jnp.asarray(pr), chosen_tokens_B=jnp.asarray(lc),
                  rejected_tokens_B=jnp.asarray(lr))
  mc, mr = pc / lc, pr / lr
  log_odds = (mc - np.log1p(-np.exp(mc))) - (mr - np.log1p(-np.exp(mr)))
  want = -pc.sum() / lc.sum() - 0.25 * np.mean(_log_sigmoid(log_odds))
  np.testing.assert_allclose(P.orpo_loss(x, lam=0.25)[0], want, rtol=1e-5)


def test_kto_equals_numpy():
  rng = np.random.default_rng(4)
  lp, rp = rng.normal(size=10) - 10, rng.normal(size=10) - 10
  labels = np.array([1, 0] * 5, bool)
  r = lp - rp
  z0 = max(r.mean(), 0.0)
  sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
  want = np.mean(np.where(labels, 1.5 * (1 - sig(0.2 * (r - z0))), 0.7 * (1 - sig(0.2 * (z0 - r)))))
  x = P.UnpairedLogps(logps_B=jnp.asarray(lp), ref_logps_B=jnp.asarray(rp), labels_B=jnp.asarray(labels))
  loss, metrics = P.kto_loss(x, beta=0.2, desirable_weight=1.5, undesirable_weight=0.7)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics["kl"], z0, rtol=1e-5)


def test_bradley_terry_equals_numpy():
  rng = np.random.default_rng(5)
  rc, rr, m = rng.normal(size=12), rng.normal(size=12), rng.uniform(0, 1, 12)
  loss, metrics = bradley_terry_loss(jnp.asarray(rc), jnp.asarray(rr), margin_B=jnp.asarray(m), center_coef=0.01)
  want = np.mean(-_log_sigmoid(rc - rr - m)) + 0.01 * np.mean((rc + rr) ** 2)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], np.mean(rc > rr))


def test_dpo_at_reference_is_log2():
  a, x = _inputs()
  same = x.replace(ref_chosen_B=x.chosen_B, ref_rejected_B=x.rejected_B)
  np.testing.assert_allclose(P.dpo_loss(same, beta=0.1)[0], np.log(2), rtol=1e-6)


@pytest.mark.parametrize("name", ["sigmoid", "robust", "ipo", "hinge", "simpo"])
def test_swapping_chosen_and_rejected_negates_the_margins(name):
  _, x = _inputs(1)
  swapped = P.PairLogps(chosen_B=x.rejected_B, rejected_B=x.chosen_B, ref_chosen_B=x.ref_rejected_B,
                        ref_rejected_B=x.ref_chosen_B, chosen_tokens_B=x.rejected_tokens_B,
                        rejected_tokens_B=x.chosen_tokens_B)
  kwargs = REFERENCES[name][0]
  m1, m2 = P.LOSSES[name](**kwargs)(x)[1], P.LOSSES[name](**kwargs)(swapped)[1]
  np.testing.assert_allclose(m1["rewards/margins"], -m2["rewards/margins"], rtol=1e-5)


def test_label_smoothing_half_is_symmetric_in_the_label():
  """cDPO with eps = 0.5 trusts neither label: swapping chosen and rejected leaves the loss unchanged.

  (The loss is not constant in h: 0.5 [log(1 + e^-z) + log(1 + e^z)] is minimal at z = 0.)
  """
  _, x = _inputs(2)
  flipped = x.replace(chosen_B=x.rejected_B, rejected_B=x.chosen_B, ref_chosen_B=x.ref_rejected_B,
                      ref_rejected_B=x.ref_chosen_B)
  loss = P.dpo_loss(x, beta=0.5, label_smoothing=0.5)[0]
  np.testing.assert_allclose(loss, P.dpo_loss(flipped, beta=0.5, label_smoothing=0.5)[0], rtol=1e-6)
  at_reference = x.replace(ref_chosen_B=x.chosen_B, ref_rejected_B=x.rejected_B)
  assert P.dpo_loss(at_reference, beta=0.5, label_smoothing=0.5)[0] < loss


@pytest.mark.parametrize("fn, tokens", [(P.ipo_loss, 4.0), (P.ipo_sum_loss, 1.0)])
def test_ipo_is_minimal_at_margin_one_over_two_beta(fn, tokens):
  """IPO's minimum is at a margin of 1 / (2 beta): per token for `ipo` (4-token completions: summed margin 4x),
  summed for `ipo_sum`."""
  beta = 0.25
  hs = np.linspace(-5, 10, 301)
  t = jnp.array([tokens])
  losses = [float(fn(P.PairLogps(chosen_B=jnp.array([h * tokens]), rejected_B=jnp.array([0.0]),
                                 ref_chosen_B=jnp.array([0.0]), ref_rejected_B=jnp.array([0.0]),
                                 chosen_tokens_B=t, rejected_tokens_B=t), beta=beta)[0]) for h in hs]
  assert np.isclose(hs[int(np.argmin(losses))], 1 / (2 * beta))


def test_simpo_needs_no_reference():
  _, x = _inputs()
  free = P.PairLogps(chosen_B=x.chosen_B, rejected_B=x.rejected_B, chosen_tokens_B=x.chosen_tokens_B,
                     rejected_tokens_B=x.rejected_tokens_B)
  loss, metrics = P.simpo_loss(free)
  # the same value as with any reference log-probs (it reads none), and SimPO's formula in NumPy
  other = x.replace(ref_chosen_B=x.ref_chosen_B + 7.0, ref_rejected_B=x.ref_rejected_B - 3.0)
  assert float(loss) == float(P.simpo_loss(other)[0]) == float(P.simpo_loss(x)[0])
  a, _ = _inputs()
  want = np.mean(-_log_sigmoid(2.0 * a["pc"] / a["lc"] - 2.0 * a["pr"] / a["lr"] - 0.5))
  np.testing.assert_allclose(loss, want, rtol=1e-5)  # float32 vs float64
  assert float(metrics["rewards/margins"]) == pytest.approx(np.mean(2.0 * a["pc"] / a["lc"] - 2.0 * a["pr"] / a["lr"]),
                                                           rel=1e-5)


def test_chosen_preferred_lowers_the_loss():
  _, x = _inputs()
  better = x.replace(chosen_B=x.chosen_B + 1.0)
  for name in ["sigmoid", "robust", "hinge", "simpo"]:
    kwargs = REFERENCES[name][0]
    assert P.LOSSES[name](**kwargs)(better)[0] < P.LOSSES[name](**kwargs)(x)[0]


def test_weighted_sum_adds_terms():
  _, x = _inputs()
  combined = P.weighted_sum([(1.0, lambda v: P.dpo_loss(v, beta=0.1)), (0.5, P.sft_term)])
  loss, metrics = combined(x)
  a, _ = _inputs()
  dpo = np.mean(-_log_sigmoid(0.1 * _h(a)))
  nll = -a["pc"].sum() / a["lc"].sum()  # the SFT term: NLL per chosen token, in NumPy
  np.testing.assert_allclose(loss, dpo + 0.5 * nll, rtol=1e-5)  # float32 vs float64
  np.testing.assert_allclose(metrics["term1/nll_loss"], nll, rtol=1e-5)
  assert "term1/nll_loss" in metrics and "rewards/margins" in metrics
