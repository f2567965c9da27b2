"""Supervised fine-tuning: the completion-token NLL.

  python -m rlhfx.main --config=configs/quickstart.py --workdir=/tmp/quickstart
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import optax

from rlhfx import checkpoint, evaluation, export, flops, metrics, setup, sharding
from rlhfx.data import prepare
from rlhfx.logprobs import row_logps
from rlhfx.losses.common import padding_share, target_mask
from rlhfx.losses.sft import sft_nll
from rlhfx.config import init_seed
from rlhfx.models import ModelConfig, Transformer, load, lora
from rlhfx.optim import learning_rate_schedule, make_optimizer
from rlhfx.train_state import Initial, TrainState, create_state, init_state, update

Array = jax.Array


def token_logps(params, batch: dict[str, Array], *, model: Transformer, lora_scale: float = 1.0,
                chunk_size: int | None = None) -> Array:
  """logps_BxT[t] = log p(x_t | x_<t) (0 at t = 0) of the policy (LoRA-merged); a packed batch's rows
  (`segments_BxT`, `positions_BxT`) attend within each example."""
  logps_BxS = row_logps(model, lora.effective(params, lora_scale), batch, chunk_size=chunk_size)[0]
  return jnp.pad(logps_BxS, ((0, 0), (1, 0)))


def loss_fn(params, batch: dict[str, Array], *, normalizer: Array, **kwargs):
  return sft_nll(token_logps(params, batch, **kwargs), batch["loss_mask_BxT"], normalizer=normalizer)


def train_step(state: TrainState, batch: dict[str, Array], *, model: Transformer,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule, grad_accum_steps: int = 1,
               lora_scale: float = 1.0, chunk_size: int | None = None):
  """One optimizer step on the completion-token NLL (micro-batches summed exactly)."""
  normalizer = jnp.maximum(target_mask(batch["loss_mask_BxT"]).sum(), 1)
  loss = functools.partial(loss_fn, model=model, normalizer=normalizer, lora_scale=lora_scale, chunk_size=chunk_size)
  new_state, grads, sums = update(state, loss, batch, optimizer, grad_accum_steps)
  return new_state, {"train/loss": sums["loss"], "train/tokens": sums["tokens"],
                     "train/padding": padding_share(batch),
                     "train/grad_norm": optax.global_norm(grads), "train/lr": schedule(state.step)}


def step_function(config, model_config: ModelConfig, optimizer, schedule, numbers=None):
  """train_step(state, batch) with everything but the state and batch bound (`numbers`: SFT has no loss numbers;
  rlhfx.members passes the learning rate through `optimizer` and `schedule`)."""
  return functools.partial(train_step, model=Transformer(model_config), optimizer=optimizer, schedule=schedule,
                           grad_accum_steps=config.train.grad_accum_steps, lora_scale=lora.scale(config.lora),
                           chunk_size=config.model.lm_head_chunk or None)


def jit_train_step(config, model_config: ModelConfig, optimizer, shardings):
  """The jitted step a run executes, state donated."""
  step = step_function(config, model_config, optimizer, learning_rate_schedule(config.optim, config.train.num_steps))
  return jax.jit(step, in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=0)


def init(config, model_config: ModelConfig, trees: load.Trees) -> Initial:
  """The state (the policy, LoRA-wrapped per config.lora, and its optimizer state) and the jitted step: arrays for
  `train`, ShapeDtypeStructs for the planner (`trees.abstract`)."""
  model = Transformer(model_config)
  params = lora.wrap(trees.params(model), config.lora, init_seed(config) + 1)
  optimizer = make_optimizer(config.optim, config.train.num_steps, params, frozen=lora.frozen(config.lora))
  state, shardings = create_state(functools.partial(init_state, optimizer=optimizer), params, trees.runtime.mesh)
  return Initial(state, shardings, frozen={}, jitted=jit_train_step(config, model_config, optimizer, shardings),
                 flops_per_token=flops.train_flops_per_token(model_config, max(config.data.buckets)))


def eval_step(params, batch: dict[str, Array], **kwargs) -> dict[str, Array]:
  """Each example's completion NLL and token count (so padding rows of a short last batch can be left out)."""
  mask_BxT = target_mask(batch["loss_mask_BxT"])
  return {"nll_B": -jnp.where(mask_BxT, token_logps(params, batch, **kwargs), 0.0).sum(-1),
          "tokens_B": mask_BxT.sum(-1)}


def heldout_metrics(outputs) -> dict[str, float]:
  """Eval loss and perplexity over the completion tokens of every real row of `outputs` (evaluation.outputs of
  `eval_step`)."""
  outs = [(out, valid_B) for out, valid_B, _ in outputs]
  nll, n = (sum(float(out[k][valid_B].sum()) for out, valid_B in outs) for k in ("nll_B", "tokens_B"))
  loss = nll / max(n, 1)
  return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/tokens": n}


def exact_match(params, model_config: ModelConfig, source, tokenizer, n: int = 64) -> float:
  """Share of eval prompts whose greedy completion equals the reference (built-in tasks)."""
  samples = evaluation.heldout_samples(params, model_config, source, tokenizer, n=n, max_new_tokens=12,
                                       reference="completion")
  return sum(s["completion"] == s["reference"] for s in samples) / len(samples)


def train(config, workdir: str) -> dict[str, float]:
  """Train per `config`; returns the final metrics. Resumes from <workdir>/checkpoints when present."""
  runtime, model_config, data = setup.run(config, workdir)
  mesh, workdir, t = runtime.mesh, runtime.workdir, config.train
  model = Transformer(model_config)
  lora_scale = lora.scale(config.lora)
  with sharding.active(mesh, runtime.rules):
    run = init(config, model_config, load.Trees.of_run(config, runtime))
    train_iter = iter(prepare.batches(config, data, data.train, seed=config.seed))
    checkpointer, state, start = checkpoint.resume(config, workdir, run.state, train_iter)
    eval_fn = jax.jit(functools.partial(eval_step, model=model, lora_scale=lora_scale,
                                        chunk_size=config.model.lm_head_chunk or None))

    def evaluate(state) -> dict[str, float]:
      """Eval loss and perplexity over the completion tokens of the first `eval_batches` eval batches (a short
      last batch counts its real rows only)."""
      if data.eval is None:
        return {}
      batches = prepare.full_batches(config, data, data.eval, limit=t.eval_batches)
      return heldout_metrics(evaluation.outputs(lambda b: eval_fn(state.params, b), batches, mesh))

    def accuracy(state) -> float:
      return exact_match(lora.effective(state.params, lora_scale), model_config, data.eval, data.tokenizer)

    exact = bool(config.data.builtin) and data.eval is not None  # a built-in task: exact match of the answers
    log = metrics.StepLog.of_run(config, workdir, data, checkpointer, start, run.flops_per_token)
    before, after = log.evaluation(start, lambda: evaluate(state)), {}
    if exact and start == 0:  # once, before training (not in the periodic evaluations, nor their time)
      before.update(log.write(0, {"eval/exact_match": accuracy(state)}))
    with checkpoint.Preemption(checkpointer.directory) as preemption, checkpointer, log:
      for step in log.steps(start + 1, t.num_steps):
        batch = next(train_iter)
        state, step_metrics = run.jitted(state, sharding.global_batch(prepare.drop_ids(batch), mesh))
        log.record(step, step_metrics, tokens=prepare.tokens(batch))
        if checkpoint.save_or_stop(step, state, train_iter, t, log, checkpointer, preemption):
          break
        if metrics.evaluation_due(step, t):
          after = log.evaluation(step, lambda: evaluate(state))
          evaluation.log_heldout_samples(log, step, config, lora.effective(state.params, lora_scale), model_config,
                                         data, reference="completion")
  final = {**log.last, **after}
  lines = []
  if before and after:
    lines.append(f"eval loss {before['eval/loss']:.3f} -> {after['eval/loss']:.3f} "
                 f"(perplexity {before['eval/perplexity']:.2f} -> {after['eval/perplexity']:.2f})")
  if exact and "eval/exact_match" in before:
    final["eval/exact_match"] = accuracy(state)
    lines.append(f"exact-match accuracy on held-out prompts {before['eval/exact_match']:.0%} -> "
                 f"{final['eval/exact_match']:.0%}")
  lines += export.export_policy(config, model_config, state.params, data.tokenizer, workdir)
  export.print_summary(f"SFT of a {model_config.num_params():,}-parameter model for {t.num_steps} steps"
                       + (f" (resumed at step {start})" if start else ""), lines, workdir, data)
  return final
