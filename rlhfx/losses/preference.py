"""The DPO family of preference losses. Pure functions of arrays.

Every DPO-family loss takes `PairLogps` (summed completion log-probs of the policy
and, except the reference-free ones, of the reference) and keyword-only
hyper-parameters, and returns `(loss, metrics)` with TRL's metric names. A custom
loss is any function with the same signature:

  def my_loss(x: PairLogps, *, beta: float = 0.1) -> tuple[Array, dict[str, Array]]:
    margin = beta * x.logratio_margin()
    return -jax.nn.log_sigmoid(margin - 0.5).mean(), reward_metrics(x, ...)

Key: B pairs. Losses are means over the batch.

`@register("name")` above a loss is all it takes to make it `config.dpo.loss=name`: its
keyword-only parameters, with their defaults, become `config.dpo.<parameter>` fields
(`rlhfx.config`), and the docstring's last lines say what each one means.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from rlhfx.losses.registry import LOSSES, Loss, config_fields, from_config, register  # noqa: F401 (re-exported)

Array = jax.Array


@flax.struct.dataclass
class PairLogps:
  """Per-pair sequence statistics of chosen and rejected completions."""

  chosen_B: Array  # policy: sum of log p over the chosen completion's tokens
  rejected_B: Array
  ref_chosen_B: Array | None = None  # reference model, same sums (None for reference-free losses)
  ref_rejected_B: Array | None = None
  chosen_tokens_B: Array | None = None  # completion lengths (SimPO, ORPO, the SFT term)
  rejected_tokens_B: Array | None = None
  chosen_mean_logits_B: Array | None = None  # mean logit over vocab and completion tokens (metrics only)
  rejected_mean_logits_B: Array | None = None

  def chosen_logratios(self) -> Array:
    return self.chosen_B - self.ref_chosen_B

  def rejected_logratios(self) -> Array:
    return self.rejected_B - self.ref_rejected_B

  def logratio_margin(self) -> Array:
    """h = log pi(yw)/ref(yw) - log pi(yl)/ref(yl)  (the implicit reward margin divided by beta)."""
    return self.chosen_logratios() - self.rejected_logratios()


@flax.struct.dataclass
class UnpairedLogps:
  """Per-example statistics for unpaired feedback (KTO)."""

  logps_B: Array  # policy: summed completion log-probs
  ref_logps_B: Array  # reference
  labels_B: Array  # True = desirable


# ----------------------------------------------------------------------------- metrics and shared pieces


def reward_metrics(x: PairLogps, chosen_rewards_B: Array, rejected_rewards_B: Array) -> dict[str, Array]:
  """TRL's DPO metric names from implicit rewards."""
  metrics = {
      "rewards/chosen": chosen_rewards_B.mean(),
      "rewards/rejected": rejected_rewards_B.mean(),
      "rewards/margins": (chosen_rewards_B - rejected_rewards_B).mean(),
      "rewards/accuracies": (chosen_rewards_B > rejected_rewards_B).astype(jnp.float32).mean(),
      "logps/chosen": x.chosen_B.mean(),
      "logps/rejected": x.rejected_B.mean(),
  }
  if x.chosen_mean_logits_B is not None:
    metrics["logits/chosen"] = _token_mean(x.chosen_mean_logits_B, x.chosen_tokens_B)
    metrics["logits/rejected"] = _token_mean(x.rejected_mean_logits_B, x.rejected_tokens_B)
  return metrics


def _token_mean(row_means_B: Array, tokens_B: Array | None) -> Array:
  """The mean over every completion token of the batch (TRL's `logits/*`), from per-row means and lengths."""
  if tokens_B is None:
    return row_means_B.mean()
  tokens_B = tokens_B.astype(jnp.float32)
  return jnp.sum(row_means_B * tokens_B) / jnp.maximum(tokens_B.sum(), 1)


def _per_token(x: PairLogps) -> tuple[Array, Array]:
  """Each completion's log-ratio divided by its token count (the average log-likelihood ratio)."""
  return (x.chosen_logratios() / jnp.maximum(x.chosen_tokens_B, 1),
          x.rejected_logratios() / jnp.maximum(x.rejected_tokens_B, 1))


def _dpo_rewards(x: PairLogps, beta: float) -> dict[str, Array]:
  return reward_metrics(x, beta * jax.lax.stop_gradient(x.chosen_logratios()),
                        beta * jax.lax.stop_gradient(x.rejected_logratios()))


# ----------------------------------------------------------------------------- the losses


@register("sigmoid")
def dpo_loss(x: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.0):
  """DPO (Rafailov et al. 2023, eq. 7): -log sigma(beta h).

  With label_smoothing eps > 0 this is conservative DPO (cDPO, Mitchell 2023):
  -(1 - eps) log sigma(beta h) - eps log sigma(-beta h).

  beta: KL strength. label_smoothing: cDPO's assumed share of flipped labels.
  """
  logits = beta * x.logratio_margin()
  losses = -(1 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * jax.nn.log_sigmoid(-logits)
  return losses.mean(), _dpo_rewards(x, beta)


@register("robust")
def robust_dpo_loss(x: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.1):
  """Robust DPO (Chowdhury et al. 2024, eq. 8): unbiased under preference flips with rate eps < 1/2.

  [(1 - eps)(-log sigma(beta h)) - eps(-log sigma(-beta h))] / (1 - 2 eps).

  label_smoothing: the assumed label-flip rate eps (< 0.5).
  """
  logits = beta * x.logratio_margin()
  losses = (-(1 - label_smoothing) * jax.nn.log_sigmoid(logits)
            + label_smoothing * jax.nn.log_sigmoid(-logits)) / (1 - 2 * label_smoothing)
  return losses.mean(), _dpo_rewards(x, beta)


@register("ipo")
def ipo_loss(x: PairLogps, *, beta: float = 0.1):
  """IPO (Azar et al. 2023, eq. 17): (h / |y| - 1/(2 beta))^2 with each log-ratio averaged over its tokens.

  The paper's log-likelihoods are per-token averages (TRL's `ipo`, confirmed with the authors).
  """
  chosen, rejected = _per_token(x)
  losses = (chosen - rejected - 1 / (2 * beta)) ** 2
  return losses.mean(), _dpo_rewards(x, beta)


@register("hinge")
def hinge_loss(x: PairLogps, *, beta: float = 0.1):
  """SLiC-HF hinge (Zhao et al. 2023, eq. 1 with the reference ratio, as in DPO's framing): max(0, 1 - beta h)."""
  losses = jax.nn.relu(1 - beta * x.logratio_margin())
  return losses.mean(), _dpo_rewards(x, beta)


@register("simpo", reference_free=True)
def simpo_loss(x: PairLogps, *, beta: float = 2.0, gamma: float = 0.5):
  """SimPO (Meng et al. 2024, eq. 6), reference-free.

  -log sigma(beta/|yw| log pi(yw) - beta/|yl| log pi(yl) - gamma).

  beta: reward scale. gamma: target margin.
  """
  chosen = beta * x.chosen_B / jnp.maximum(x.chosen_tokens_B, 1)
  rejected = beta * x.rejected_B / jnp.maximum(x.rejected_tokens_B, 1)
  losses = -jax.nn.log_sigmoid(chosen - rejected - gamma)
  return losses.mean(), reward_metrics(x, jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected))


def sft_term(x: PairLogps):
  """NLL per token of the chosen completions (to mix into a preference loss)."""
  nll = -x.chosen_B.sum() / jnp.maximum(x.chosen_tokens_B.sum(), 1)
  return nll, {"nll_loss": nll}


@register("orpo", reference_free=True)
def orpo_loss(x: PairLogps, *, lam: float = 0.1):
  """ORPO (Hong et al. 2024, eqs. 6-7), reference-free: NLL(yw) - lam log sigma(log odds(yw) - log odds(yl)).

  odds(y) = P(y) / (1 - P(y)) with P(y) the per-token mean probability exp(log pi(y) / |y|).

  lam: weight of the odds-ratio term.
  """
  mean_c = x.chosen_B / jnp.maximum(x.chosen_tokens_B, 1)
  mean_r = x.rejected_B / jnp.maximum(x.rejected_tokens_B, 1)
  log_odds = (mean_c - mean_r) - (jnp.log1p(-jnp.exp(mean_c)) - jnp.log1p(-jnp.exp(mean_r)))
  ratio = jax.nn.log_sigmoid(log_odds)
  nll, _ = sft_term(x)
  metrics = reward_metrics(x, lam * jax.lax.stop_gradient(mean_c), lam * jax.lax.stop_gradient(mean_r))
  metrics.update({"nll_loss": nll, "log_odds_ratio": ratio.mean(), "log_odds_chosen": log_odds.mean()})
  return nll - lam * ratio.mean(), metrics


@register("kto", unpaired=True)
def kto_loss(x: UnpairedLogps, *, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0):
  """KTO (Ethayarajh et al. 2024, eq. 8).

  r = log pi(y|x)/ref(y|x); z0 = max(0, mean r over the batch), held constant (the
  batch estimate of KL(pi || ref) that the paper takes from mismatched pairs);
  desirable: w_D (1 - sigma(beta (r - z0))), undesirable: w_U (1 - sigma(beta (z0 - r))).

  desirable_weight: w_D, of desirable (label true) examples. undesirable_weight: w_U.
  """
  r = x.logps_B - x.ref_logps_B
  z0 = jax.lax.stop_gradient(jnp.maximum(r.mean(), 0.0))
  desirable = desirable_weight * (1 - jax.nn.sigmoid(beta * (r - z0)))
  undesirable = undesirable_weight * (1 - jax.nn.sigmoid(beta * (z0 - r)))
  labels = x.labels_B.astype(bool)
  losses = jnp.where(labels, desirable, undesirable)
  n_d, n_u = labels.sum(), (~labels).sum()
  rewards = beta * jax.lax.stop_gradient(r)
  metrics = {"kl": z0,
             "rewards/chosen": jnp.where(labels, rewards, 0).sum() / jnp.maximum(n_d, 1),
             "rewards/rejected": jnp.where(labels, 0, rewards).sum() / jnp.maximum(n_u, 1)}
  return losses.mean(), metrics


# the other row-separable losses of TRL 1.16's DPOTrainer (loss_type), equal to its numbers
# (tests/algorithms/test_dpo_trl.py)


@register("ipo_sum")
def ipo_sum_loss(x: PairLogps, *, beta: float = 0.1):
  """IPO on summed log-probs: (h - 1/(2 beta))^2 (scales with completion length; rlhfx's `ipo` before 0.2)."""
  losses = (x.logratio_margin() - 1 / (2 * beta)) ** 2
  return losses.mean(), _dpo_rewards(x, beta)


@register("sigmoid_norm")
def sigmoid_norm_loss(x: PairLogps, *, beta: float = 0.1):
  """DPO on per-token average log-ratios: -log sigma(beta (h_w / |y_w| - h_l / |y_l|)) (TRL's `sigmoid_norm`)."""
  chosen, rejected = _per_token(x)
  return -jax.nn.log_sigmoid(beta * (chosen - rejected)).mean(), _dpo_rewards(x, beta)


@register("exo_pair")
def exo_pair_loss(x: PairLogps, *, beta: float = 0.1, label_smoothing: float = 1e-3):
  """EXO-pref (Ji et al. 2024, eq. 16), K = 2: KL(q || p) of q = softmax over the pair of beta log-ratios and
  p = (1 - eps, eps): q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps).

  label_smoothing: eps of the target (1 - eps, eps); must be > 0.
  """
  z = beta * x.logratio_margin()
  eps = label_smoothing
  losses = (jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - jnp.log1p(-eps))
            + jax.nn.sigmoid(-z) * (jax.nn.log_sigmoid(-z) - jnp.log(eps)))
  return losses.mean(), _dpo_rewards(x, beta)


@register("nca_pair")
def nca_pair_loss(x: PairLogps, *, beta: float = 0.1):
  """NCA (Chen et al. 2024, eq. 12), K = 2: -log sigma(r_w) - 1/2 log sigma(-r_w) - 1/2 log sigma(-r_l),
  r = beta log pi/ref."""
  r_w, r_l = beta * x.chosen_logratios(), beta * x.rejected_logratios()
  losses = -jax.nn.log_sigmoid(r_w) - 0.5 * jax.nn.log_sigmoid(-r_w) - 0.5 * jax.nn.log_sigmoid(-r_l)
  return losses.mean(), _dpo_rewards(x, beta)


@register("bco_pair")
def bco_pair_loss(x: PairLogps, *, beta: float = 0.1):
  """BCO on pairs (Jung et al. 2024, eq. 6 with the reward shift delta = 0, as TRL's `bco_pair`):
  -log sigma(r_w) - log sigma(-r_l)."""
  r_w, r_l = beta * x.chosen_logratios(), beta * x.rejected_logratios()
  return (-jax.nn.log_sigmoid(r_w) - jax.nn.log_sigmoid(-r_l)).mean(), _dpo_rewards(x, beta)


@register("sppo_hard")
def sppo_hard_loss(x: PairLogps, *, beta: float = 0.1):
  """SPPO with hard win probabilities (Wu et al. 2024, eq. 4.7 with P = 1 for the winner, 0 for the loser):
  (log pi/ref(y_w) - 1/(2 beta))^2 + (log pi/ref(y_l) + 1/(2 beta))^2."""
  losses = (x.chosen_logratios() - 0.5 / beta) ** 2 + (x.rejected_logratios() + 0.5 / beta) ** 2
  return losses.mean(), _dpo_rewards(x, beta)


@register("apo_zero")
def apo_zero_loss(x: PairLogps, *, beta: float = 0.1):
  """APO-zero (D'Oosterlinck et al. 2024, eq. 7): 1 - sigma(r_w) + sigma(r_l); raises chosen, lowers rejected."""
  r_w, r_l = beta * x.chosen_logratios(), beta * x.rejected_logratios()
  return (1 - jax.nn.sigmoid(r_w) + jax.nn.sigmoid(r_l)).mean(), _dpo_rewards(x, beta)


@register("apo_down")
def apo_down_loss(x: PairLogps, *, beta: float = 0.1):
  """APO-down (D'Oosterlinck et al. 2024, eq. 8): sigma(r_w) + 1 - sigma(r_w - r_l); lowers both, rejected more."""
  r_w, r_l = beta * x.chosen_logratios(), beta * x.rejected_logratios()
  return (jax.nn.sigmoid(r_w) + 1 - jax.nn.sigmoid(r_w - r_l)).mean(), _dpo_rewards(x, beta)


@register("discopop")
def discopop_loss(x: PairLogps, *, beta: float = 0.1, discopop_tau: float = 0.05):
  """DiscoPOP (Chris Lu et al. 2024, eq. 5): log-ratio-modulated blend of the logistic and exponential losses,
  (1 - sigma(z / tau)) (-log sigma(z)) + sigma(z / tau) exp(-z), z = beta h.

  discopop_tau: temperature tau of the log-ratio modulation.
  """
  z = beta * x.logratio_margin()
  mix = jax.nn.sigmoid(z / discopop_tau)
  return ((1 - mix) * -jax.nn.log_sigmoid(z) + mix * jnp.exp(-z)).mean(), _dpo_rewards(x, beta)


def weighted_sum(terms: Sequence[tuple[float, Callable]]) -> Callable:
  """A loss that is sum_i w_i * term_i(x); metrics of term i are prefixed "term{i}/" after the first."""

  def loss(x):
    total, metrics = 0.0, {}
    for i, (weight, term) in enumerate(terms):
      value, term_metrics = term(x)
      total = total + weight * value
      prefix = "" if i == 0 else f"term{i}/"
      metrics.update({prefix + k: v for k, v in term_metrics.items()})
    return total, metrics

  return loss
