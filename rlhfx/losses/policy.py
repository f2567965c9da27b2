"""On-policy RL losses and estimators: KL, GAE, whitening, PPO clipping, group advantages, aggregation.

Every function is pure and works on [B, C] arrays over completion tokens with a
`mask_BxC` of real tokens. Conventions follow the PPO-for-RLHF reproductions
(Ziegler et al. 2019; Huang et al. 2024, "The N+ implementation details of RLHF
with PPO") and the critic-free family (GRPO: Shao et al. 2024; Dr.GRPO: Liu et al.
2025; RLOO: Ahmadian et al. 2024).

Loss aggregation is always named, because it changes what a loss means:
  token_mean     sum over every token of the batch / number of tokens (DAPO)
  sequence_mean  mean over rows of (row sum / row length)             (GRPO paper)
  fixed          sum over the batch / (rows x a fixed normaliser)      (Dr.GRPO)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rlhfx.losses.common import masked_mean

Array = jax.Array
AGGREGATIONS = ("token_mean", "sequence_mean", "fixed")
KL_ESTIMATORS = ("k1", "k2", "k3")
ADVANTAGES = ("grpo", "dr_grpo", "rloo")


# ----------------------------------------------------------------------------- KL


def kl_estimate(logps_BxC: Array, ref_logps_BxC: Array, estimator: str = "k1") -> Array:
  """Per-token estimate of KL(policy || reference) from tokens sampled from the policy (Schulman 2020):
  with log r = ref - policy, k1 = -log r, k2 = (log r)^2 / 2, k3 = (r - 1) - log r (unbiased, >= 0)."""
  log_ratio_BxC = ref_logps_BxC - logps_BxC
  if estimator == "k1":
    return -log_ratio_BxC
  if estimator == "k2":
    return 0.5 * jnp.square(log_ratio_BxC)
  if estimator == "k3":
    return jnp.expm1(log_ratio_BxC) - log_ratio_BxC
  raise ValueError(f"KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def kl_penalized_rewards(scores_B: Array, kl_BxC: Array, mask_BxC: Array, *, kl_coef,
                         per_sequence: bool = False) -> tuple[Array, Array]:
  """(rewards_BxC, non_score_rewards_BxC): -kl_coef * KL on every token (or, `per_sequence`, the row's summed KL
  on its last real token alone), plus the score on each row's last real token (Ziegler et al. 2019)."""
  last_B = jnp.maximum(mask_BxC.sum(-1) - 1, 0)
  at_last_BxC = jnp.arange(mask_BxC.shape[1])[None, :] == last_B[:, None]
  non_score_BxC = jnp.where(mask_BxC, -kl_coef * kl_BxC, 0.0)
  if per_sequence:
    non_score_BxC = jnp.where(at_last_BxC & mask_BxC, non_score_BxC.sum(-1, keepdims=True), 0.0)
  rewards_BxC = non_score_BxC + jnp.where(at_last_BxC & mask_BxC, scores_B[:, None], 0.0)
  return rewards_BxC, non_score_BxC


@dataclasses.dataclass(frozen=True)
class AdaptiveKL:
  """The adaptive KL coefficient of Ziegler et al. (2019), sec. 2.2: the error (KL / target - 1), clipped to
  +-0.2, moves the coefficient by a fraction n_steps / horizon of itself."""

  target: float  # the KL (nats per sequence) the controller steers toward
  horizon: int  # rollouts (samples) over which the coefficient may change by e^(+-0.2)

  def update(self, kl_coef: Array, kl: Array, n_steps: int | Array) -> Array:
    error = jnp.clip(kl / self.target - 1.0, -0.2, 0.2)
    return kl_coef * (1.0 + error * n_steps / self.horizon)


# ----------------------------------------------------------------------------- advantages


def gae(rewards_BxC: Array, values_BxC: Array, mask_BxC: Array, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Array, Array]:
  """(advantages_BxC, returns_BxC) by generalised advantage estimation (Schulman et al. 2016) as a reverse
  `lax.scan`; the value after a row's last real token is 0 (the episode ends), masked positions get 0."""

  def step(carry, x):
    next_value_B, next_adv_B = carry
    reward_B, value_B, live_B = x
    delta_B = reward_B + gamma * next_value_B - value_B
    adv_B = delta_B + gamma * lam * next_adv_B
    adv_B = jnp.where(live_B, adv_B, 0.0)
    return (jnp.where(live_B, value_B, 0.0), adv_B), adv_B

  zeros_B = jnp.zeros(rewards_BxC.shape[:1], jnp.float32)
  xs = (rewards_BxC.T.astype(jnp.float32), values_BxC.T.astype(jnp.float32), mask_BxC.T)
  _, adv_CxB = jax.lax.scan(step, (zeros_B, zeros_B), xs, reverse=True)
  advantages_BxC = adv_CxB.T
  return advantages_BxC, jnp.where(mask_BxC, advantages_BxC + values_BxC, 0.0)


def whiten(x_BxC: Array, mask_BxC: Array, *, shift_mean: bool = True, eps: float = 1e-8) -> Array:
  """(x - mean) / std over the masked entries (unbiased variance); with shift_mean=False the mean is added
  back (TRL's convention for rewards). Masked entries come back as 0."""
  mean = masked_mean(x_BxC, mask_BxC)
  n = jnp.maximum(mask_BxC.sum(), 2)
  var = jnp.sum(jnp.where(mask_BxC, jnp.square(x_BxC - mean), 0.0)) / (n - 1)
  out_BxC = (x_BxC - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out_BxC = out_BxC + mean
  return jnp.where(mask_BxC, out_BxC, 0.0)


def group_advantages(scores_B: Array, group_size: int, *, kind: str = "grpo", eps: float = 1e-4) -> Array:
  """Advantages of G samples per prompt (rows grouped consecutively, G = group_size):
  grpo     (r - group mean) / (group std + eps)        (Shao et al. 2024; std with ddof=1 like TRL)
  dr_grpo  r - group mean                              (Liu et al. 2025: no std normalisation)
  rloo     r - mean of the other G-1 samples            (Ahmadian et al. 2024) = G/(G-1) (r - mean)
  """
  r_NxG = scores_B.reshape(-1, group_size).astype(jnp.float32)
  mean_Nx1 = r_NxG.mean(-1, keepdims=True)
  if kind == "grpo":
    adv_NxG = (r_NxG - mean_Nx1) / (r_NxG.std(-1, ddof=1, keepdims=True) + eps)
  elif kind == "dr_grpo":
    adv_NxG = r_NxG - mean_Nx1
  elif kind == "rloo":
    if group_size < 2:
      raise ValueError("rloo needs group_size >= 2")
    adv_NxG = r_NxG - (r_NxG.sum(-1, keepdims=True) - r_NxG) / (group_size - 1)
  else:
    raise ValueError(f"group advantage {kind!r}; expected one of {ADVANTAGES}")
  return adv_NxG.reshape(-1)


# ----------------------------------------------------------------------------- losses


def aggregate(x_BxC: Array, mask_BxC: Array, how: str = "token_mean", *, normaliser: float | None = None) -> Array:
  """Reduce per-token losses to a scalar (see the module docstring for the three rules)."""
  x_BxC = jnp.where(mask_BxC, x_BxC, 0.0)
  if how == "token_mean":
    return x_BxC.sum() / jnp.maximum(mask_BxC.sum(), 1)
  if how == "sequence_mean":
    return jnp.mean(x_BxC.sum(-1) / jnp.maximum(mask_BxC.sum(-1), 1))
  if how == "fixed":
    if not normaliser:
      raise ValueError("aggregation 'fixed' needs a normaliser (e.g. max_new_tokens)")
    return x_BxC.sum() / (x_BxC.shape[0] * normaliser)
  raise ValueError(f"loss aggregation {how!r}; expected one of {AGGREGATIONS}")


def ppo_policy_loss(logps_BxC: Array, old_logps_BxC: Array, advantages_BxC: Array, mask_BxC: Array, *,
                    clip_eps: float = 0.2, clip_eps_high: float | None = None, dual_clip: float | None = None,
                    aggregation: str = "token_mean", normaliser: float | None = None) -> tuple[Array, dict]:
  """Clipped surrogate (Schulman et al. 2017): max(-A r, -A clip(r, 1-eps, 1+eps_high)) per token, with
  r = exp(logp - old logp); `dual_clip` c > 1 caps the loss of negative advantages at -c A (Ye et al. 2020).
  Returns (loss, {clipfrac, approxkl, ratio}) with token-mean metrics."""
  high = clip_eps if clip_eps_high is None else clip_eps_high
  log_ratio_BxC = logps_BxC - old_logps_BxC
  ratio_BxC = jnp.exp(log_ratio_BxC)
  unclipped_BxC = -advantages_BxC * ratio_BxC
  clipped_BxC = -advantages_BxC * jnp.clip(ratio_BxC, 1.0 - clip_eps, 1.0 + high)
  loss_BxC = jnp.maximum(unclipped_BxC, clipped_BxC)
  if dual_clip is not None:
    loss_BxC = jnp.where(advantages_BxC < 0, jnp.minimum(loss_BxC, -dual_clip * advantages_BxC), loss_BxC)
  metrics = {"clipfrac": masked_mean((clipped_BxC > unclipped_BxC).astype(jnp.float32), mask_BxC),
             "approxkl": masked_mean(0.5 * jnp.square(log_ratio_BxC), mask_BxC),
             "ratio": masked_mean(ratio_BxC, mask_BxC)}
  return aggregate(loss_BxC, mask_BxC, aggregation, normaliser=normaliser), metrics


def value_loss(values_BxC: Array, old_values_BxC: Array, returns_BxC: Array, mask_BxC: Array, *,
               clip_range: float | None = 0.2, aggregation: str = "token_mean",
               normaliser: float | None = None) -> tuple[Array, dict]:
  """0.5 max((v - R)^2, (v_clipped - R)^2) with v_clipped = old v + clip(v - old v, +-clip_range)
  (clip_range None: the plain squared error). Returns (loss, {clipfrac})."""
  unclipped_BxC = jnp.square(values_BxC - returns_BxC)
  if clip_range is None:
    loss_BxC, clipfrac = unclipped_BxC, jnp.float32(0.0)
  else:
    v_clipped_BxC = old_values_BxC + jnp.clip(values_BxC - old_values_BxC, -clip_range, clip_range)
    clipped_BxC = jnp.square(v_clipped_BxC - returns_BxC)
    loss_BxC = jnp.maximum(unclipped_BxC, clipped_BxC)
    clipfrac = masked_mean((clipped_BxC > unclipped_BxC).astype(jnp.float32), mask_BxC)
  return 0.5 * aggregate(loss_BxC, mask_BxC, aggregation, normaliser=normaliser), {"clipfrac": clipfrac}
