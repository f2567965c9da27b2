"""Reward model: a scalar head on the decoder trained on preference pairs with the Bradley-Terry loss.

  python -m rlhfx.main --config=configs/reward_hh.py:tiny --workdir=/tmp/reward_hh

Chosen and rejected rows go through one forward pass; the reward is read at each
row's last real token. After training, the mean and std of rewards over a sample
of training data are written to <workdir>/checkpoints/reward_stats.json, and the
model with them to <workdir>/reward_model, where PPO/GRPO read it to score.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhfx import checkpoint, evaluation, export, flops, metrics, scoring, setup, sharding
from rlhfx.data import prepare
from rlhfx.losses.common import concat_pairs
from rlhfx.losses.reward import bradley_terry_loss
from rlhfx.config import init_seed
from rlhfx.models import ModelConfig, load, lora
from rlhfx.models.heads import ScoreModel
from rlhfx.optim import learning_rate_schedule, make_optimizer
from rlhfx.train_state import Initial, TrainState, create_state, init_state, update

Array = jax.Array


def pair_rewards(model: ScoreModel, params, batch: dict[str, Array], lora_scale: float = 1.0):
  """(chosen rewards_B, rejected rewards_B) from one forward over the 2B rows."""
  tokens, mask, _ = concat_pairs(batch)
  rewards_2B = model.apply({"params": lora.effective(params, lora_scale)}, tokens, mask)
  return jnp.split(rewards_2B, 2)


def loss_fn(params, batch, *, model: ScoreModel, center_coef: float = 0.0, lora_scale: float = 1.0):
  chosen_B, rejected_B = pair_rewards(model, params, batch, lora_scale)
  return bradley_terry_loss(chosen_B, rejected_B, center_coef=center_coef)


def train_step(state: TrainState, batch, *, model: ScoreModel, optimizer, schedule, center_coef: float = 0.0,
               grad_accum_steps: int = 1, lora_scale: float = 1.0):
  loss = functools.partial(loss_fn, model=model, center_coef=center_coef, lora_scale=lora_scale)
  new_state, grads, m = update(state, loss, batch, optimizer, grad_accum_steps, average=True)
  return new_state, {"train/loss": m["loss"], "train/accuracy": m["accuracy"], "train/margin": m["margin"],
                     "train/rewards_chosen": m["rewards/chosen"], "train/rewards_rejected": m["rewards/rejected"],
                     "train/grad_norm": optax.global_norm(grads), "train/lr": schedule(state.step)}


def step_function(config, model_config: ModelConfig, optimizer, schedule, numbers=None):
  """train_step(state, batch) with everything but the state and batch bound; `numbers` may replace
  "reward.center_coef" (a traced value per member: rlhfx.members)."""
  center_coef = (numbers or {}).get("reward.center_coef", config.reward.center_coef)
  return functools.partial(train_step, model=ScoreModel(model_config), optimizer=optimizer, schedule=schedule,
                           center_coef=center_coef, grad_accum_steps=config.train.grad_accum_steps,
                           lora_scale=lora.scale(config.lora))


def jit_train_step(config, model_config: ModelConfig, optimizer, shardings):
  """The jitted step a run executes, state donated."""
  step = step_function(config, model_config, optimizer, learning_rate_schedule(config.optim, config.train.num_steps))
  return jax.jit(step, in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=0)


def init(config, model_config: ModelConfig, trees: load.Trees) -> Initial:
  """The state (a ScoreModel: the pretrained language model as its backbone when config.model.init_from names one,
  a random score head; LoRA-wrapped per config.lora) and the jitted step: arrays for `train`, ShapeDtypeStructs
  for the planner (`trees.abstract`)."""
  model = ScoreModel(model_config)
  params = lora.wrap(trees.score_params(model), config.lora, init_seed(config) + 1)
  optimizer = make_optimizer(config.optim, config.train.num_steps, params, frozen=lora.frozen(config.lora))
  state, shardings = create_state(functools.partial(init_state, optimizer=optimizer), params, trees.runtime.mesh)
  length = max(config.data.buckets)  # the reward is read at one position: the last layer and head run there only
  return Initial(state, shardings, frozen={}, jitted=jit_train_step(config, model_config, optimizer, shardings),
                 flops_per_token=flops.sequence_train_flops(model_config, length, kept=1, lm_head=False) / length)


def eval_step(params, batch, *, model: ScoreModel, lora_scale: float = 1.0):
  chosen_B, rejected_B = pair_rewards(model, params, batch, lora_scale)
  return {"chosen_B": chosen_B, "rejected_B": rejected_B}


def accuracy(outputs) -> dict[str, float]:
  """Held-out accuracy (with its 95% Wilson interval) and mean margin over every real pair of `outputs`."""
  diffs = [(out["chosen_B"] - out["rejected_B"])[valid_B] for out, valid_B, _ in outputs]
  diff = np.concatenate(diffs) if diffs else np.zeros(0)
  correct, n = int((diff > 0).sum()), int(diff.size)
  low, high = metrics.wilson_interval(correct, n)
  return {"eval/accuracy": correct / max(n, 1), "eval/accuracy_low95": low, "eval/accuracy_high95": high,
          "eval/margin": float(diff.mean()) if n else 0.0, "eval/pairs": n}


def reward_stats(outputs) -> dict[str, float]:
  """Mean and std of the rewards of every real completion of `outputs` (PPO normalises scores with them)."""
  r = np.concatenate([np.concatenate([out["chosen_B"][v], out["rejected_B"][v]]) for out, v, _ in outputs])
  return {"mean": float(r.mean()), "std": float(r.std()), "count": int(r.size)}


def train(config, workdir: str) -> dict[str, float]:
  runtime, model_config, data = setup.run(config, workdir)
  mesh, workdir, t = runtime.mesh, runtime.workdir, config.train
  model = ScoreModel(model_config)
  lora_scale = lora.scale(config.lora)
  with sharding.active(mesh, runtime.rules):
    run = init(config, model_config, load.Trees.of_run(config, runtime))
    train_iter = iter(prepare.batches(config, data, data.train, seed=config.seed))
    checkpointer, state, start = checkpoint.resume(config, workdir, run.state, train_iter)
    eval_fn = jax.jit(functools.partial(eval_step, model=model, lora_scale=lora_scale))

    def rewards_of(state, source, limit=None):
      batches = prepare.full_batches(config, data, source, limit=limit)
      return list(evaluation.outputs(lambda b: eval_fn(state.params, b), batches, mesh))

    def evaluate(state) -> dict[str, float]:
      return accuracy(rewards_of(state, data.eval)) if data.eval is not None else {}

    log = metrics.StepLog.of_run(config, workdir, data, checkpointer, start, run.flops_per_token)
    before, after = log.evaluation(start, lambda: evaluate(state)), {}
    with checkpoint.Preemption(checkpointer.directory) as preemption, checkpointer, log:
      for step in log.steps(start + 1, t.num_steps):
        batch = next(train_iter)
        state, step_metrics = run.jitted(state, sharding.global_batch(prepare.drop_ids(batch), mesh))
        log.record(step, step_metrics, tokens=prepare.tokens(batch))
        if checkpoint.save_or_stop(step, state, train_iter, t, log, checkpointer, preemption):
          break
        if metrics.evaluation_due(step, t):
          after = log.evaluation(step, lambda: evaluate(state))
    stats = reward_stats(rewards_of(state, data.train, limit=config.reward.stats_batches))
    scorer_params = lora.effective(state.params, lora_scale)  # a LoRA run exports the merged model
  exported = scoring.export_reward_model(workdir / scoring.EXPORT_DIR, model_config, scorer_params, stats)
  lines = []
  if before and after:
    lines.append(f"held-out accuracy {before['eval/accuracy']:.1%} -> {after['eval/accuracy']:.1%} "
                 f"(95% interval {after['eval/accuracy_low95']:.1%}-{after['eval/accuracy_high95']:.1%}, "
                 f"{after['eval/pairs']} pairs)")
  if jax.process_index() == 0:
    (workdir / "checkpoints" / "reward_stats.json").write_text(json.dumps(stats, indent=2))
  lines += [f"reward mean {stats['mean']:.3f}, std {stats['std']:.3f} over {stats['count']} train completions "
            f"-> {workdir / 'checkpoints' / 'reward_stats.json'}",
            f"reward model for PPO/GRPO (config.scoring.model): {exported}"]
  lines += export.export_reward_model_hf(config, model_config, scorer_params, data.tokenizer, stats,
                                         exported / "hf")
  export.print_summary(f"reward model ({model_config.num_params():,} backbone parameters) trained {t.num_steps} "
                       f"steps on {data.counts.get('written/train', 0)} pairs", lines, workdir, data)
  return {**log.last, **after}
