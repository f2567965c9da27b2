"""Supervised fine-tuning: state, the pure step, evaluation and the train loop.

  python -m rlhfx.main --config=configs/quickstart.py --workdir=/tmp/quickstart
"""

from __future__ import annotations

import functools
import math
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhfx import loop, sampling, sharding
from rlhfx.losses.common import target_mask
from rlhfx.losses.sft import sft_loss
from rlhfx.metrics import train_flops_per_token
from rlhfx.models import ModelConfig, Transformer
from rlhfx.optim import learning_rate_schedule, make_optimizer
from rlhfx.train_state import TrainState, accumulate_gradients, apply_gradients, init_state, microbatches  # noqa: F401

Array = jax.Array


def loss_fn(params, batch: dict[str, Array], *, model: Transformer, normalizer: Array):
  logits_BxTxV = model.apply({"params": params}, batch["tokens_BxT"], batch["mask_BxT"])
  return sft_loss(logits_BxTxV, batch["tokens_BxT"], batch["loss_mask_BxT"], normalizer=normalizer)


def train_step(state: TrainState, batch: dict[str, Array], *, model: Transformer,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule, grad_accum_steps: int = 1):
  """One optimizer step on the completion-token NLL (micro-batches summed exactly)."""
  normalizer = jnp.maximum(target_mask(batch["loss_mask_BxT"]).sum(), 1)
  loss = functools.partial(loss_fn, model=model, normalizer=normalizer)
  grads, sums = accumulate_gradients(loss, state.params, batch, grad_accum_steps)
  metrics = {"train/loss": sums["loss"], "train/tokens": sums["tokens"], "train/grad_norm": optax.global_norm(grads),
             "train/lr": schedule(state.step)}
  return apply_gradients(state, grads, optimizer), metrics


def jit_train_step(config, model: Transformer, optimizer, shardings):
  """The jitted step a run executes, state donated (`rlhfx.plan` compiles this same function)."""
  step = functools.partial(train_step, model=model, optimizer=optimizer,
                           schedule=learning_rate_schedule(config.optim, config.train.num_steps),
                           grad_accum_steps=config.train.grad_accum_steps)
  return jax.jit(step, in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=0)


def eval_step(params, batch: dict[str, Array], *, model: Transformer) -> dict[str, Array]:
  _, metrics = loss_fn(params, batch, model=model, normalizer=1.0)
  return {"nll_sum": metrics["nll_sum"], "tokens": metrics["tokens"]}


def evaluate(params, eval_batches, eval_fn, mesh) -> dict[str, float]:
  """Eval loss and perplexity over completion tokens of the given batches."""
  nll = tokens = 0.0
  for local in eval_batches:
    m = jax.device_get(eval_fn(params, sharding.global_batch(local, mesh)))
    nll, tokens = nll + float(m["nll_sum"]), tokens + float(m["tokens"])
  loss = nll / max(tokens, 1)
  return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}


def exact_match(params, model_config: ModelConfig, source, tokenizer, n: int = 64) -> float:
  """Share of eval prompts whose greedy completion equals the reference (built-in tasks)."""
  examples = [source[i] for i in range(min(n, len(source)))]
  prompts = [tokenizer.encode(e["prompt"].decode(), add_special_tokens=False) for e in examples]
  bos = tokenizer.bos_token_id
  prompts = [[bos] + p if bos is not None and bos != tokenizer.eos_token_id else p for p in prompts]
  tokens, mask = sampling.pad_prompts(prompts, tokenizer.pad_token_id or 0)
  params = jax.device_get(params)
  result = sampling.generate(params, model_config, tokens, mask, jax.random.key(0), max_new_tokens=12,
                             temperature=0.0, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id or 0)
  hits = 0
  for e, row, row_mask in zip(examples, np.asarray(result.tokens_BxC), np.asarray(result.mask_BxC)):
    text = tokenizer.decode(row[row_mask], skip_special_tokens=True)
    hits += text == e["completion"].decode()
  return hits / len(examples)


def train(config, workdir: str) -> dict[str, float]:
  """Train per `config`; returns the final metrics. Resumes from <workdir>/checkpoints when present."""
  setup = loop.setup(config, workdir, kind="sft")
  runtime, model_config, data = setup.runtime, setup.model_config, setup.data
  workdir = runtime.workdir
  model = Transformer(model_config)
  params = loop.init_params(model_config, runtime, jax.random.key(config.seed), setup.loaded_params)
  optimizer = make_optimizer(config.optim, config.train.num_steps, params)
  state, shardings = loop.create_state(params, optimizer, runtime)

  train_iter = iter(loop.batches(config, data, data.train, "sft", seed=config.seed))
  checkpointer, state, start = loop.resume(config, workdir, state, train_iter)

  eval_fn = functools.partial(eval_step, model=model)
  with sharding.active(runtime.mesh, runtime.rules):
    step_fn = jit_train_step(config, model, optimizer, shardings)
    eval_jit = jax.jit(eval_fn)

  def run_eval(state, step_number):
    if data.eval is None:
      return {}
    it = loop.batches(config, data, data.eval, "sft", seed=0, shuffle=False, num_epochs=1)
    first = [loop.drop_ids(b) for _, b in zip(range(config.train.eval_batches), it)]
    with sharding.active(runtime.mesh, runtime.rules):
      return evaluate(state.params, first, eval_jit, runtime.mesh)

  accuracy_before = exact_match(state.params, model_config, data.eval, data.tokenizer) if (
      config.data.builtin and data.eval is not None and start == 0) else None
  outcome = loop.train_and_evaluate(
      config=config, runtime=runtime, state=state, start=start, step_fn=step_fn, train_iter=train_iter,
      checkpointer=checkpointer, tokens_per_step=lambda b: b["tokens_BxT"].size,
      flops_per_token=train_flops_per_token(model_config, max(config.data.buckets)), evaluate=run_eval)
  result, before, after, final = outcome.result, outcome.before, outcome.after, outcome.final
  if result.stopped_early:
    return final
  if config.train.export_hf and jax.process_index() == 0:
    from rlhfx.models.convert import to_hf

    out = to_hf(model_config, jax.device_get(result.state.params), workdir / "hf")
    data.tokenizer.save_pretrained(out)
  summary = [f"SFT of a {model_config.num_params():,}-parameter model for {config.train.num_steps} steps"
             + (f" (resumed at step {result.start_step})" if result.start_step else "")]
  if before and after:
    summary.append(f"eval loss {before['eval/loss']:.3f} -> {after['eval/loss']:.3f} "
                   f"(perplexity {before['eval/perplexity']:.2f} -> {after['eval/perplexity']:.2f})")
  if accuracy_before is not None:
    accuracy_after = exact_match(result.state.params, model_config, data.eval, data.tokenizer)
    final["eval/exact_match"] = accuracy_after
    summary.append(f"exact-match accuracy on held-out prompts {accuracy_before:.0%} -> {accuracy_after:.0%}")
  summary += [f"metrics: {workdir / 'metrics.jsonl'} and TensorBoard: tensorboard --logdir {workdir / 'tensorboard'}",
              f"checkpoints: {workdir / 'checkpoints'}" +
              (f"; Hugging Face export: {workdir / 'hf'}" if config.train.export_hf else "")]
  if jax.process_index() == 0:
    print("\n".join(["", "== summary =="] + summary), flush=True)
  return final
