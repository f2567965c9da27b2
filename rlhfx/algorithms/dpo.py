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

import dataclasses
import functools
import logging
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhfx import checkpoint, evaluation, export, flops, metrics, setup, sharding
from rlhfx.config import init_seed
from rlhfx.data import prepare
from rlhfx.logprobs import completion_logps, row_logps
from rlhfx.losses import preference
from rlhfx.losses.common import concat_pairs, padding_share
from rlhfx.models import ModelConfig, Transformer, load, lora
from rlhfx.optim import learning_rate_schedule, make_optimizer
from rlhfx.train_state import Initial, TrainState, create_state, init_state, update

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


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything static about a DPO step: the model, the loss, where the reference log-probs come from."""

  model: Transformer
  loss: Callable  # PairLogps (UnpairedLogps when `unpaired`) -> (loss, metrics)
  name: str = "custom"  # the registered loss's name (config.dpo.loss)
  reference: str = "frozen"  # frozen | precomputed | lora_base | none (a reference-free loss)
  unpaired: bool = False  # KTO: examples with label_B, not pairs
  lora_scale: float = 1.0  # alpha / rank when the policy carries LoRA adapters
  chunk_size: int | None = None  # LM-head positions per chunk
  window: int | None = None  # the LM head sees the last `window` completion positions (data.max_completion_length)
  grad_accum_steps: int = 1

  @classmethod
  def from_config(cls, config, model: Transformer, loss: Callable | None = None, numbers=None) -> "Settings":
    """The registered `config.dpo.loss` (plus the SFT term when `config.dpo.sft_weight`), or `loss`: a
    `preference.Loss` brings its own flags, a plain function takes those of config.dpo.loss. `numbers`
    ({"dpo.beta": value, ...}) replace the registered loss's hyper-parameters (traced values per member:
    rlhfx.members)."""
    hyper = {k.removeprefix("dpo."): v for k, v in (numbers or {}).items() if k.startswith("dpo.")}
    registered = preference.from_config(config.dpo, **hyper)
    flags = loss if isinstance(loss, preference.Loss) else registered
    loss = loss or registered
    if config.dpo.sft_weight and not flags.unpaired:
      loss = preference.weighted_sum([(1.0, loss), (config.dpo.sft_weight, preference.sft_term)])
    return cls(model=model, loss=loss, name=flags.name, reference="none" if flags.reference_free
               else config.dpo.reference, unpaired=flags.unpaired, lora_scale=lora.scale(config.lora),
               chunk_size=config.model.lm_head_chunk or None, window=config.data.max_completion_length or None,
               grad_accum_steps=config.train.grad_accum_steps)


def reference_logps_step(params, batch, *, s: Settings) -> dict[str, Array]:
  """The summed completion log-probs of `params` (the reference): {"chosen_B", "rejected_B"} of pairs, {"logps_B"}
  of unpaired examples (a batch with `label_B`)."""
  if "label_B" in batch:
    logps_B = completion_logps(s.model, params, batch["tokens_BxT"], batch["mask_BxT"], batch["loss_mask_BxT"],
                               chunk_size=s.chunk_size, window=s.window)[0]
    return {"logps_B": logps_B}
  x = pair_logps(s.model, params, batch, chunk_size=s.chunk_size, window=s.window)
  return {"chosen_B": x.chosen_B, "rejected_B": x.rejected_B}


def dpo_objective(params, batch, reference_params, *, s: Settings, loss: Callable | None = None):
  """`loss` (default `s.loss`) of the policy (`params`, LoRA-merged) with the reference per `s.reference`."""
  loss = loss or s.loss
  policy = lora.effective(params, s.lora_scale)
  ref = None
  if s.reference == "precomputed":
    ref = {k: batch[key] for k, key in REFERENCE_KEYS.items() if key in batch}
  elif s.reference != "none":
    reference = params["base"] if s.reference == "lora_base" else reference_params
    ref = reference_logps_step(jax.lax.stop_gradient(reference), batch, s=s)
  if "label_B" in batch:
    logps_B = reference_logps_step(policy, batch, s=s)["logps_B"]
    return loss(preference.UnpairedLogps(logps_B=logps_B, ref_logps_B=ref["logps_B"], labels_B=batch["label_B"]))
  x = pair_logps(s.model, policy, batch, chunk_size=s.chunk_size, window=s.window)
  if ref is not None:
    x = x.replace(ref_chosen_B=ref["chosen_B"], ref_rejected_B=ref["rejected_B"])
  return loss(x)


def train_step(state: TrainState, batch, reference_params, *, s: Settings, optimizer, schedule):
  """One optimizer step of `s.loss` (any function PairLogps -> (loss, metrics))."""
  objective = functools.partial(dpo_objective, s=s)
  new_state, grads, m = update(state, lambda p, b: objective(p, b, reference_params), batch, optimizer,
                               s.grad_accum_steps, average=True)
  step_metrics = {("train/loss" if k == "loss" else k): v for k, v in m.items()}
  return new_state, {**step_metrics, "train/grad_norm": optax.global_norm(grads), "train/lr": schedule(state.step),
                     "train/padding": padding_share(batch)}


def eval_step(params, batch, reference_params, *, s: Settings):
  """The loss and its metrics per example ([B] each: the loss applied to each pair alone), so held-out means are
  over examples and the padding rows of a short last batch can be left out. An unpaired loss (KTO: its KL term
  is a batch statistic) gives batch means instead."""
  per_example = s.loss if s.unpaired else jax.vmap(lambda x: s.loss(jax.tree.map(lambda a: a[None], x)))
  value, step_metrics = dpo_objective(params, batch, reference_params, s=s, loss=per_example)
  return {"loss": value, **step_metrics}


def step_function(config, model_config: ModelConfig, optimizer, schedule, numbers=None, *,
                  loss: Callable | None = None):
  """train_step(state, batch, reference) with everything else bound; `numbers` replace the registered loss's
  hyper-parameters ({"dpo.beta": value}: traced values per member, rlhfx.members)."""
  s = Settings.from_config(config, Transformer(model_config), loss, numbers)
  return functools.partial(train_step, s=s, optimizer=optimizer, schedule=schedule)


def heldout_metrics(outputs, s: Settings, batch_size: int) -> dict[str, float]:
  """Held-out metrics of `eval_step`'s outputs (evaluation.outputs): means over the real examples (KTO: over its
  full eval batches, its KL term being a batch statistic)."""
  outs = list(outputs)
  if not s.unpaired:
    return {f"eval/{k}": float(np.concatenate([out[k][valid_B] for out, valid_B, _ in outs]).mean())
            for k in outs[0][0]}
  full = [out for out, valid_B, _ in outs if valid_B.all()]
  if not full:
    logging.warning("KTO evaluation needs one full eval batch of %d rows; the eval split is smaller", batch_size)
  return {f"eval/{k}": float(np.mean([o[k] for o in full])) for k in (full[0] if full else {})}


def jit_train_step(config, s: Settings, optimizer, shardings, reference):
  """The jitted step a run executes, state donated; `reference` is the frozen tree, its ShapeDtypeStructs, or
  None."""
  step = functools.partial(train_step, s=s, optimizer=optimizer,
                           schedule=learning_rate_schedule(config.optim, config.train.num_steps))
  reference_shardings = None if reference is None else jax.tree.map(lambda x: x.sharding, reference)
  return jax.jit(step, in_shardings=(shardings, None, reference_shardings), out_shardings=(shardings, None),
                 donate_argnums=0)


def flops_per_token(model_config: ModelConfig, length: int, s: Settings) -> float:
  """Matmul FLOPs of a step per sequence token: forward and backward of the policy (the last layer and the LM head
  on the window's positions only) plus the reference's forward (a third of that) when it runs in the step."""
  per_row = flops.sequence_train_flops(model_config, length, kept=s.window + 1 if s.window else None)
  forwards = 1 if s.reference in ("frozen", "lora_base") else 0
  return per_row * (1 + forwards / 3) / length


def init(config, model_config: ModelConfig, trees: load.Trees, loss: Callable | None = None) -> Initial:
  """The state (the policy, LoRA-wrapped per config.lora, and its optimizer state), the frozen reference (with
  config.dpo.reference=frozen) and the jitted step: arrays for `train`, ShapeDtypeStructs for the planner
  (`trees.abstract`). With reference=precomputed, `initial_policy(state.params)` is what the reference pass
  reads, before any step."""
  s = Settings.from_config(config, Transformer(model_config), loss)
  base = trees.params(s.model)
  reference = trees.frozen(base, model_config.jnp_dtype) if s.reference == "frozen" else None
  params = lora.wrap(base, config.lora, init_seed(config) + 1)
  optimizer = make_optimizer(config.optim, config.train.num_steps, params, frozen=lora.frozen(config.lora))
  state, shardings = create_state(functools.partial(init_state, optimizer=optimizer), params, trees.runtime.mesh)
  return Initial(state, shardings, frozen={"reference": reference},
                 jitted=jit_train_step(config, s, optimizer, shardings, reference), settings=s,
                 flops_per_token=flops_per_token(model_config, max(config.data.buckets), s))


def initial_policy(params):
  """The policy's parameters at step 0 without a merged copy: the base under LoRA adapters (which start at 0)."""
  return params["base"] if lora.is_wrapped(params) else params


def jit_reference_logps(s: Settings):
  """The jitted pass that precomputes reference log-probs."""
  return jax.jit(functools.partial(reference_logps_step, s=s))


def precompute_reference(config, data, source, params, fn, mesh) -> dict[str, np.ndarray]:
  """{column: [N] reference log-probs} of every example of `source`, indexed by example id; progress said about
  every 10 s (a long pass over a large split)."""
  table: dict[str, np.ndarray] = {}
  batches = prepare.full_batches(config, data, source, keep_ids=True)
  began = said = time.perf_counter()
  done, show = 0, jax.process_index() == 0
  for out, valid_B, local in evaluation.outputs(lambda b: fn(params, prepare.drop_ids(b)), batches, mesh):
    ids = sharding.gather(local["example_id_B"])[valid_B]
    for k, v in out.items():
      table.setdefault(k, np.full(len(source), np.nan, np.float32))[ids] = v[valid_B]
    done += int(valid_B.sum())
    if show and time.perf_counter() - said > 10:
      said = time.perf_counter()
      print(f"reference: {done}/{len(source)} examples ({said - began:.0f} s)", flush=True)
  if show:
    print(f"reference: log-probs of {done} examples precomputed in {time.perf_counter() - began:.1f} s", flush=True)
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
  mesh, workdir, t = runtime.mesh, runtime.workdir, config.train
  with sharding.active(mesh, runtime.rules):
    run = init(config, model_config, load.Trees.of_run(config, runtime), loss)
    s, reference = run.settings, run.frozen["reference"]
    tables = {}
    if s.reference == "precomputed":  # with the initial policy, before any step donates the state
      fn, policy = jit_reference_logps(s), initial_policy(run.state.params)
      tables = {split: precompute_reference(config, data, source, policy, fn, mesh)
                for split, source in (("train", data.train), ("eval", data.eval)) if source is not None}
    train_iter = iter(prepare.batches(config, data, data.train, seed=config.seed))
    checkpointer, state, start = checkpoint.resume(config, workdir, run.state, train_iter, frozen=run.frozen)
    eval_fn = jax.jit(functools.partial(eval_step, s=s))

    def evaluate(state) -> dict[str, float]:
      """Held-out metrics: means over the eval examples (KTO: over its full eval batches)."""
      if data.eval is None:
        return {}
      batches = (with_reference(b, tables.get("eval"))
                 for b in prepare.full_batches(config, data, data.eval, keep_ids=True))
      return heldout_metrics(evaluation.outputs(lambda b: eval_fn(state.params, b, reference), batches, mesh), s,
                             t.global_batch_size)

    log = metrics.StepLog.of_run(config, workdir, data, checkpointer, start, run.flops_per_token)
    before, after = log.evaluation(start, lambda: evaluate(state)), {}
    with checkpoint.Preemption(checkpointer.directory) as preemption, checkpointer, log:
      for step in log.steps(start + 1, t.num_steps):
        batch = next(train_iter)
        state, step_metrics = run.jitted(state, sharding.global_batch(with_reference(batch, tables.get("train")),
                                                                      mesh), reference)
        log.record(step, step_metrics, tokens=prepare.tokens(batch))
        if checkpoint.save_or_stop(step, state, train_iter, t, log, checkpointer, preemption):
          break
        if metrics.evaluation_due(step, t):
          after = log.evaluation(step, lambda: evaluate(state))
          evaluation.log_heldout_samples(log, step, config, lora.effective(state.params, s.lora_scale), model_config,
                                         data, reference="completion" if s.unpaired else "chosen")
  lines = export.export_policy(config, model_config, state.params, data.tokenizer, workdir)
  if "eval/rewards/accuracies" in before and "eval/rewards/accuracies" in after:
    ties = " (at step 0 every pair ties: the policy is the reference)" if abs(
        before["eval/rewards/margins"]) < 1e-6 and before["eval/rewards/accuracies"] == 0 else ""
    lines.insert(0, f"held-out rewards/accuracies {before['eval/rewards/accuracies']:.1%} -> "
                    f"{after['eval/rewards/accuracies']:.1%}; rewards/margins {before['eval/rewards/margins']:.3f} -> "
                    f"{after['eval/rewards/margins']:.3f}{ties}")
  if s.unpaired and "eval/rewards/chosen" in before and "eval/rewards/chosen" in after:
    (d0, u0), (d1, u1) = ((m["eval/rewards/chosen"], m["eval/rewards/rejected"]) for m in (before, after))
    lines.insert(0, f"held-out rewards: desirable {d0:.3f} -> {d1:.3f}, undesirable {u0:.3f} -> {u1:.3f} "
                    f"(gap {d0 - u0:.3f} -> {d1 - u1:.3f})")
  lora_note = f", LoRA rank {config.lora.rank}" if config.lora.rank else ""
  export.print_summary(f"{s.name} preference tuning ({s.reference} reference{lora_note}) for "
                       f"{t.num_steps} steps", lines, workdir, data)
  return {**log.last, **after}
