"""DPO and its relatives: the step takes the loss function as an argument.

  python -m rlhfx.main --config=configs/dpo_hh.py:tiny --workdir=/tmp/dpo_hh

Reference log-probs come from one of three places (`config.dpo.reference`):
  frozen       a second parameter tree, passed to the step as a frozen argument;
  precomputed  computed once before training and cached per example on the host, so
               no reference parameters are in memory while training;
  lora_base    with LoRA, the base weights without the adapter (no second copy).
Reference-free losses (SimPO, ORPO) skip the reference entirely.

Policy log-probs of chosen and rejected come from one forward pass over the
concatenated 2B rows. The LM head sees only the completion positions when
`config.data.max_completion_length` bounds them, and runs in chunks
(`config.dpo.chunk_size`) so the full 2B x T x V logits are never built.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhfx import loop, sharding
from rlhfx.logprobs import completion_logps
from rlhfx.losses import preference
from rlhfx.losses.common import concat_pairs
from rlhfx.metrics import sequence_train_flops
from rlhfx.models import Transformer, lora
from rlhfx.optim import learning_rate_schedule, make_optimizer
from rlhfx.train_state import TrainState, accumulate_gradients, apply_gradients

Array = jax.Array
REFERENCE_MODES = ("frozen", "precomputed", "lora_base", "none")


def pair_logps(model: Transformer, params, batch: dict[str, Array], *, chunk_size: int | None = None,
               window: int | None = None):
  """Policy statistics of chosen and rejected completions from one forward pass over 2B rows."""
  tokens, mask, loss_mask = concat_pairs(batch)
  logps_2B, mean_logits_2B, count_2B = completion_logps(model, params, tokens, mask, loss_mask,
                                                        chunk_size=chunk_size, window=window)
  (chosen, rejected), (m_c, m_r), (n_c, n_r) = (jnp.split(x, 2) for x in (logps_2B, mean_logits_2B, count_2B))
  return preference.PairLogps(chosen_B=chosen, rejected_B=rejected, chosen_tokens_B=n_c, rejected_tokens_B=n_r,
                              chosen_mean_logits_B=m_c, rejected_mean_logits_B=m_r)


def split_params(params, reference_params, *, mode: str, lora_scale: float = 1.0):
  """(policy params, reference params or None) for the reference mode."""
  if mode == "lora_base":
    base = jax.lax.stop_gradient(params["base"])
    return lora.merge(base, params["lora"], scale=lora_scale), base
  return params, reference_params


def dpo_objective(params, batch, reference_params, *, model: Transformer, loss: Callable, mode: str,
                  lora_scale: float = 1.0, chunk_size: int | None = None, window: int | None = None):
  """loss(PairLogps) with the reference filled in per `mode`."""
  policy, reference = split_params(params, reference_params, mode=mode, lora_scale=lora_scale)
  x = pair_logps(model, policy, batch, chunk_size=chunk_size, window=window)
  if mode == "precomputed":
    x = x.replace(ref_chosen_B=batch["ref_chosen_logps_B"], ref_rejected_B=batch["ref_rejected_logps_B"])
  elif mode != "none":
    ref = pair_logps(model, jax.lax.stop_gradient(reference), batch, chunk_size=chunk_size, window=window)
    x = x.replace(ref_chosen_B=ref.chosen_B, ref_rejected_B=ref.rejected_B)
  return loss(x)


def train_step(state: TrainState, batch, reference_params, *, model: Transformer, optimizer, schedule,
               loss: Callable, mode: str, lora_scale: float = 1.0, chunk_size: int | None = None,
               window: int | None = None, grad_accum_steps: int = 1):
  """One optimizer step of `loss` (any function PairLogps -> (loss, metrics))."""
  objective = functools.partial(dpo_objective, model=model, loss=loss, mode=mode, lora_scale=lora_scale,
                                chunk_size=chunk_size, window=window)
  grads, m = accumulate_gradients(lambda p, b: objective(p, b, reference_params), state.params, batch,
                                  grad_accum_steps, average=True)
  metrics = {("train/loss" if k == "loss" else k): v for k, v in m.items()}
  metrics.update({"train/grad_norm": optax.global_norm(grads), "train/lr": schedule(state.step)})
  return apply_gradients(state, grads, optimizer), metrics


def reference_logps_step(params, batch, *, model: Transformer, chunk_size: int | None = None,
                         window: int | None = None):
  x = pair_logps(model, params, batch, chunk_size=chunk_size, window=window)
  return {"chosen_B": x.chosen_B, "rejected_B": x.rejected_B}


def eval_step(params, batch, reference_params, *, model, loss, mode, lora_scale=1.0, chunk_size=None, window=None):
  _, metrics = dpo_objective(params, batch, reference_params, model=model, loss=loss, mode=mode,
                             lora_scale=lora_scale, chunk_size=chunk_size, window=window)
  return metrics


def step_kwargs(config, model: Transformer, loss: Callable | None = None) -> dict:
  """The keyword arguments `train_step` and `eval_step` take for `config` (loss: the configured built-in one)."""
  return dict(model=model, loss=loss or loss_from_config(config.dpo), mode=reference_mode(config),
              lora_scale=config.lora.alpha / config.lora.rank if config.lora.rank else 1.0,
              chunk_size=config.dpo.chunk_size or None, window=config.data.max_completion_length or None)


def jit_train_step(config, model: Transformer, optimizer, shardings, reference, *, loss: Callable | None = None):
  """The jitted step a run executes, state donated (`rlhfx.plan` compiles this same function); `reference` is
  the frozen tree, its ShapeDtypeStructs, or None."""
  step = functools.partial(train_step, optimizer=optimizer,
                           schedule=learning_rate_schedule(config.optim, config.train.num_steps),
                           grad_accum_steps=config.train.grad_accum_steps, **step_kwargs(config, model, loss))
  reference_shardings = None if reference is None else jax.tree.map(lambda x: x.sharding, reference)
  return jax.jit(step, in_shardings=(shardings, None, reference_shardings), out_shardings=(shardings, None),
                 donate_argnums=0)


def jit_reference_logps(model: Transformer, chunk_size: int | None, window: int | None):
  """The jitted pass that precomputes reference log-probs (`rlhfx.plan` compiles this same function)."""
  return jax.jit(functools.partial(reference_logps_step, model=model, chunk_size=chunk_size, window=window))


def loss_from_config(cfg) -> Callable:
  """The configured built-in loss with its hyper-parameters bound (plus the SFT term when weighted)."""
  if cfg.loss not in preference.LOSSES:
    raise ValueError(f"config.dpo.loss={cfg.loss!r}; expected one of {sorted(preference.LOSSES)}")
  kwargs = {"sigmoid": dict(beta=cfg.beta, label_smoothing=cfg.label_smoothing),
            "robust": dict(beta=cfg.beta, label_smoothing=cfg.label_smoothing), "ipo": dict(beta=cfg.beta),
            "hinge": dict(beta=cfg.beta), "simpo": dict(beta=cfg.beta, gamma=cfg.gamma), "orpo": dict(lam=cfg.lam)}
  loss = functools.partial(preference.LOSSES[cfg.loss], **kwargs[cfg.loss])
  if cfg.sft_weight:
    loss = preference.weighted_sum([(1.0, loss), (cfg.sft_weight, preference.sft_term)])
  return loss


def reference_mode(config) -> str:
  if config.dpo.loss in preference.REFERENCE_FREE and config.dpo.reference != "lora_base":
    return "none"
  mode = config.dpo.reference
  if mode not in REFERENCE_MODES[:3]:
    raise ValueError(f"config.dpo.reference={mode!r}; expected one of {REFERENCE_MODES[:3]}")
  if (mode == "lora_base") != bool(config.lora.rank):
    raise ValueError("config.dpo.reference='lora_base' needs config.lora.rank > 0, and LoRA needs it")
  return mode


def precompute_reference(config, data, source, params, model, runtime, chunk_size, window) -> np.ndarray:
  """[N, 2] reference log-probs (chosen, rejected) of every example of `source`, by example id."""
  fn = jit_reference_logps(model, chunk_size, window)
  table = np.full((len(source), 2), np.nan, np.float32)
  for local in loop.full_batches(config, data, source, "preference", keep_ids=True):
    valid, ids = local.pop("valid_B"), local.pop("example_id_B")
    with sharding.active(runtime.mesh, runtime.rules):
      out = jax.device_get(fn(params, sharding.global_batch(local, runtime.mesh)))
    table[ids[valid], 0], table[ids[valid], 1] = out["chosen_B"][valid], out["rejected_B"][valid]
  return table


def add_reference(table: np.ndarray):
  """A `prepare` hook: the cached reference log-probs of each row, looked up by example id."""

  def prepare(batch):
    ids = batch["example_id_B"]
    out = {k: v for k, v in batch.items() if k != "example_id_B"}
    return {**out, "ref_chosen_logps_B": table[ids, 0], "ref_rejected_logps_B": table[ids, 1]}

  return prepare


def train(config, workdir: str, *, loss: Callable | None = None) -> dict[str, float]:
  """Train per `config`; `loss` (PairLogps -> (loss, metrics)) replaces the configured built-in one."""
  setup = loop.setup(config, workdir, kind="preference")
  runtime, model_config, data = setup.runtime, setup.model_config, setup.data
  workdir = runtime.workdir
  model = Transformer(model_config)
  kwargs = step_kwargs(config, model, loss)  # the loss, reference mode, LoRA scale, LM-head chunk and window
  mode, chunk, window, lora_scale = kwargs["mode"], kwargs["chunk_size"], kwargs["window"], kwargs["lora_scale"]
  base = loop.init_params(model_config, runtime, jax.random.key(config.seed), setup.loaded_params)
  if config.lora.rank:
    adapters = lora.init(base, patterns=tuple(config.lora.patterns), rank=config.lora.rank,
                         rng=jax.random.key(config.seed + 1))
    adapters = jax.device_put(adapters, lora.shardings(adapters, base))
    params = {"base": base, "lora": adapters}
  else:
    params = base
  reference = None
  if mode == "frozen":  # a copy of the initial policy, stored in the compute dtype
    reference = loop.frozen_copy(base, model_config.jnp_dtype)
  table = eval_table = None
  if mode == "precomputed":  # before the state takes (donates) the parameters
    table = precompute_reference(config, data, data.train, base, model, runtime, chunk, window)
    if data.eval is not None:
      eval_table = precompute_reference(config, data, data.eval, base, model, runtime, chunk, window)
  # with LoRA the base is frozen through optax (no update, no optimizer state)
  optimizer = make_optimizer(config.optim, config.train.num_steps, params,
                             frozen=("^base/",) if config.lora.rank else ())
  state, shardings = loop.create_state(params, optimizer, runtime)

  train_iter = iter(loop.batches(config, data, data.train, "preference", seed=config.seed))
  checkpointer, state, start = loop.resume(config, workdir, state, train_iter, frozen={"reference": reference})
  with sharding.active(runtime.mesh, runtime.rules):
    jitted = jit_train_step(config, model, optimizer, shardings, reference, loss=loss)
    eval_jit = jax.jit(functools.partial(eval_step, **kwargs))
  step_fn = lambda state, batch: jitted(state, batch, reference)  # noqa: E731

  def run_eval(state, step_number):
    if data.eval is None:
      return {}
    sums, n = {}, 0
    for local in loop.full_batches(config, data, data.eval, "preference", keep_ids=True):
      valid = local.pop("valid_B")
      local = add_reference(eval_table)(local) if eval_table is not None else loop.drop_ids(local)
      if not valid.all():  # metrics are batch means: weight only full batches exactly, skip the padded tail
        continue
      with sharding.active(runtime.mesh, runtime.rules):
        m = jax.device_get(eval_jit(state.params, sharding.global_batch(local, runtime.mesh), reference))
      sums = {k: sums.get(k, 0.0) + float(v) for k, v in m.items()}
      n += 1
    return {f"eval/{k}": v / max(n, 1) for k, v in sums.items()}

  longest = max(config.data.buckets)
  outcome = loop.train_and_evaluate(
      config=config, runtime=runtime, state=state, start=start, step_fn=step_fn, train_iter=train_iter,
      checkpointer=checkpointer, tokens_per_step=lambda b: 2 * b["chosen_tokens_BxT"].size,
      flops_per_token=sequence_train_flops(model_config, longest, kept=window + 1 if window else None) / longest,
      evaluate=run_eval,
      prepare=add_reference(table) if table is not None else None)
  result, before, after, final = outcome.result, outcome.before, outcome.after, outcome.final
  if result.stopped_early:
    return final
  params = result.state.params
  if jax.process_index() == 0:
    policy = jax.device_get(params)
    if config.lora.rank:
      lora.save(policy["lora"], workdir / "adapters", rank=config.lora.rank, alpha=config.lora.alpha,
                patterns=tuple(config.lora.patterns))
      policy = lora.merge(policy["base"], policy["lora"], scale=lora_scale)
    if config.train.export_hf:
      from rlhfx.models.convert import to_hf

      data.tokenizer.save_pretrained(to_hf(model_config, jax.device_get(policy), workdir / "hf"))
    lines = ["", "== summary ==", f"{config.dpo.loss} preference tuning ({mode} reference"
             f"{', LoRA rank %d' % config.lora.rank if config.lora.rank else ''}) for {config.train.num_steps} steps"]
    if before and after:
      lines.append(f"held-out rewards/accuracies {before['eval/rewards/accuracies']:.1%} -> "
                   f"{after['eval/rewards/accuracies']:.1%}; rewards/margins {before['eval/rewards/margins']:.3f} -> "
                   f"{after['eval/rewards/margins']:.3f}")
    lines.append(f"metrics: {workdir / 'metrics.jsonl'}; checkpoints: {workdir / 'checkpoints'}")
    print("\n".join(lines), flush=True)
  return final

