"""The jitted programs of a PPO or GRPO iteration and how a run calls them, the state donated.

  steps = onpolicy.Steps.jit(s, shardings, layout, iteration=ppo.iteration, policy=ppo.policy_params,
                             update_step=ppo.update_step)
  state, metrics, r, scores_B = onpolicy.run_iteration(steps, state, batch, frozen, score, mesh, phased=False)

With an in-graph score (a reward model, traceable reward functions) an iteration is one
program (`Steps.iteration`: rollout, scoring, update); with a sampling layout the rollout is
`reshard` then `sample` in that layout and `scored_update` the rest; with text reward
functions or `train.time_phases` the rollout, scoring (`score_fn`: the program and the host's
text functions) and update run one after the other, timed. `rlhfx.plan` compiles these same
functions.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax

from rlhfx import reward_functions, rollout, sampling_layout, scoring, sharding
from rlhfx.data import prepare

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Steps:
  """The jitted programs of an iteration, the state donated (`rlhfx.plan` compiles these same functions).

  With a sampling layout (`rlhfx.sampling_layout`), a rollout is `reshard` (the policy's weights into the
  layout) then `sample` there; without one, `rollout` samples in the training layout."""

  iteration: Callable  # (state, batch, frozen) -> (state, metrics, rollout, scores_B): all of it in one program
  rollout: Callable  # (state, batch) -> rollout, sampled in the training layout
  score: Callable  # (rollout, reward params) -> (scores_B, parts): the in-graph scoring
  update: Callable  # (state, rollout, scores_B, frozen) -> (state, metrics)
  scored_update: Callable  # (state, rollout, frozen) -> (state, metrics, rollout, scores_B): in-graph scoring
  layout: sampling_layout.Layout | None = None
  reshard: Callable | None = None  # state -> the policy's parameters in the sampling layout
  sample: Callable | None = None  # (params, batch, step) -> rollout: sampling in the layout (call under it)

  @classmethod
  def jit(cls, s, shardings, layout: sampling_layout.Layout | None = None, *, iteration: Callable,
          policy: Callable, update_step: Callable) -> "Steps":
    """From an algorithm's Settings `s` (scorer, seed, sampling) and its pure functions, each taking `s=`;
    `policy(state, s=)` is the policy's parameters the model samples with (LoRA merged)."""
    iteration, policy, update_step = (functools.partial(f, s=s) for f in (iteration, policy, update_step))
    scorer, sampling = s.scorer, s.sampling
    sample = functools.partial(rollout.sample_step, seed=s.seed, s=sampling)

    def rollout_step(state, batch):
      return sample(policy(state), batch, state.step)

    def scored(state, r, frozen):
      return fused_iteration(update_step, state, r, frozen, scorer)

    jitted = dict(
        iteration=jax.jit(iteration, in_shardings=(shardings, None, None), out_shardings=(shardings, None, None, None),
                          donate_argnums=0),
        rollout=jax.jit(rollout_step),
        score=jax.jit(lambda r, reward_params: scoring.scores(r, reward_params, scorer)),
        update=jax.jit(update_step, in_shardings=(shardings, None, None, None), out_shardings=(shardings, None),
                       donate_argnums=0),
        scored_update=jax.jit(scored, in_shardings=(shardings, None, None),
                              out_shardings=(shardings, None, None, None), donate_argnums=0))
    if layout is not None:
      training = jax.tree.leaves(shardings)[0].mesh
      jitted.update(layout=layout,
                    reshard=sampling_layout.reshard_program(layout, policy, sampling.model_config.jnp_dtype),
                    sample=sampling_layout.sample_program(layout, sample, training))
    return cls(**jitted)

  def sample_rollout(self, state, batch: dict[str, Array]) -> rollout.Rollout:
    """The iteration's rollout: in the sampling layout when there is one."""
    if self.layout is None:
      return self.rollout(state, batch)
    params = self.reshard(state)
    batch, step = sampling_layout.inputs(self.layout, batch, state.step)
    with sampling_layout.active(self.layout):
      return self.sample(params, batch, step)

  def fused(self, state, batch: dict[str, Array], frozen: dict):
    """(state, metrics, rollout, scores_B) of an iteration with in-graph scoring, nothing waited for."""
    if self.layout is None:
      return self.iteration(state, batch, frozen)
    return self.scored_update(state, self.sample_rollout(state, batch), frozen)


def fused_iteration(update_step: Callable, state, r: rollout.Rollout, frozen: dict, scorer: scoring.Scorer):
  """An algorithm's `iteration` after its rollout: in-graph scoring, then the update; (state, metrics with
  rewards/*, r, scores_B)."""
  scores_B, parts = scoring.scores(r, frozen["reward"], scorer)
  state, step_metrics = update_step(state, r, scores_B, frozen)
  return state, {**step_metrics, **reward_functions.metrics(parts)}, r, scores_B


def run_phases(steps: Steps, state, batch: dict[str, Array], frozen: dict, score: Callable):
  """(state, metrics + rewards/* + time/*_s, rollout, scores_B): rollout, `score(rollout) -> (scores_B, parts)`
  (the scoring program, or it and host scoring) and update one after the other, each timed."""
  t0 = time.perf_counter()
  r = jax.block_until_ready(steps.sample_rollout(state, batch))
  t1 = time.perf_counter()
  scores_B, parts = jax.block_until_ready(score(r))
  t2 = time.perf_counter()
  state, metrics = jax.block_until_ready(steps.update(state, r, scores_B, frozen))
  times = {"time/rollout_s": t1 - t0, "time/scoring_s": t2 - t1, "time/update_s": time.perf_counter() - t2}
  return state, {**metrics, **reward_functions.metrics(parts), **times}, r, scores_B


def score_fn(steps: Steps, scorer: scoring.Scorer, reward_params, tokenizer, mesh, source=None) -> Callable:
  """(rollout, this process's prompt ids or None) -> (scores_B, parts): the scoring program, and the text reward
  functions on the host with the columns of `source`'s prompt rows."""
  if scorer.in_graph:
    return lambda r, ids_B=None: steps.score(r, reward_params)
  return lambda r, ids_B=None: scoring.score_on_host(
      scorer, tokenizer, r, mesh, in_graph=steps.score(r, reward_params) if scorer.has_graph_part else None,
      prompt_ids=ids_B, source=source)


def run_iteration(steps: Steps, state, batch: dict, frozen: dict, score: Callable, mesh, *, phased: bool):
  """(state, metrics, rollout, scores_B) of one iteration on this process's host `batch` (its `example_id_B` go
  to host scoring): the fused program, or the timed phases."""
  global_batch = sharding.global_batch(prepare.drop_ids(batch), mesh)
  if not phased:
    return steps.fused(state, global_batch, frozen)
  return run_phases(steps, state, global_batch, frozen, lambda r: score(r, batch.get("example_id_B")))


def heldout(config, data, s, steps: Steps, frozen: dict, mesh) -> Callable[..., dict[str, float]]:
  """policy params -> the held-out metrics of an on-policy run (`rollout.heldout_rollouts`: one sample per eval
  prompt, scored, KL to the reference); {} without an eval split. `s`: the algorithm's Settings."""
  if data.eval is None:
    return lambda params: {}
  score = score_fn(steps, s.scorer, frozen["reward"], data.tokenizer, mesh, data.eval)
  sample = jax.jit(functools.partial(rollout.eval_rollout, model=s.model, chunk_size=s.chunk_size,
                                     s=dataclasses.replace(s.sampling, group_size=1), lora_scale=s.lora_scale))

  def evaluate(params) -> dict[str, float]:
    batches = prepare.full_batches(config, data, data.eval, limit=config.train.eval_batches, keep_ids=True)
    return rollout.heldout_rollouts(lambda b, rng: sample(params, b, frozen["reference"], rng), score, batches, mesh,
                                    seed=config.seed, eos_id=s.sampling.eos_id,
                                    missing_eos_penalty=s.scorer.missing_eos_penalty)

  return evaluate
