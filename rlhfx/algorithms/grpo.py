"""GRPO and its critic-free relatives (Dr.GRPO, RLOO): G samples per prompt, group-relative advantages.

  python -m rlhfx.main --config=configs/grpo_letters.py:tiny --workdir=/tmp/grpo_letters

One iteration: sample `rollout.group_size` completions per prompt (rlhfx.rollout); score
them (reward model, in-graph reward function, or a Python text function on the host —
verifiable rewards); advantages from each prompt's group (`grpo.advantage`: grpo =
(r - mean) / std, dr_grpo = r - mean, rloo = leave-one-out baseline), the same for every
token of a completion; `grpo.epochs` x `grpo.minibatches` updates of the clipped
surrogate plus beta x k3 KL(policy || reference) per token, reduced per
`grpo.aggregation`. With one update per rollout the ratio is 1 and the loss is the plain
policy gradient. With beta = 0 the reference is neither kept nor run.
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
from rlhfx.optim import make_optimizer
from rlhfx.rollout import Rollout
from rlhfx.train_state import Initial, create_state

Array = jax.Array


@flax.struct.dataclass
class GRPOState:
  step: Array  # iterations done
  params: object  # the policy (LoRA: {"base", "lora"})
  opt_state: object


def init_state(params, *, optimizer: optax.GradientTransformation) -> GRPOState:
  return GRPOState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything static about an iteration: modules, sampling and the grpo.* hyper-parameters."""

  model: Transformer
  scorer: scoring.Scorer
  sampling: rollout.SamplingSettings
  optimizer: object
  seed: int = 0
  advantage: str = "grpo"
  beta: float = 0.04  # weight of the k3 KL term; 0: no reference forward pass
  epochs: int = 1
  minibatches: int = 1
  grad_accum_steps: int = 1
  clip_eps: float = 0.2
  clip_eps_high: float | None = None
  aggregation: str = "sequence_mean"
  lora_scale: float = 1.0
  chunk_size: int | None = None  # LM-head positions per chunk

  @classmethod
  def from_config(cls, config, **modules) -> "Settings":
    g = config.grpo
    return cls(seed=config.seed, advantage=g.advantage, beta=g.beta, epochs=g.epochs, minibatches=g.minibatches,
               grad_accum_steps=config.train.grad_accum_steps, clip_eps=g.clip_eps,
               clip_eps_high=g.clip_eps_high or None, aggregation=g.aggregation,
               lora_scale=lora.scale(config.lora),
               chunk_size=config.model.lm_head_chunk or None, **modules)


def policy_logps(params, r: Rollout, s: Settings, *, entropy: bool = False):
  """(logps_BxC, entropy_BxC or None) of the completion tokens under the policy `params`."""
  return rollout.completion_stats(s.model, lora.effective(params, s.lora_scale), r,
                                  temperature=s.sampling.temperature, chunk_size=s.chunk_size, entropy=entropy)[:2]


def minibatch_loss(params, mb: dict, *, s: Settings):
  """Clipped surrogate with per-row advantages + beta x k3 KL to the reference, aggregated per settings."""
  r = mb["rollout"]
  logps_BxC, ent_BxC = policy_logps(params, r, s, entropy=True)
  mask_BxC = r.mask_BxC
  advantages_BxC = jnp.broadcast_to(mb["advantages_B"][:, None], mask_BxC.shape)
  pg, pg_m = losses.ppo_policy_loss(logps_BxC, mb["old_logps_BxC"], advantages_BxC, mask_BxC, clip_eps=s.clip_eps,
                               clip_eps_high=s.clip_eps_high, aggregation=s.aggregation,
                               normaliser=s.sampling.max_new_tokens)
  kl = losses.aggregate(losses.kl_estimate(logps_BxC, mb["ref_logps_BxC"], "k3"), mask_BxC, s.aggregation,
                   normaliser=s.sampling.max_new_tokens)
  return pg + s.beta * kl, {"policy_loss": pg, "kl": kl, "entropy": masked_mean(ent_BxC, mask_BxC),
                            "approxkl": pg_m["approxkl"], "clipfrac": pg_m["clipfrac"], "ratio": pg_m["ratio"]}


def policy_params(state: GRPOState, s: Settings):
  """The policy's parameters the model samples with (LoRA merged)."""
  return lora.effective(state.params, s.lora_scale)


def update_step(state: GRPOState, r: Rollout, scores_B: Array, frozen: dict, s: Settings):
  mask_BxC = r.mask_BxC
  scores_B, has_eos_B = scoring.finish_scores(scores_B, r, s.sampling.eos_id, s.scorer.missing_eos_penalty)
  advantages_B = losses.group_advantages(scores_B, s.sampling.group_size, kind=s.advantage)
  old_logps_BxC = jax.lax.stop_gradient(policy_logps(state.params, r, s)[0])
  if s.beta:
    ref_logps_BxC = rollout.completion_stats(s.model, frozen["reference"], r, temperature=s.sampling.temperature,
                                             chunk_size=s.chunk_size)[0]
  else:  # the KL term is 0 and the reference is not run
    ref_logps_BxC = old_logps_BxC
  data = {"rollout": r, "old_logps_BxC": old_logps_BxC, "ref_logps_BxC": ref_logps_BxC, "advantages_B": advantages_B}
  params, opt_state, m = rollout.minibatch_epochs(state.params, state.opt_state, s.optimizer, data,
                                                  functools.partial(minibatch_loss, s=s),
                                                  rollout.key(s.seed, state.step, 1), epochs=s.epochs,
                                                  minibatches=s.minibatches, grad_accum_steps=s.grad_accum_steps)
  scores_NxG = scores_B.reshape(-1, s.sampling.group_size)
  step_metrics = {
      **rollout.logprob_agreement(r, old_logps_BxC),  # sampler vs trainer
      "train/loss": m["loss"], "objective/scores": scores_B.mean(),
      "objective/entropy": jnp.sum(jnp.where(mask_BxC, -old_logps_BxC, 0.0), axis=-1).mean(),
      "objective/scores_std_in_group": scores_NxG.std(-1).mean(),
      "objective/zero_std_groups": jnp.mean(scores_NxG.std(-1) == 0), "loss/policy_avg": m["policy_loss"],
      "loss/kl_avg": m["kl"], "policy/approxkl_avg": m["approxkl"], "policy/clipfrac_avg": m["clipfrac"],
      "policy/entropy_avg": m["entropy"], "val/ratio": m["ratio"], "val/num_eos_tokens": has_eos_B.sum(),
      "val/completion_length": mask_BxC.sum(-1).mean(), "train/grad_norm": m["grad_norm"]}
  if s.beta:
    step_metrics["objective/kl"] = rollout.sequence_kl(old_logps_BxC, ref_logps_BxC, mask_BxC).mean()
  return GRPOState(step=state.step + 1, params=params, opt_state=opt_state), step_metrics


def iteration(state: GRPOState, batch: dict[str, Array], frozen: dict, s: Settings):
  """Rollout (in the training layout), in-graph scoring and update: (new state, metrics, the rollout, its
  scores_B)."""
  r = rollout.sample_step(policy_params(state, s), batch, state.step, seed=s.seed, s=s.sampling)
  return onpolicy.fused_iteration(functools.partial(update_step, s=s), state, r, frozen, s.scorer)


def jit_programs(s: Settings, shardings, layout: sampling_layout.Layout | None = None) -> onpolicy.Steps:
  """The jitted programs a run executes."""
  return onpolicy.Steps.jit(s, shardings, layout, iteration=iteration, policy=policy_params, update_step=update_step)


def init(config, model_config: ModelConfig, trees: load.Trees, tokenizer=None, columns=None) -> Initial:
  """The state (the policy, LoRA-wrapped per config.lora, and its optimizer state), the frozen reference and
  reward model, and the jitted programs: arrays for `train`, ShapeDtypeStructs for the planner (`trees.abstract`,
  no tokenizer: the model's own EOS and pad ids)."""
  model = Transformer(model_config)
  base = trees.params(model)
  reference = trees.frozen(base, model_config.jnp_dtype)  # the held-out KL is measured against it even at beta = 0
  params = lora.wrap(base, config.lora, init_seed(config) + 1)
  scorer, reward_params = scoring.make_scorer(config, tokenizer, trees, model_config, columns)
  if reward_params is not None:  # the frozen scorer is kept in its compute dtype
    reward_params = trees.frozen(reward_params, scorer.module.config.jnp_dtype)
  g = config.grpo
  optimizer = make_optimizer(config.optim, config.train.num_steps * g.epochs * g.minibatches, params,
                             frozen=lora.frozen(config.lora))
  sampling = rollout.SamplingSettings.from_config(config, model_config, tokenizer)
  s = Settings.from_config(config, model=model, scorer=scorer, sampling=sampling, optimizer=optimizer)
  state, shardings = create_state(functools.partial(init_state, optimizer=optimizer), params, trees.runtime.mesh)
  steps = jit_programs(s, shardings, sampling_layout.make(config, model, trees.runtime))
  return Initial(state, shardings, {"reference": reference, "reward": reward_params}, steps, s,
                 flops.iteration_flops(model_config, max(config.data.buckets), sampling.max_new_tokens, g.epochs,
                                       False))


def no_signal(workdir) -> list[str]:
  """A summary line when every logged iteration's groups scored alike (objective/zero_std_groups = 1): every
  advantage was 0, so the loss was 0 and the policy never moved, whatever the learning rate."""
  zero = [r["objective/zero_std_groups"] for r in metrics.rows(workdir) if "objective/zero_std_groups" in r]
  if not zero or min(zero) < 1.0:
    return []
  return [f"no learning signal: in all {len(zero)} logged iterations every group's completions scored alike "
          "(objective/zero_std_groups = 1), so every advantage and the loss were 0 and the policy did not move; "
          "GRPO needs a policy that sometimes earns the reward (an SFT'd model, an easier task)"]


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
    evaluate = lambda state: heldout(state.params)  # noqa: E731

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
  lines = no_signal(workdir) + export.export_policy(config, model_config, state.params, data.tokenizer, workdir)
  export.print_summary(f"GRPO ({config.grpo.advantage} advantages) for {t.num_steps} iterations",
                       rollout.summary(before, after, workdir) + lines, workdir, data)
  return {**log.last, **after}
