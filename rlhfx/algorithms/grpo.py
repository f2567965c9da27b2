"""GRPO and its critic-free relatives (Dr.GRPO, RLOO): G samples per prompt, group-relative advantages.

  python -m rlhfx.main --config=configs/grpo_letters.py:tiny --workdir=/tmp/grpo_letters

One iteration: sample `rollout.group_size` completions per prompt; score them (reward
model, in-graph reward function, or a Python text function on the host — verifiable
rewards); advantages from each prompt's group (`grpo.advantage`: grpo = (r - mean) / std,
dr_grpo = r - mean, rloo = leave-one-out baseline), the same for every token of a
completion; `grpo.epochs` x `grpo.minibatches` updates of the clipped surrogate plus
beta x k3 KL(policy || reference) per token, reduced per `grpo.aggregation`. With one
update per rollout the ratio is 1 and the loss is the plain policy gradient.
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
from rlhfx.onpolicy import Rollout, RLState

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Settings:
  model: object
  scorer: onpolicy.Scorer
  sampling: onpolicy.SamplingSettings
  optimizer: object
  critic: None = None
  seed: int = 0
  advantage: str = "grpo"
  epochs: int = 1
  minibatches: int = 1
  grad_accum_steps: int = 1
  clip_eps: float = 0.2
  clip_eps_high: float | None = None
  aggregation: str = "sequence_mean"
  use_reference: bool = True  # False (beta = 0): no reference forward pass, no KL term

  @classmethod
  def from_config(cls, config, **modules) -> "Settings":
    g = config.grpo
    return cls(seed=config.seed, advantage=g.advantage, epochs=g.epochs, minibatches=g.minibatches,
               grad_accum_steps=config.train.grad_accum_steps, clip_eps=g.clip_eps,
               clip_eps_high=g.clip_eps_high or None, aggregation=g.aggregation, use_reference=g.beta > 0,
               **modules)

  def check(self):
    if self.advantage not in L.ADVANTAGES:
      raise ValueError(f"config.grpo.advantage={self.advantage!r}; expected one of {L.ADVANTAGES}")
    if self.aggregation not in L.AGGREGATIONS:
      raise ValueError(f"config.grpo.aggregation={self.aggregation!r}; expected one of {L.AGGREGATIONS}")
    if self.sampling.group_size < 2:
      raise ValueError(f"config.rollout.group_size={self.sampling.group_size}: group advantages need >= 2 samples")
    return self


def minibatch_loss(params, mb: dict, *, s: Settings, beta: Array):
  """Clipped surrogate with per-row advantages + beta x k3 KL to the reference, aggregated per settings."""
  r = mb["rollout"]
  logps_BxC, ent_BxC, _ = onpolicy.completion_stats(s.model, params["policy"], r, temperature=s.sampling.temperature,
                                                    entropy=True)
  mask_BxC = r.mask_BxC
  advantages_BxC = jnp.broadcast_to(mb["advantages_B"][:, None], mask_BxC.shape)
  pg, pg_m = L.ppo_policy_loss(logps_BxC, mb["old_logps_BxC"], advantages_BxC, mask_BxC, clip_eps=s.clip_eps,
                               clip_eps_high=s.clip_eps_high, aggregation=s.aggregation,
                               normaliser=s.sampling.max_new_tokens)
  kl = L.aggregate(L.kl_estimate(logps_BxC, mb["ref_logps_BxC"], "k3"), mask_BxC, s.aggregation,
                   normaliser=s.sampling.max_new_tokens)
  loss = pg + beta * kl
  return loss, {"policy_loss": pg, "kl": kl, "entropy": masked_mean(ent_BxC, mask_BxC),
                "approxkl": pg_m["approxkl"], "clipfrac": pg_m["clipfrac"], "ratio": pg_m["ratio"]}


def update_step(state: RLState, r: Rollout, scores_B: Array, frozen: dict, s: Settings):
  mask_BxC = r.mask_BxC
  scores_B, has_eos_B = onpolicy.finish_scores(scores_B, r, s.sampling.eos_id, s.scorer.missing_eos_penalty)
  advantages_B = L.group_advantages(scores_B, s.sampling.group_size, kind=s.advantage)
  old_logps_BxC = jax.lax.stop_gradient(onpolicy.completion_stats(s.model, state.params["policy"], r,
                                                                  temperature=s.sampling.temperature)[0])
  if s.use_reference:
    ref_logps_BxC = onpolicy.completion_stats(s.model, frozen["reference"], r,
                                              temperature=s.sampling.temperature)[0]
  else:  # the KL term is 0 and the reference is not run
    ref_logps_BxC = old_logps_BxC
  data = {"rollout": r, "old_logps_BxC": old_logps_BxC, "ref_logps_BxC": ref_logps_BxC, "advantages_B": advantages_B}
  loss = functools.partial(minibatch_loss, s=s, beta=state.kl_coef)
  params, opt_state, m = onpolicy.minibatch_epochs(state.params, state.opt_state, s.optimizer, data, loss,
                                                   onpolicy.update_key(state, s),
                                                   epochs=s.epochs, minibatches=s.minibatches,
                                                   grad_accum_steps=s.grad_accum_steps)
  scores_NxG = scores_B.reshape(-1, s.sampling.group_size)
  metrics = {
      "train/loss": m["loss"], "objective/scores": scores_B.mean(),
      "objective/entropy": jnp.sum(jnp.where(mask_BxC, -old_logps_BxC, 0.0), axis=-1).mean(),
      "objective/scores_std_in_group": scores_NxG.std(-1).mean(),
      "objective/zero_std_groups": jnp.mean(scores_NxG.std(-1) == 0), "loss/policy_avg": m["policy_loss"],
      "loss/kl_avg": m["kl"], "policy/approxkl_avg": m["approxkl"], "policy/clipfrac_avg": m["clipfrac"],
      "policy/entropy_avg": m["entropy"], "val/ratio": m["ratio"], "val/num_eos_tokens": has_eos_B.sum(),
      "val/completion_length": mask_BxC.sum(-1).mean(), "train/grad_norm": m["grad_norm"]}
  if s.use_reference:
    metrics["objective/kl"] = onpolicy.sequence_kl(old_logps_BxC, ref_logps_BxC, mask_BxC).mean()
  return RLState(step=state.step + 1, params=params, opt_state=opt_state, kl_coef=state.kl_coef), metrics


def init_params(policy, runtime, setup, scorer, reward_params, config):
  del runtime, setup, scorer, reward_params, config
  return {"policy": policy}, None


def train(config, workdir: str) -> dict[str, float]:
  """Train per `config` (see the module docstring); returns the final metrics."""
  return onpolicy_loop.train(config, workdir, algorithm="grpo", init_params=init_params,
                             settings=Settings.from_config, update_step=update_step, epochs=config.grpo.epochs,
                             minibatches=config.grpo.minibatches, kl_coef=config.grpo.beta)
