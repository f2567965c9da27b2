"""Reward model: a scalar head on the decoder trained on preference pairs with the Bradley-Terry loss.

  python -m rlhfx.main --config=configs/reward_hh.py:tiny --workdir=/tmp/reward_hh

Chosen and rejected rows go through one forward pass; the reward is read at each
row's last real token. After training, the mean and std of rewards over a sample
of training data are written to <workdir>/checkpoints/reward_stats.json, where PPO
reads them to normalise scores.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhfx import loop, rewards, sharding
from rlhfx.losses.common import concat_pairs
from rlhfx.losses.preference import bradley_terry_loss
from rlhfx.metrics import sequence_train_flops, wilson_interval
from rlhfx.models.heads import ScoreModel, from_lm_params
from rlhfx.optim import learning_rate_schedule, make_optimizer
from rlhfx.train_state import TrainState, accumulate_gradients, apply_gradients

Array = jax.Array


def pair_rewards(model: ScoreModel, params, batch: dict[str, Array]) -> tuple[Array, Array]:
  """(chosen rewards_B, rejected rewards_B) from one forward over the 2B rows."""
  tokens, mask, _ = concat_pairs(batch)
  rewards_2B = model.apply({"params": params}, tokens, mask)
  return jnp.split(rewards_2B, 2)


def loss_fn(params, batch, *, model: ScoreModel, center_coef: float = 0.0):
  chosen_B, rejected_B = pair_rewards(model, params, batch)
  return bradley_terry_loss(chosen_B, rejected_B, center_coef=center_coef)


def train_step(state: TrainState, batch, *, model: ScoreModel, optimizer, schedule, center_coef: float = 0.0,
               grad_accum_steps: int = 1):
  loss = functools.partial(loss_fn, model=model, center_coef=center_coef)
  grads, m = accumulate_gradients(loss, state.params, batch, grad_accum_steps, average=True)
  metrics = {"train/loss": m["loss"], "train/accuracy": m["accuracy"], "train/margin": m["margin"],
             "train/rewards_chosen": m["rewards/chosen"], "train/rewards_rejected": m["rewards/rejected"],
             "train/grad_norm": optax.global_norm(grads), "train/lr": schedule(state.step)}
  return apply_gradients(state, grads, optimizer), metrics


def jit_train_step(config, model: ScoreModel, optimizer, shardings):
  """The jitted step a run executes, state donated (`rlhfx.plan` compiles this same function)."""
  step = functools.partial(train_step, model=model, optimizer=optimizer,
                           schedule=learning_rate_schedule(config.optim, config.train.num_steps),
                           center_coef=config.reward.center_coef, grad_accum_steps=config.train.grad_accum_steps)
  return jax.jit(step, in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=0)


def eval_step(params, batch, *, model: ScoreModel):
  chosen_B, rejected_B = pair_rewards(model, params, batch)
  return {"chosen_B": chosen_B, "rejected_B": rejected_B}


def evaluate(params, batches, eval_fn, mesh) -> dict[str, float]:
  """Held-out accuracy (with its 95% Wilson interval) and mean margin over every pair of `batches`."""
  correct = n = 0
  margins = []
  for local in batches:
    valid = local.pop("valid_B")
    out = jax.device_get(eval_fn(params, sharding.global_batch(local, mesh)))
    diff = (out["chosen_B"] - out["rejected_B"])[valid]
    correct, n = correct + int((diff > 0).sum()), n + int(valid.sum())
    margins.append(diff)
  low, high = wilson_interval(correct, n)
  return {"eval/accuracy": correct / max(n, 1), "eval/accuracy_low95": low, "eval/accuracy_high95": high,
          "eval/margin": float(np.concatenate(margins).mean()) if margins else 0.0, "eval/pairs": n}


def reward_stats(params, batches, eval_fn, mesh) -> dict[str, float]:
  rewards = []
  for local in batches:
    valid = local.pop("valid_B")
    out = jax.device_get(eval_fn(params, sharding.global_batch(local, mesh)))
    rewards += [out["chosen_B"][valid], out["rejected_B"][valid]]
  r = np.concatenate(rewards)
  return {"mean": float(r.mean()), "std": float(r.std()), "count": int(r.size)}


def train(config, workdir: str) -> dict[str, float]:
  setup = loop.setup(config, workdir, kind="preference")
  runtime, model_config, data = setup.runtime, setup.model_config, setup.data
  workdir = runtime.workdir
  model = ScoreModel(model_config)
  params = loop.init_params(model_config, runtime, jax.random.key(config.seed), module=model)
  if setup.loaded_params is not None:  # a pretrained LM as the backbone; the score head stays random
    shardings = loop.param_shardings(model, runtime)
    score = jax.device_get(params["score"])
    params = loop.put(from_lm_params(setup.loaded_params, score), shardings)
  optimizer = make_optimizer(config.optim, config.train.num_steps, params)
  state, shardings = loop.create_state(params, optimizer, runtime)

  train_iter = iter(loop.batches(config, data, data.train, "preference", seed=config.seed))
  checkpointer, state, start = loop.resume(config, workdir, state, train_iter)
  with sharding.active(runtime.mesh, runtime.rules):
    step_fn = jit_train_step(config, model, optimizer, shardings)
    eval_jit = jax.jit(functools.partial(eval_step, model=model))

  def run_eval(state, step_number):
    if data.eval is None:
      return {}
    with sharding.active(runtime.mesh, runtime.rules):
      return evaluate(state.params, loop.full_batches(config, data, data.eval, "preference"), eval_jit,
                      runtime.mesh)

  outcome = loop.train_and_evaluate(
      config=config, runtime=runtime, state=state, start=start, step_fn=step_fn, train_iter=train_iter,
      checkpointer=checkpointer, tokens_per_step=lambda b: 2 * b["chosen_tokens_BxT"].size,
      flops_per_token=sequence_train_flops(model_config, max(config.data.buckets), kept=1, lm_head=False)
      / max(config.data.buckets),
      evaluate=run_eval)
  result, before, after, final = outcome.result, outcome.before, outcome.after, outcome.final
  if result.stopped_early:
    return final
  with sharding.active(runtime.mesh, runtime.rules):
    stats = reward_stats(result.state.params, loop.full_batches(config, data, data.train, "preference",
                                                                limit=config.reward.stats_batches),
                         eval_jit, runtime.mesh)
  export = rewards.export_reward_model(workdir / rewards.EXPORT_DIR, model_config, result.state.params, stats)
  if jax.process_index() == 0:
    (workdir / "checkpoints" / "reward_stats.json").write_text(json.dumps(stats, indent=2))
    lines = ["", "== summary ==",
             f"reward model ({model_config.num_params():,} backbone parameters) trained {config.train.num_steps} "
             f"steps on {data.counts.get('written/train', 0)} pairs"]
    if before and after:
      lines.append(f"held-out accuracy {before['eval/accuracy']:.1%} -> {after['eval/accuracy']:.1%} "
                   f"(95% interval {after['eval/accuracy_low95']:.1%}-{after['eval/accuracy_high95']:.1%}, "
                   f"{after['eval/pairs']} pairs)")
    lines += [f"reward mean {stats['mean']:.3f}, std {stats['std']:.3f} over {stats['count']} train completions "
              f"-> {workdir / 'checkpoints' / 'reward_stats.json'}",
              f"reward model for PPO/GRPO (config.scoring.model): {export}",
              f"metrics: {workdir / 'metrics.jsonl'}; checkpoints: {workdir / 'checkpoints'}"]
    print("\n".join(lines), flush=True)
  return final
