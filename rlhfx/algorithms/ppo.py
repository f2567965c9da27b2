"""PPO with a critic for RLHF (Ziegler et al. 2019; Huang et al. 2024, "The N+ implementation details").

  python -m rlhfx.main --config=configs/ppo_hh.py:tiny --workdir=/tmp/ppo_hh

One iteration, one compiled program (`iteration`):
  rollout   sample completions of the prompt batch with the current policy (rlhfx.rollout);
  scoring   the reward model's score at the last token, normalised with the reward run's
            mean/std, minus `missing_eos_penalty` for completions cut before EOS
            (or a reward function: rlhfx.scoring);
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

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhfx.config import init_seed
from rlhfx import (checkpoint, export, flops, metrics, onpolicy, rollout, sampling_layout, scoring, setup,
                   sharding)
from rlhfx.data import prepare
from rlhfx.losses import policy as losses
from rlhfx.losses.common import masked_mean
from rlhfx.models import ModelConfig, Transformer, load, lora
from rlhfx.models.heads import ScoreModel, from_lm_params
from rlhfx.optim import make_optimizer
from rlhfx.rollout import Rollout
from rlhfx.train_state import Initial, create_state

Array = jax.Array


@flax.struct.dataclass
class PPOState:
  step: Array  # iterations done
  params: dict  # {"policy": LM params, "value": ScoreModel params | "value_head": {"kernel"}}
  opt_state: object
  kl_coef: Array  # the current KL coefficient (adaptive when a target is set)


def init_state(params, *, optimizer: optax.GradientTransformation, kl_coef: float) -> PPOState:
  return PPOState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                  kl_coef=jnp.float32(kl_coef))


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything static about an iteration: modules, sampling and the ppo.* hyper-parameters."""

  model: Transformer
  critic: ScoreModel | None  # None: value head on the policy
  scorer: scoring.Scorer
  sampling: rollout.SamplingSettings
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
  kl_penalty: str = "token"  # token: -kl_coef x KL on each token; sequence: the summed KL on the last token
  kl_target: float = 0.0
  kl_horizon: int = 10000
  whiten_advantages: bool = True
  whiten_rewards: bool = False
  aggregation: str = "token_mean"
  lora_scale: float = 1.0  # alpha / rank when the policy and critic carry LoRA adapters
  chunk_size: int | None = None  # LM-head positions per chunk

  @classmethod
  def from_config(cls, config, **modules) -> "Settings":
    p = config.ppo
    return cls(seed=config.seed, epochs=p.epochs, minibatches=p.minibatches,
               grad_accum_steps=config.train.grad_accum_steps, clip_eps=p.clip_eps, dual_clip=p.dual_clip or None,
               value_clip=p.value_clip or None, vf_coef=p.vf_coef, entropy_coef=p.entropy_coef, gamma=p.gamma,
               lam=p.lam, kl_estimator=p.kl_estimator, kl_in=p.kl_in, kl_penalty=p.kl_penalty, kl_target=p.kl_target,
               kl_horizon=p.kl_horizon, whiten_advantages=p.whiten_advantages, whiten_rewards=p.whiten_rewards,
               aggregation=p.aggregation, lora_scale=lora.scale(config.lora),
               chunk_size=config.model.lm_head_chunk or None, **modules)


def policy_and_values(params, r: Rollout, s: Settings, *, entropy: bool = False):
  """(logps_BxC, entropy_BxC, values_BxC) of the completion tokens under `params`."""
  logps_BxC, ent_BxC, hidden_BxCxD = rollout.completion_stats(
      s.model, lora.effective(params["policy"], s.lora_scale), r, temperature=s.sampling.temperature,
      chunk_size=s.chunk_size, entropy=entropy)
  if s.critic is None:
    values_BxC = (hidden_BxCxD.astype(jnp.float32) @ params["value_head"]["kernel"])[..., 0]
  else:
    values_BxC = rollout.completion_values(s.critic, lora.effective(params["value"], s.lora_scale), r)
  return logps_BxC, ent_BxC, values_BxC


def minibatch_loss(params, mb: dict, *, s: Settings, kl_coef: Array):
  """Clipped policy loss + vf_coef x clipped value loss (- entropy bonus, + KL term when kl_in='loss')."""
  r = mb["rollout"]
  logps_BxC, ent_BxC, values_BxC = policy_and_values(params, r, s, entropy=True)
  mask_BxC = r.mask_BxC
  pg, pg_m = losses.ppo_policy_loss(logps_BxC, mb["old_logps_BxC"], mb["advantages_BxC"], mask_BxC,
                               clip_eps=s.clip_eps, dual_clip=s.dual_clip, aggregation=s.aggregation,
                               normaliser=s.sampling.max_new_tokens)
  vf, vf_m = losses.value_loss(values_BxC, mb["old_values_BxC"], mb["returns_BxC"], mask_BxC, clip_range=s.value_clip,
                          aggregation=s.aggregation, normaliser=s.sampling.max_new_tokens)
  entropy = masked_mean(ent_BxC, mask_BxC)
  loss = pg + s.vf_coef * vf - s.entropy_coef * entropy
  if s.kl_in == "loss":
    kl = losses.aggregate(losses.kl_estimate(logps_BxC, mb["ref_logps_BxC"], s.kl_estimator), mask_BxC, s.aggregation,
                     normaliser=s.sampling.max_new_tokens)
    loss = loss + kl_coef * kl
  return loss, {"policy_loss": pg, "value_loss": vf, "entropy": entropy, "approxkl": pg_m["approxkl"],
                "clipfrac": pg_m["clipfrac"], "ratio": pg_m["ratio"], "vf_clipfrac": vf_m["clipfrac"]}


def policy_params(state: PPOState, s: Settings):
  """The policy's parameters the model samples with (LoRA merged)."""
  return lora.effective(state.params["policy"], s.lora_scale)


def update_step(state: PPOState, r: Rollout, scores_B: Array, frozen: dict, s: Settings):
  """Statistics under the rollout's policy, rewards, GAE and the epochs x minibatches updates."""
  mask_BxC = r.mask_BxC
  scores_B, has_eos_B = scoring.finish_scores(scores_B, r, s.sampling.eos_id, s.scorer.missing_eos_penalty)
  old_logps_BxC, _, old_values_BxC = jax.lax.stop_gradient(policy_and_values(state.params, r, s))
  ref_logps_BxC = rollout.completion_stats(s.model, frozen["reference"], r, temperature=s.sampling.temperature,
                                           chunk_size=s.chunk_size)[0]
  kl_BxC = losses.kl_estimate(old_logps_BxC, ref_logps_BxC, s.kl_estimator)
  reward_kl_coef = state.kl_coef if s.kl_in == "reward" else 0.0
  rewards_BxC, non_score_BxC = losses.kl_penalized_rewards(scores_B, kl_BxC, mask_BxC, kl_coef=reward_kl_coef,
                                                      per_sequence=s.kl_penalty == "sequence")
  if s.whiten_rewards:
    rewards_BxC = losses.whiten(rewards_BxC, mask_BxC, shift_mean=False)
  advantages_BxC, returns_BxC = losses.gae(rewards_BxC, old_values_BxC, mask_BxC, gamma=s.gamma, lam=s.lam)
  if s.whiten_advantages:
    advantages_BxC = losses.whiten(advantages_BxC, mask_BxC)

  data = {"rollout": r, "old_logps_BxC": old_logps_BxC, "ref_logps_BxC": ref_logps_BxC,
          "old_values_BxC": old_values_BxC, "advantages_BxC": advantages_BxC, "returns_BxC": returns_BxC}
  loss = functools.partial(minibatch_loss, s=s, kl_coef=state.kl_coef)
  params, opt_state, m = rollout.minibatch_epochs(state.params, state.opt_state, s.optimizer, data, loss,
                                                  rollout.key(s.seed, state.step, 1), epochs=s.epochs,
                                                  minibatches=s.minibatches, grad_accum_steps=s.grad_accum_steps)

  # the sequence-level KL (k1, summed over tokens) the reward saw, and the controller's response to it
  kl_B = rollout.sequence_kl(old_logps_BxC, ref_logps_BxC, mask_BxC)
  kl_coef = state.kl_coef
  if s.kl_target:
    kl_coef = losses.AdaptiveKL(s.kl_target, s.kl_horizon).update(kl_coef, kl_B.mean(), scores_B.shape[0])
  non_score_B = non_score_BxC.sum(-1)
  step_metrics = {
      **rollout.logprob_agreement(r, old_logps_BxC),  # sampler vs trainer
      "train/loss": m["loss"], "objective/kl": kl_B.mean(), "objective/kl_coef": state.kl_coef,
      "objective/entropy": jnp.sum(jnp.where(mask_BxC, -old_logps_BxC, 0.0), axis=-1).mean(),
      "objective/non_score_reward": non_score_B.mean(), "objective/rlhf_reward": (scores_B + non_score_B).mean(),
      "objective/scores": scores_B.mean(), "policy/approxkl_avg": m["approxkl"], "policy/clipfrac_avg": m["clipfrac"],
      "policy/entropy_avg": m["entropy"], "loss/policy_avg": m["policy_loss"], "loss/value_avg": m["value_loss"],
      "val/clipfrac_avg": m["vf_clipfrac"], "val/ratio": m["ratio"], "val/num_eos_tokens": has_eos_B.sum(),
      "val/completion_length": mask_BxC.sum(-1).mean(), "train/grad_norm": m["grad_norm"]}
  return PPOState(step=state.step + 1, params=params, opt_state=opt_state, kl_coef=kl_coef), step_metrics


def iteration(state: PPOState, batch: dict[str, Array], frozen: dict, s: Settings):
  """Rollout (in the training layout), in-graph scoring and update: (new state, metrics, the rollout, its
  scores_B)."""
  r = rollout.sample_step(policy_params(state, s), batch, state.step, seed=s.seed, s=s.sampling)
  return onpolicy.fused_iteration(functools.partial(update_step, s=s), state, r, frozen, s.scorer)


def jit_programs(s: Settings, shardings, layout: sampling_layout.Layout | None = None) -> onpolicy.Steps:
  """The jitted programs a run executes."""
  return onpolicy.Steps.jit(s, shardings, layout, iteration=iteration, policy=policy_params, update_step=update_step)


def init_params(config, policy, scorer: scoring.Scorer, reward_params, model_config, trees: load.Trees):
  """({"policy", "value" | "value_head"}, the critic module or None) per config.ppo.value_model: a separate critic
  starts as a copy of the reward model, or else of the policy's backbone with a zero head."""
  if config.ppo.value_model == "policy_head":
    return {"policy": policy, "value_head": {"kernel": trees.zeros((model_config.d_model, 1), jnp.float32)}}, None
  if scorer.module is not None:
    return {"policy": policy, "value": trees.copy(reward_params)}, scorer.module
  head = {"kernel": trees.zeros((model_config.d_model, 1), model_config.jnp_param_dtype)}
  return {"policy": policy, "value": from_lm_params(trees.copy(policy), head)}, ScoreModel(model_config)


def init(config, model_config: ModelConfig, trees: load.Trees, tokenizer=None, columns=None) -> Initial:
  """The state (policy and critic, LoRA-wrapped per config.lora, their optimizer state, the KL coefficient), the
  frozen reference and reward model, and the jitted programs: arrays for `train`, ShapeDtypeStructs for the
  planner (`trees.abstract`, no tokenizer: the model's own EOS and pad ids)."""
  model = Transformer(model_config)
  policy = trees.params(model)
  reference = trees.frozen(policy, model_config.jnp_dtype)
  scorer, reward_params = scoring.make_scorer(config, tokenizer, trees, model_config, columns)
  params, critic = init_params(config, policy, scorer, reward_params, model_config, trees)
  # LoRA adapters (config.lora.rank > 0) on the policy and on a separate critic; a value head trains whole
  params = {k: v if k == "value_head" else lora.wrap(v, config.lora, init_seed(config) + 1 + i)
            for i, (k, v) in enumerate(params.items())}
  p = config.ppo
  optimizer = make_optimizer(config.optim, config.train.num_steps * p.epochs * p.minibatches, params,
                             frozen=lora.frozen(config.lora))
  sampling = rollout.SamplingSettings.from_config(config, model_config, tokenizer)
  s = Settings.from_config(config, model=model, critic=critic, scorer=scorer, sampling=sampling, optimizer=optimizer)
  if reward_params is not None:  # the critic took its own copy; the frozen scorer is kept in its compute dtype
    reward_params = trees.frozen(reward_params, scorer.module.config.jnp_dtype)
  state, shardings = create_state(functools.partial(init_state, optimizer=optimizer, kl_coef=p.kl_coef), params,
                                  trees.runtime.mesh)
  steps = jit_programs(s, shardings, sampling_layout.make(config, model, trees.runtime))
  return Initial(state, shardings, {"reference": reference, "reward": reward_params}, steps, s,
                 flops.iteration_flops(model_config, max(config.data.buckets), sampling.max_new_tokens, p.epochs,
                                       critic is not None))


def train(config, workdir: str) -> dict[str, float]:
  """Train per `config` (see the module docstring); returns the final metrics."""
  runtime, model_config, data = setup.run(config, workdir)
  mesh, workdir, t = runtime.mesh, runtime.workdir, config.train
  with sharding.active(mesh, runtime.rules):
    run = init(config, model_config, load.Trees.of_run(config, runtime), data.tokenizer,
               scoring.prompt_columns(data.train))
    s, frozen, steps = run.settings, run.frozen, run.jitted
    train_iter = iter(prepare.batches(config, data, data.train, seed=config.seed))
    checkpointer, state, start = checkpoint.resume(config, workdir, run.state, train_iter, frozen=frozen)
    sampling_layout.record(steps, state, workdir)
    score = onpolicy.score_fn(steps, s.scorer, frozen["reward"], data.tokenizer, mesh, data.train)
    heldout = onpolicy.heldout(config, data, s, steps, frozen, mesh)
    evaluate = lambda state: heldout(state.params["policy"])  # noqa: E731

    samples = metrics.SampleLog(workdir, data.tokenizer, t.log_samples_every)
    log = metrics.StepLog.of_run(config, workdir, data, checkpointer, start, run.flops_per_token)
    before, after = log.evaluation(start, lambda: evaluate(state)), {}
    with checkpoint.Preemption(checkpointer.directory) as preemption, checkpointer, log:
      for step in log.steps(start + 1, t.num_steps):
        batch = next(train_iter)
        state, step_metrics, r, scores_B = onpolicy.run_iteration(steps, state, batch, frozen, score, mesh,
                                                                  phased=t.time_phases or not s.scorer.in_graph)
        log.record(step, step_metrics, tokens=rollout.tokens(batch, s.sampling))
        samples.record(step, r, scores_B)
        if checkpoint.save_or_stop(step, state, train_iter, t, log, checkpointer, preemption):
          break
        if metrics.evaluation_due(step, t):
          after = log.evaluation(step, lambda: evaluate(state))
      samples.flush()
  lines = export.export_policy(config, model_config, state.params["policy"], data.tokenizer, workdir)
  export.print_summary(f"PPO for {t.num_steps} iterations",
                       rollout.summary(before, after, workdir) + lines, workdir, data)
  return {**log.last, **after}
