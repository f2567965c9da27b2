"""Preference losses: the Bradley-Terry reward loss and the DPO family. Pure functions of arrays.

Every DPO-family loss takes `PairLogps` (summed completion log-probs of the policy
and, except the reference-free ones, of the reference) and keyword-only
hyper-parameters, and returns `(loss, metrics)` with TRL's metric names. A custom
loss is any function with the same signature:

  def my_loss(x: PairLogps, *, beta: float) -> tuple[Array, dict[str, Array]]:
    margin = beta * (x.chosen_logratios() - x.rejected_logratios())
    return -jax.nn.log_sigmoid(margin - 0.5).mean(), reward_metrics(x, beta)

Key: B pairs. Losses are means over the batch.

The losses `config.dpo.loss` names are registered once, below, as frozen dataclasses whose
fields are their hyper-parameters (`config.dpo.<field>`, made from these fields by
`rlhfx.config`); calling one applies its function. Adding a loss to the CLI is one
class here (and its test):

  @register("my_loss")
  @dataclasses.dataclass(frozen=True)
  class MyLoss(Loss):                 # Loss: reference_free = unpaired = False unless overridden
    beta: float = 0.1
    def __call__(self, x):
      return my_loss(x, beta=self.beta)
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, Sequence

import flax.struct
import jax
import jax.numpy as jnp

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

  def h(self) -> Array:
    """h = log pi(yw)/ref(yw) - log pi(yl)/ref(yl)  (the implicit reward margin divided by beta)."""
    return self.chosen_logratios() - self.rejected_logratios()


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


def dpo_loss(x: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.0):
  """DPO (Rafailov et al. 2023, eq. 7): -log sigma(beta h).

  With label_smoothing eps > 0 this is conservative DPO (cDPO, Mitchell 2023):
  -(1 - eps) log sigma(beta h) - eps log sigma(-beta h).
  """
  logits = beta * x.h()
  losses = -(1 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * jax.nn.log_sigmoid(-logits)
  return losses.mean(), _dpo_rewards(x, beta)


def robust_dpo_loss(x: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.1):
  """Robust DPO (Chowdhury et al. 2024, eq. 8): unbiased under preference flips with rate eps < 1/2.

  [(1 - eps)(-log sigma(beta h)) - eps(-log sigma(-beta h))] / (1 - 2 eps).
  """
  logits = beta * x.h()
  losses = (-(1 - label_smoothing) * jax.nn.log_sigmoid(logits)
            + label_smoothing * jax.nn.log_sigmoid(-logits)) / (1 - 2 * label_smoothing)
  return losses.mean(), _dpo_rewards(x, beta)


def ipo_loss(x: PairLogps, *, beta: float = 0.1):
  """IPO (Azar et al. 2023, eq. 17): (h / |y| - 1/(2 beta))^2 with each log-ratio averaged over its tokens.

  The paper's log-likelihoods are per-token averages (TRL's `ipo`, confirmed with the authors).
  """
  chosen, rejected = _per_token(x)
  losses = (chosen - rejected - 1 / (2 * beta)) ** 2
  return losses.mean(), _dpo_rewards(x, beta)


def ipo_sum_loss(x: PairLogps, *, beta: float = 0.1):
  """IPO on summed log-probs: (h - 1/(2 beta))^2 (scales with completion length; rlhfx's `ipo` before 0.2)."""
  losses = (x.h() - 1 / (2 * beta)) ** 2
  return losses.mean(), _dpo_rewards(x, beta)


def sigmoid_norm_loss(x: PairLogps, *, beta: float = 0.1):
  """DPO on per-token average log-ratios: -log sigma(beta (h_w / |y_w| - h_l / |y_l|)) (TRL's `sigmoid_norm`)."""
  chosen, rejected = _per_token(x)
  return -jax.nn.log_sigmoid(beta * (chosen - rejected)).mean(), _dpo_rewards(x, beta)


def exo_pair_loss(x: PairLogps, *, beta: float = 0.1, label_smoothing: float = 1e-3):
  """EXO-pref (Ji et al. 2024, eq. 16), K = 2: KL(q || p) of q = softmax over the pair of beta log-ratios and
  p = (1 - eps, eps): q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps). Needs 0 < eps < 1."""
  z = beta * x.h()
  eps = label_smoothing
  losses = (jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - jnp.log1p(-eps))
            + jax.nn.sigmoid(-z) * (jax.nn.log_sigmoid(-z) - jnp.log(eps)))
  return losses.mean(), _dpo_rewards(x, beta)


def nca_pair_loss(x: PairLogps, *, beta: float = 0.1):
  """NCA (Chen et al. 2024, eq. 12), K = 2: -log sigma(r_w) - 1/2 log sigma(-r_w) - 1/2 log sigma(-r_l),
  r = beta log pi/ref."""
  r_w, r_l = beta * x.chosen_logratios(), beta * x.rejected_logratios()
  losses = -jax.nn.log_sigmoid(r_w) - 0.5 * jax.nn.log_sigmoid(-r_w) - 0.5 * jax.nn.log_sigmoid(-r_l)
  return losses.mean(), _dpo_rewards(x, beta)


def bco_pair_loss(x: PairLogps, *, beta: float = 0.1):
  """BCO on pairs (Jung et al. 2024, eq. 6 with the reward shift delta = 0, as TRL's `bco_pair`):
  -log sigma(r_w) - log sigma(-r_l)."""
  r_w, r_l = beta * x.chosen_logratios(), beta * x.rejected_logratios()
  return (-jax.nn.log_sigmoid(r_w) - jax.nn.log_sigmoid(-r_l)).mean(), _dpo_rewards(x, beta)


def sppo_hard_loss(x: PairLogps, *, beta: float = 0.1):
  """SPPO with hard win probabilities (Wu et al. 2024, eq. 4.7 with P = 1 for the winner, 0 for the loser):
  (log pi/ref(y_w) - 1/(2 beta))^2 + (log pi/ref(y_l) + 1/(2 beta))^2."""
  losses = (x.chosen_logratios() - 0.5 / beta) ** 2 + (x.rejected_logratios() + 0.5 / beta) ** 2
  return losses.mean(), _dpo_rewards(x, beta)


def apo_zero_loss(x: PairLogps, *, beta: float = 0.1):
  """APO-zero (D'Oosterlinck et al. 2024, eq. 7): 1 - sigma(r_w) + sigma(r_l); raises chosen, lowers rejected."""
  r_w, r_l = beta * x.chosen_logratios(), beta * x.rejected_logratios()
  return (1 - jax.nn.sigmoid(r_w) + jax.nn.sigmoid(r_l)).mean(), _dpo_rewards(x, beta)


def apo_down_loss(x: PairLogps, *, beta: float = 0.1):
  """APO-down (D'Oosterlinck et al. 2024, eq. 8): sigma(r_w) + 1 - sigma(r_w - r_l); lowers both, rejected more."""
  r_w, r_l = beta * x.chosen_logratios(), beta * x.rejected_logratios()
  return (jax.nn.sigmoid(r_w) + 1 - jax.nn.sigmoid(r_w - r_l)).mean(), _dpo_rewards(x, beta)


def discopop_loss(x: PairLogps, *, beta: float = 0.1, discopop_tau: float = 0.05):
  """DiscoPOP (Chris Lu et al. 2024, eq. 5): log-ratio-modulated blend of the logistic and exponential losses,
  (1 - sigma(z / tau)) (-log sigma(z)) + sigma(z / tau) exp(-z), z = beta h."""
  z = beta * x.h()
  mix = jax.nn.sigmoid(z / discopop_tau)
  return ((1 - mix) * -jax.nn.log_sigmoid(z) + mix * jnp.exp(-z)).mean(), _dpo_rewards(x, beta)


def hinge_loss(x: PairLogps, *, beta: float = 0.1):
  """SLiC-HF hinge (Zhao et al. 2023, eq. 1 with the reference ratio, as in DPO's framing): max(0, 1 - beta h)."""
  losses = jax.nn.relu(1 - beta * x.h())
  return losses.mean(), _dpo_rewards(x, beta)


def simpo_loss(x: PairLogps, *, beta: float = 2.0, gamma: float = 0.5):
  """SimPO (Meng et al. 2024, eq. 6), reference-free.

  -log sigma(beta/|yw| log pi(yw) - beta/|yl| log pi(yl) - gamma).
  """
  chosen = beta * x.chosen_B / jnp.maximum(x.chosen_tokens_B, 1)
  rejected = beta * x.rejected_B / jnp.maximum(x.rejected_tokens_B, 1)
  losses = -jax.nn.log_sigmoid(chosen - rejected - gamma)
  return losses.mean(), reward_metrics(x, jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected))


def sft_term(x: PairLogps):
  """NLL per token of the chosen completions (to mix into a preference loss)."""
  nll = -x.chosen_B.sum() / jnp.maximum(x.chosen_tokens_B.sum(), 1)
  return nll, {"nll_loss": nll}


def orpo_loss(x: PairLogps, *, lam: float = 0.1):
  """ORPO (Hong et al. 2024, eqs. 6-7), reference-free: NLL(yw) - lam log sigma(log odds(yw) - log odds(yl)).

  odds(y) = P(y) / (1 - P(y)) with P(y) the per-token mean probability exp(log pi(y) / |y|).
  """
  mean_c = x.chosen_B / jnp.maximum(x.chosen_tokens_B, 1)
  mean_r = x.rejected_B / jnp.maximum(x.rejected_tokens_B, 1)
  log_odds = (mean_c - mean_r) - (jnp.log1p(-jnp.exp(mean_c)) - jnp.log1p(-jnp.exp(mean_r)))
  ratio = jax.nn.log_sigmoid(log_odds)
  nll, _ = sft_term(x)
  metrics = reward_metrics(x, lam * jax.lax.stop_gradient(mean_c), lam * jax.lax.stop_gradient(mean_r))
  metrics.update({"nll_loss": nll, "log_odds_ratio": ratio.mean(), "log_odds_chosen": log_odds.mean()})
  return nll - lam * ratio.mean(), metrics


@flax.struct.dataclass
class UnpairedLogps:
  """Per-example statistics for unpaired feedback (KTO)."""

  logps_B: Array  # policy: summed completion log-probs
  ref_logps_B: Array  # reference
  labels_B: Array  # True = desirable


def kto_loss(x: UnpairedLogps, *, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0):
  """KTO (Ethayarajh et al. 2024, eq. 8).

  r = log pi(y|x)/ref(y|x); z0 = max(0, mean r over the batch), held constant (the
  batch estimate of KL(pi || ref) that the paper takes from mismatched pairs);
  desirable: w_D (1 - sigma(beta (r - z0))), undesirable: w_U (1 - sigma(beta (z0 - r))).
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


def bradley_terry_loss(chosen_rewards_B: Array, rejected_rewards_B: Array, *, margin_B: Array | None = None,
                       center_coef: float = 0.0):
  """Reward-model loss (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1): -log sigma(r_w - r_l - margin).

  center_coef adds c * mean((r_w + r_l)^2), which keeps rewards centred at 0 (Eisenstein et al. 2023).
  """
  diff = chosen_rewards_B - rejected_rewards_B - (0.0 if margin_B is None else margin_B)
  loss = -jax.nn.log_sigmoid(diff).mean()
  if center_coef:
    loss = loss + center_coef * jnp.mean((chosen_rewards_B + rejected_rewards_B) ** 2)
  metrics = {"accuracy": (chosen_rewards_B > rejected_rewards_B).astype(jnp.float32).mean(),
             "margin": (chosen_rewards_B - rejected_rewards_B).mean(),
             "rewards/chosen": chosen_rewards_B.mean(), "rewards/rejected": rejected_rewards_B.mean()}
  return loss, metrics


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


# ----------------------------------------------------------------------------- the registry (config.dpo.loss)

LOSSES: dict[str, type] = {}


def register(name: str):
  """Class decorator: the loss `config.dpo.loss=name` selects; its dataclass fields become config.dpo fields."""

  def add(cls):
    cls.name = name
    LOSSES[name] = cls
    return cls

  return add


def from_config(cfg) -> Callable:
  """The registered loss `cfg.loss` with its hyper-parameters read from `cfg` (config.dpo)."""
  cls = LOSSES[cfg.loss]
  return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls)})


def config_fields() -> dict[str, object]:
  """{field: default} over every registered loss (a field two losses share takes the first one's default)."""
  out: dict[str, object] = {}
  for cls in LOSSES.values():
    for f in dataclasses.fields(cls):
      out.setdefault(f.name, f.default)
  return out


class Loss:
  """What every registered loss declares besides its hyper-parameters (override as needed)."""

  name: ClassVar[str] = ""  # set by `register`
  reference_free: ClassVar[bool] = False  # True: no reference log-probs are computed
  unpaired: ClassVar[bool] = False  # True: takes UnpairedLogps (data.input_format=unpaired)


@register("sigmoid")
@dataclasses.dataclass(frozen=True)
class Sigmoid(Loss):
  beta: float = 0.1  # KL strength
  label_smoothing: float = 0.0  # cDPO: the assumed share of flipped labels

  def __call__(self, x: PairLogps):
    return dpo_loss(x, beta=self.beta, label_smoothing=self.label_smoothing)


@register("robust")
@dataclasses.dataclass(frozen=True)
class Robust(Loss):
  beta: float = 0.1
  label_smoothing: float = 0.1  # the assumed label-flip rate (< 0.5)

  def __call__(self, x: PairLogps):
    return robust_dpo_loss(x, beta=self.beta, label_smoothing=self.label_smoothing)


@register("ipo")
@dataclasses.dataclass(frozen=True)
class Ipo(Loss):
  beta: float = 0.1

  def __call__(self, x: PairLogps):
    return ipo_loss(x, beta=self.beta)


@register("hinge")
@dataclasses.dataclass(frozen=True)
class Hinge(Loss):
  beta: float = 0.1

  def __call__(self, x: PairLogps):
    return hinge_loss(x, beta=self.beta)


@register("simpo")
@dataclasses.dataclass(frozen=True)
class Simpo(Loss):
  beta: float = 2.0  # reward scale
  gamma: float = 0.5  # target margin
  reference_free: ClassVar[bool] = True

  def __call__(self, x: PairLogps):
    return simpo_loss(x, beta=self.beta, gamma=self.gamma)


@register("orpo")
@dataclasses.dataclass(frozen=True)
class Orpo(Loss):
  lam: float = 0.1  # weight of the odds-ratio term
  reference_free: ClassVar[bool] = True

  def __call__(self, x: PairLogps):
    return orpo_loss(x, lam=self.lam)


@register("kto")
@dataclasses.dataclass(frozen=True)
class Kto(Loss):
  beta: float = 0.1
  desirable_weight: float = 1.0  # weight of desirable (label true) examples
  undesirable_weight: float = 1.0  # weight of undesirable examples
  unpaired: ClassVar[bool] = True

  def __call__(self, x: UnpairedLogps):
    return kto_loss(x, beta=self.beta, desirable_weight=self.desirable_weight,
                    undesirable_weight=self.undesirable_weight)


# the other row-separable losses of TRL 1.16's DPOTrainer (loss_type), equal to its numbers
# (tests/algorithms/test_dpo_trl.py)

@register("ipo_sum")
@dataclasses.dataclass(frozen=True)
class IpoSum(Loss):
  beta: float = 0.1

  def __call__(self, x: PairLogps):
    return ipo_sum_loss(x, beta=self.beta)


@register("sigmoid_norm")
@dataclasses.dataclass(frozen=True)
class SigmoidNorm(Loss):
  beta: float = 0.1

  def __call__(self, x: PairLogps):
    return sigmoid_norm_loss(x, beta=self.beta)


@register("exo_pair")
@dataclasses.dataclass(frozen=True)
class ExoPair(Loss):
  beta: float = 0.1
  label_smoothing: float = 1e-3  # eps of the target (1 - eps, eps); must be > 0

  def __call__(self, x: PairLogps):
    return exo_pair_loss(x, beta=self.beta, label_smoothing=self.label_smoothing)


@register("nca_pair")
@dataclasses.dataclass(frozen=True)
class NcaPair(Loss):
  beta: float = 0.1

  def __call__(self, x: PairLogps):
    return nca_pair_loss(x, beta=self.beta)


@register("bco_pair")
@dataclasses.dataclass(frozen=True)
class BcoPair(Loss):
  beta: float = 0.1

  def __call__(self, x: PairLogps):
    return bco_pair_loss(x, beta=self.beta)


@register("sppo_hard")
@dataclasses.dataclass(frozen=True)
class SppoHard(Loss):
  beta: float = 0.1

  def __call__(self, x: PairLogps):
    return sppo_hard_loss(x, beta=self.beta)


@register("apo_zero")
@dataclasses.dataclass(frozen=True)
class ApoZero(Loss):
  beta: float = 0.1

  def __call__(self, x: PairLogps):
    return apo_zero_loss(x, beta=self.beta)


@register("apo_down")
@dataclasses.dataclass(frozen=True)
class ApoDown(Loss):
  beta: float = 0.1

  def __call__(self, x: PairLogps):
    return apo_down_loss(x, beta=self.beta)


@register("discopop")
@dataclasses.dataclass(frozen=True)
class Discopop(Loss):
  beta: float = 0.1
  discopop_tau: float = 0.05  # temperature of the log-ratio modulation

  def __call__(self, x: PairLogps):
    return discopop_loss(x, beta=self.beta, discopop_tau=self.discopop_tau)


REFERENCE_FREE = tuple(name for name, cls in LOSSES.items() if cls.reference_free)
