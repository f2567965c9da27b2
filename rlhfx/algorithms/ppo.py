"""PPO with a critic for RLHF (Ziegler et al. 2019; Huang et al. 2024, "The N+ implementation details").

  python -m rlhfx.main --config=configs/ppo_hh.py:tiny --workdir=/tmp/ppo_hh

One iteration, one compiled program (`iteration`):
  rollout   sample completions of the prompt batch with the current policy (rlhfx.sampling);
  scoring   the reward model's score at the last token, normalised with the reward run's
            mean/std, minus `missing_eos_penalty` for completions cut before EOS
            (or a reward function: rlhfx.rewards);
  stats     old log-probs, reference log-probs and values of the completion tokens;
            per-token reward -kl_coef * KL (k1/k2/k3) plus the score at the last token;
            GAE over the completion; whitened advantages;
  update    `ppo.epochs` x `ppo.minibatches` clipped-surrogate + clipped-value updates
            as nested lax.scan; the adaptive KL coefficient moves toward `ppo.kl_target`.
The reference and reward trees are frozen arguments: never donated, never updated.
The critic is a separate ScoreModel (from the reward model when there is one, else
from the policy's backbone with a zero head) or a value head on the policy trunk.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from rlhfx import onpolicy
from rlhfx.algorithms import onpolicy_loop
from rlhfx.losses import policy as L
from rlhfx.losses.common import masked_mean
from rlhfx.models import Transformer
from rlhfx.models.heads import ScoreModel
from rlhfx.onpolicy import Rollout, RLState

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything static about an iteration: modules, sampling and the ppo.* hyper-parameters."""

  model: Transformer
  critic: ScoreModel | None  # None: value head on the policy
  scorer: onpolicy.Scorer
  sampling: onpolicy.SamplingSettings
  optimizer: object
  seed: int = 0
  epochs: int = 4
  minibatches: int = 1
  grad_accum_steps: int = 1
  clip_eps: float = 0.2
  dual_clip: float | None = None
  value_clip: float | None = 0.2
  vf_coef: float = 0.1
  entropy_coef: float = 0.0
  gamma: float = 1.0
  lam: float = 0.95
  kl_estimator: str = "k1"
  kl_in: str = "reward"
  kl_target: float = 0.0
  kl_horizon: int = 10000
  whiten_advantages: bool = True
  whiten_rewards: bool = False
  aggregation: str = "token_mean"

  @classmethod
  def from_config(cls, config, **modules) -> "Settings":
    p = config.ppo
    return cls(seed=config.seed, epochs=p.epochs, minibatches=p.minibatches,
               grad_accum_steps=config.train.grad_accum_steps, clip_eps=p.clip_eps, dual_clip=p.dual_clip or None,
               value_clip=p.value_clip or None, vf_coef=p.vf_coef, entropy_coef=p.entropy_coef, gamma=p.gamma,
               lam=p.lam, kl_estimator=p.kl_estimator, kl_in=p.kl_in, kl_target=p.kl_target,
               kl_horizon=p.kl_horizon, whiten_advantages=p.whiten_advantages, whiten_rewards=p.whiten_rewards,
               aggregation=p.aggregation, **modules)

  def check(self):
    if self.kl_estimator not in L.KL_ESTIMATORS:
      raise ValueError(f"config.ppo.kl_estimator={self.kl_estimator!r}; expected one of {L.KL_ESTIMATORS}")
    if self.kl_in not in ("reward", "loss"):
      raise ValueError(f"config.ppo.kl_in={self.kl_in!r}; expected 'reward' or 'loss'")
    if self.aggregation not in L.AGGREGATIONS:
      raise ValueError(f"config.ppo.aggregation={self.aggregation!r}; expected one of {L.AGGREGATIONS}")
    return self


def init_value_head(d_model: int) -> dict:
  return {"kernel": jnp.zeros((d_model, 1), jnp.float32)}


def policy_and_values(params, r: Rollout, s: Settings, *, entropy: bool = False):
  """(logps_BxC, entropy_BxC, values_BxC) of the completion tokens under `params`."""
  logps_BxC, ent_BxC, hidden_BxCxD = onpolicy.completion_stats(s.model, params["policy"], r,
                                                               temperature=s.sampling.temperature, entropy=entropy)
  if s.critic is None:
    values_BxC = (hidden_BxCxD.astype(jnp.float32) @ params["value_head"]["kernel"])[..., 0]
  else:
    values_BxC = onpolicy.completion_values(s.critic, params["value"], r)
  return logps_BxC, ent_BxC, values_BxC


def minibatch_loss(params, mb: dict, *, s: Settings, kl_coef: Array):
  """Clipped policy loss + vf_coef x clipped value loss (- entropy bonus, + KL term when kl_in='loss')."""
  r = mb["rollout"]
  logps_BxC, ent_BxC, values_BxC = policy_and_values(params, r, s, entropy=True)
  mask_BxC = r.mask_BxC
  pg, pg_m = L.ppo_policy_loss(logps_BxC, mb["old_logps_BxC"], mb["advantages_BxC"], mask_BxC,
                               clip_eps=s.clip_eps, dual_clip=s.dual_clip, aggregation=s.aggregation,
                               normaliser=s.sampling.max_new_tokens)
  vf, vf_m = L.value_loss(values_BxC, mb["old_values_BxC"], mb["returns_BxC"], mask_BxC, clip_range=s.value_clip,
                          aggregation=s.aggregation, normaliser=s.sampling.max_new_tokens)
  entropy = masked_mean(ent_BxC, mask_BxC)
  loss = pg + s.vf_coef * vf - s.entropy_coef * entropy
  if s.kl_in == "loss":
    kl = L.aggregate(L.kl_estimate(logps_BxC, mb["ref_logps_BxC"], s.kl_estimator), mask_BxC, s.aggregation,
                     normaliser=s.sampling.max_new_tokens)
    loss = loss + kl_coef * kl
  return loss, {"policy_loss": pg, "value_loss": vf, "entropy": entropy, "approxkl": pg_m["approxkl"],
                "clipfrac": pg_m["clipfrac"], "ratio": pg_m["ratio"], "vf_clipfrac": vf_m["clipfrac"]}


def update_step(state: RLState, r: Rollout, scores_B: Array, frozen: dict, s: Settings):
  """Statistics under the rollout's policy, rewards, GAE and the epochs x minibatches updates."""
  mask_BxC = r.mask_BxC
  scores_B, has_eos_B = onpolicy.finish_scores(scores_B, r, s.sampling.eos_id, s.scorer.missing_eos_penalty)
  old_logps_BxC, _, old_values_BxC = jax.lax.stop_gradient(policy_and_values(state.params, r, s))
  ref_logps_BxC = onpolicy.completion_stats(s.model, frozen["reference"], r, temperature=s.sampling.temperature)[0]
  kl_BxC = L.kl_estimate(old_logps_BxC, ref_logps_BxC, s.kl_estimator)
  reward_kl_coef = state.kl_coef if s.kl_in == "reward" else 0.0
  rewards_BxC, non_score_BxC = L.kl_penalized_rewards(scores_B, kl_BxC, mask_BxC, kl_coef=reward_kl_coef)
  if s.whiten_rewards:
    rewards_BxC = L.whiten(rewards_BxC, mask_BxC, shift_mean=False)
  advantages_BxC, returns_BxC = L.gae(rewards_BxC, old_values_BxC, mask_BxC, gamma=s.gamma, lam=s.lam)
  if s.whiten_advantages:
    advantages_BxC = L.whiten(advantages_BxC, mask_BxC)

  data = {"rollout": r, "old_logps_BxC": old_logps_BxC, "ref_logps_BxC": ref_logps_BxC,
          "old_values_BxC": old_values_BxC, "advantages_BxC": advantages_BxC, "returns_BxC": returns_BxC}
  loss = functools.partial(minibatch_loss, s=s, kl_coef=state.kl_coef)
  params, opt_state, m = onpolicy.minibatch_epochs(state.params, state.opt_state, s.optimizer, data, loss,
                                                   onpolicy.update_key(state, s),
                                                   epochs=s.epochs, minibatches=s.minibatches,
                                                   grad_accum_steps=s.grad_accum_steps)

  # the sequence-level KL (k1, summed over tokens) the reward saw, and the controller's response to it
  kl_B = onpolicy.sequence_kl(old_logps_BxC, ref_logps_BxC, mask_BxC)
  kl_coef = state.kl_coef
  if s.kl_target:
    kl_coef = L.AdaptiveKL(s.kl_target, s.kl_horizon).update(kl_coef, kl_B.mean(), scores_B.shape[0])
  non_score_B = non_score_BxC.sum(-1)
  metrics = {
      "train/loss": m["loss"], "objective/kl": kl_B.mean(), "objective/kl_coef": state.kl_coef,
      "objective/entropy": jnp.sum(jnp.where(mask_BxC, -old_logps_BxC, 0.0), axis=-1).mean(),
      "objective/non_score_reward": non_score_B.mean(), "objective/rlhf_reward": (scores_B + non_score_B).mean(),
      "objective/scores": scores_B.mean(), "policy/approxkl_avg": m["approxkl"], "policy/clipfrac_avg": m["clipfrac"],
      "policy/entropy_avg": m["entropy"], "loss/policy_avg": m["policy_loss"], "loss/value_avg": m["value_loss"],
      "val/clipfrac_avg": m["vf_clipfrac"], "val/ratio": m["ratio"], "val/num_eos_tokens": has_eos_B.sum(),
      "val/completion_length": mask_BxC.sum(-1).mean(), "train/grad_norm": m["grad_norm"]}
  return RLState(step=state.step + 1, params=params, opt_state=opt_state, kl_coef=kl_coef), metrics


def init_params(policy, runtime, setup, scorer, reward_params, config) -> tuple[dict, ScoreModel | None]:
  """{"policy", "value" | "value_head"}: the critic per config.ppo.value_model."""
  kind = config.ppo.value_model
  if kind == "policy_head":
    head = jax.device_put(init_value_head(setup.model_config.d_model), jax.sharding.NamedSharding(
        runtime.mesh, jax.sharding.PartitionSpec()))
    return {"policy": policy, "value_head": head}, None
  if kind != "separate":
    raise ValueError(f"config.ppo.value_model={kind!r}; expected 'separate' or 'policy_head'")
  value, critic = onpolicy_loop.init_critic(policy, runtime, setup, scorer, reward_params)
  return {"policy": policy, "value": value}, critic


def train(config, workdir: str) -> dict[str, float]:
  """Train per `config` (see the module docstring); returns the final metrics."""
  return onpolicy_loop.train(config, workdir, algorithm="ppo", init_params=init_params,
                             settings=Settings.from_config, update_step=update_step, epochs=config.ppo.epochs,
                             minibatches=config.ppo.minibatches, kl_coef=config.ppo.kl_coef)
