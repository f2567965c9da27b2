"""DPO and its relatives (IPO, hinge, robust, SimPO, ORPO on pairs; KTO on unpaired examples).

  python -m rlhfx.main --config=configs/dpo_hh.py:tiny --workdir=/tmp/dpo_hh

The step takes the loss as an argument: a registered one (`config.dpo.loss`,
rlhfx.losses.preference) or any function PairLogps -> (loss, metrics) passed to `train`.
Reference log-probs come from one of three places (`config.dpo.reference`):
  frozen       a second parameter tree, passed to the step as a frozen argument;
  precomputed  computed once before training and cached per example on the host, so
               no reference parameters are in memory while training;
  lora_base    with LoRA, the base weights without the adapter (no second copy).
Reference-free losses (SimPO, ORPO) skip the reference entirely.

Policy log-probs of chosen and rejected come from one forward pass over the
concatenated 2B rows. The LM head sees only the completion positions when
`config.data.max_completion_length` bounds them, and runs in chunks
(`config.model.lm_head_chunk`) so the full 2B x T x V logits are never built.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhfx import checkpoint, evaluation, export, metrics, setup, sharding
from rlhfx.data import prepare
from rlhfx.logprobs import completion_logps, row_logps
from rlhfx.losses import preference
from rlhfx.losses.common import concat_pairs, padding_share
from rlhfx.models import Transformer, load, lora
from rlhfx.optim import learning_rate_schedule, make_optimizer
from rlhfx.train_state import TrainState, create_state, init_state, update

Array = jax.Array
# a precomputed reference column -> the batch key the step reads it from
REFERENCE_KEYS = {"chosen_B": "ref_chosen_logps_B", "rejected_B": "ref_rejected_logps_B", "logps_B": "ref_logps_B"}


def packed_pair_logps(model: Transformer, params, batch: dict[str, Array], *, chunk_size: int | None = None):
  """`pair_logps` of a packed batch (rlhfx.data.pipeline.PackedPairsCollate): one forward pass over the rows,
  attention inside each sequence, then each sequence's sums by its flat index row x T + segment."""
  r, t = batch["tokens_BxT"].shape
  logps_RxS, mean_RxS = row_logps(model, params, batch, chunk_size=chunk_size)
  targets_RxS = batch["loss_mask_BxT"][:, 1:]  # never a sequence's first token: no prediction crosses segments
  ids = (jnp.arange(r)[:, None] * t + batch["segments_BxT"][:, 1:]).ravel()
  values_Nx3 = jnp.where(targets_RxS[..., None], jnp.stack([logps_RxS, mean_RxS, jnp.ones_like(logps_RxS)], -1), 0.0)
  sums, means, counts = jax.ops.segment_sum(values_Nx3.reshape(-1, 3), ids, num_segments=r * t).T
  c, j = batch["chosen_index_B"], batch["rejected_index_B"]
  mean_logits = jax.lax.stop_gradient(means / jnp.maximum(counts, 1))
  return preference.PairLogps(chosen_B=sums[c], rejected_B=sums[j], chosen_tokens_B=counts[c].astype(jnp.int32),
                              rejected_tokens_B=counts[j].astype(jnp.int32), chosen_mean_logits_B=mean_logits[c],
                              rejected_mean_logits_B=mean_logits[j])


def pair_logps(model: Transformer, params, batch: dict[str, Array], *, chunk_size: int | None = None,
               window: int | None = None):
  """Policy statistics of chosen and rejected completions from one forward pass over 2B rows (or over the packed
  rows of a packed batch, which ignores `window`)."""
  if "segments_BxT" in batch:
    return packed_pair_logps(model, params, batch, chunk_size=chunk_size)
  tokens, mask, loss_mask = concat_pairs(batch)
  logps_2B, mean_logits_2B, count_2B = completion_logps(model, params, tokens, mask, loss_mask,
                                                        chunk_size=chunk_size, window=window)
  (chosen, rejected), (m_c, m_r), (n_c, n_r) = (jax.numpy.split(x, 2) for x in (logps_2B, mean_logits_2B, count_2B))
  return preference.PairLogps(chosen_B=chosen, rejected_B=rejected, chosen_tokens_B=n_c, rejected_tokens_B=n_r,
                              chosen_mean_logits_B=m_c, rejected_mean_logits_B=m_r)


def reference_logps_step(params, batch, *, model: Transformer, chunk_size: int | None = None,
                         window: int | None = None) -> dict[str, Array]:
  """The reference's summed completion log-probs: {"chosen_B", "rejected_B"} of pairs, {"logps_B"} of unpaired
  examples (a batch with `label_B`)."""
  if "label_B" in batch:
    logps_B = completion_logps(model, params, batch["tokens_BxT"], batch["mask_BxT"], batch["loss_mask_BxT"],
                               chunk_size=chunk_size, window=window)[0]
    return {"logps_B": logps_B}
  x = pair_logps(model, params, batch, chunk_size=chunk_size, window=window)
  return {"chosen_B": x.chosen_B, "rejected_B": x.rejected_B}


def dpo_objective(params, batch, reference_params, *, model: Transformer, loss: Callable, mode: str,
                  lora_scale: float = 1.0, chunk_size: int | None = None, window: int | None = None):
  """loss(PairLogps or UnpairedLogps) of the policy (`params`, LoRA-merged) with the reference per `mode`."""
  policy = lora.effective(params, lora_scale)
  ref = None
  if mode == "precomputed":
    ref = {k: batch[key] for k, key in REFERENCE_KEYS.items() if key in batch}
  elif mode != "none":
    reference = params["base"] if mode == "lora_base" else reference_params
    ref = reference_logps_step(jax.lax.stop_gradient(reference), batch, model=model, chunk_size=chunk_size,
                               window=window)
  if "label_B" in batch:
    logps_B = reference_logps_step(policy, batch, model=model, chunk_size=chunk_size, window=window)["logps_B"]
    return loss(preference.UnpairedLogps(logps_B=logps_B, ref_logps_B=ref["logps_B"], labels_B=batch["label_B"]))
  x = pair_logps(model, policy, batch, chunk_size=chunk_size, window=window)
  if ref is not None:
    x = x.replace(ref_chosen_B=ref["chosen_B"], ref_rejected_B=ref["rejected_B"])
  return loss(x)


def train_step(state: TrainState, batch, reference_params, *, model: Transformer, optimizer, schedule,
               loss: Callable, mode: str, lora_scale: float = 1.0, chunk_size: int | None = None,
               window: int | None = None, grad_accum_steps: int = 1):
  """One optimizer step of `loss` (any function PairLogps -> (loss, metrics))."""
  objective = functools.partial(dpo_objective, model=model, loss=loss, mode=mode, lora_scale=lora_scale,
                                chunk_size=chunk_size, window=window)
  new_state, grads, m = update(state, lambda p, b: objective(p, b, reference_params), batch, optimizer,
                               grad_accum_steps, average=True)
  step_metrics = {("train/loss" if k == "loss" else k): v for k, v in m.items()}
  return new_state, {**step_metrics, "train/grad_norm": optax.global_norm(grads), "train/lr": schedule(state.step),
                     "train/padding": padding_share(batch)}


def eval_step(params, batch, reference_params, *, loss: Callable, **kwargs):
  """The loss and its metrics per example ([B] each: the loss applied to each pair alone), so held-out means are
  over examples and the padding rows of a short last batch can be left out. An unpaired loss (KTO: its KL term
  is a batch statistic) gives batch means instead."""
  per_example = loss if getattr(loss, "unpaired", False) else jax.vmap(
      lambda x: loss(jax.tree.map(lambda a: a[None], x)))
  value, step_metrics = dpo_objective(params, batch, reference_params, loss=per_example, **kwargs)
  return {"loss": value, **step_metrics}


def loss_from_config(cfg) -> Callable:
  """The registered loss `config.dpo.loss` with its hyper-parameters (plus the SFT term when weighted)."""
  loss = preference.from_config(cfg)
  if cfg.sft_weight:
    weighted = preference.weighted_sum([(1.0, loss), (cfg.sft_weight, preference.sft_term)])
    weighted.name, weighted.reference_free, weighted.unpaired = loss.name, loss.reference_free, loss.unpaired
    return weighted
  return loss


def reference_mode(config, loss: Callable) -> str:
  """"none" for a reference-free loss, else config.dpo.reference."""
  return "none" if getattr(loss, "reference_free", False) else config.dpo.reference


def step_kwargs(config, model: Transformer, loss: Callable | None = None) -> dict:
  """The keyword arguments `train_step` and `eval_step` take for `config` (loss: the configured registered one)."""
  loss = loss or loss_from_config(config.dpo)
  return dict(model=model, loss=loss, mode=reference_mode(config, loss),
              lora_scale=lora.scale(config.lora),
              chunk_size=config.model.lm_head_chunk or None, window=config.data.max_completion_length or None)


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


def precompute_reference(config, data, source, params, fn, mesh) -> dict[str, np.ndarray]:
  """{column: [N] reference log-probs} of every example of `source`, indexed by example id."""
  table: dict[str, np.ndarray] = {}
  batches = prepare.full_batches(config, data, source, keep_ids=True)
  for out, valid_B, local in evaluation.outputs(lambda b: fn(params, prepare.drop_ids(b)), batches, mesh):
    ids = evaluation.gather(local["example_id_B"])[valid_B]
    for k, v in out.items():
      table.setdefault(k, np.full(len(source), np.nan, np.float32))[ids] = v[valid_B]
  return table


def with_reference(batch: dict, table: dict[str, np.ndarray] | None) -> dict:
  """A host batch ready for the step: the cached reference log-probs of its rows added (precomputed mode)."""
  out = prepare.drop_ids(batch)
  for k, column in (table or {}).items():
    out[REFERENCE_KEYS[k]] = column[batch["example_id_B"]]
  return out


def train(config, workdir: str, *, loss: Callable | None = None) -> dict[str, float]:
  """Train per `config`; `loss` (PairLogps -> (loss, metrics)) replaces the configured registered one."""
  runtime, model_config, data = setup.run(config, workdir)
  loss = loss or loss_from_config(config.dpo)
  mesh, workdir, t = runtime.mesh, runtime.workdir, config.train
  model = Transformer(model_config)
  kwargs = step_kwargs(config, model, loss)  # the loss, reference mode, LoRA scale, LM-head chunk and window
  mode = kwargs["mode"]
  with sharding.active(mesh, runtime.rules):
    base = load.sharded_params(model, runtime, jax.random.key(config.seed), load.pretrained(config))
    params = lora.wrap(base, config.lora, config.seed + 1)
    reference = load.frozen_copy(base, model_config.jnp_dtype) if mode == "frozen" else None
    tables = {}
    if mode == "precomputed":  # before the state takes (donates) the parameters
      fn = jit_reference_logps(model, kwargs["chunk_size"], kwargs["window"])
      tables = {split: precompute_reference(config, data, source, base, fn, mesh)
                for split, source in (("train", data.train), ("eval", data.eval)) if source is not None}
    optimizer = make_optimizer(config.optim, t.num_steps, params, frozen=lora.frozen(config.lora))
    state, shardings = create_state(functools.partial(init_state, optimizer=optimizer), params, mesh)
    train_iter = iter(prepare.batches(config, data, data.train, seed=config.seed))
    checkpointer, state, start = checkpoint.resume(config, workdir, state, train_iter,
                                                   frozen={"reference": reference})
    train_step_fn = jit_train_step(config, model, optimizer, shardings, reference, loss=loss)
    eval_fn = jax.jit(functools.partial(eval_step, **kwargs))

    def evaluate(state) -> dict[str, float]:
      """Held-out metrics: means over the eval examples (KTO: over its full eval batches)."""
      if data.eval is None:
        return {}
      batches = (with_reference(b, tables.get("eval"))
                 for b in prepare.full_batches(config, data, data.eval, keep_ids=True))
      outs = list(evaluation.outputs(lambda b: eval_fn(state.params, b, reference), batches, mesh))
      if not getattr(loss, "unpaired", False):
        return {f"eval/{k}": float(np.concatenate([out[k][valid_B] for out, valid_B, _ in outs]).mean())
                for k in outs[0][0]}
      full = [out for out, valid_B, _ in outs if valid_B.all()]
      if not full:
        logging.warning("KTO evaluation needs one full eval batch of %d rows; the eval split is smaller",
                        t.global_batch_size)
      return {f"eval/{k}": float(np.mean([o[k] for o in full])) for k in (full[0] if full else {})}

    log = metrics.StepLog(workdir, t, checkpointer=checkpointer, start_step=start, counts=data.report,
                          run_config=config,
                          flops_per_token=metrics.sequence_train_flops(
                              model_config, max(config.data.buckets),
                              kept=kwargs["window"] + 1 if kwargs["window"] else None) / max(config.data.buckets))
    before = log.write(start, evaluate(state) if start == 0 else {})
    after, step = {}, start
    with checkpoint.Preemption() as preemption, checkpointer, log:
      for step in log.steps(start + 1, t.num_steps):
        batch = next(train_iter)
        state, step_metrics = train_step_fn(state, sharding.global_batch(with_reference(batch, tables.get("train")),
                                                                         mesh), reference)
        log.record(step, step_metrics, tokens=prepare.tokens(batch))
        stop = preemption.reached(step)
        if checkpoint.due(step, t, stop):
          log.flush()  # only a state whose metrics are finite is saved
          checkpointer.save(step, {"state": state}, data_iterator=train_iter)
        if stop:
          break
        if metrics.evaluation_due(step, t):
          after = log.write(step, evaluate(state))
          evaluation.log_heldout_samples(log, step, config, lora.effective(state.params, kwargs["lora_scale"]),
                                         model_config, data,
                                         reference="completion" if getattr(loss, "unpaired", False) else "chosen")
  if preemption.requested:
    raise checkpoint.Preempted(step, checkpointer.directory)
  lines = export.export_policy(config, model_config, state.params, data.tokenizer, workdir)
  if "eval/rewards/accuracies" in before and "eval/rewards/accuracies" in after:
    lines.insert(0, f"held-out rewards/accuracies {before['eval/rewards/accuracies']:.1%} -> "
                    f"{after['eval/rewards/accuracies']:.1%}; rewards/margins {before['eval/rewards/margins']:.3f} -> "
                    f"{after['eval/rewards/margins']:.3f}")
  lora_note = f", LoRA rank {config.lora.rank}" if config.lora.rank else ""
  export.print_summary(f"{getattr(loss, 'name', 'custom')} preference tuning ({mode} reference{lora_note}) for "
                       f"{t.num_steps} steps", lines, workdir, data)
  return {**log.last, **after}
