"""Rollouts: what PPO and GRPO share on the device — sampling, completion log-probs, scoring, the
epochs x minibatches scan — and the jitted programs an iteration runs as.

One iteration = rollout (sample completions of a batch of prompts with the
current policy) -> scoring (reward model or reward function) -> statistics under
the frozen trees (reference log-probs; old log-probs and values) -> advantages ->
`epochs` passes over the rollout in `minibatches` shuffled minibatches, each one
optimizer update. With an in-graph score all of it is one jitted function
(`Programs.fused`); otherwise rollout, scoring and update run as three, timed.

Sequences are [prompt (left-padded, P) | completion (C)]: positions count real
tokens, so a row's completion follows its prompt directly. Everything about a
completion lives on [B, C] arrays; the LM head runs only on the C positions that
predict completion tokens (hidden states P-1 .. P+C-2), never on the prompt.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhfx import engine, reward_functions, sampling, sampling_layout
from rlhfx.logprobs import target_logps
from rlhfx.models import ModelConfig, Transformer, lora
from rlhfx.models.heads import ScoreModel
from rlhfx.reward_functions import RewardFunction
from rlhfx.train_state import accumulate_gradients

Array = jax.Array


@flax.struct.dataclass
class Rollout:
  prompt_BxP: Array
  prompt_mask_BxP: Array
  tokens_BxC: Array  # sampled completions (pad after EOS)
  mask_BxC: Array  # real completion tokens, EOS included
  sample_logps_BxC: Array  # log-probs reported by the sampler

  @property
  def sequence_BxT(self) -> Array:
    return jnp.concatenate([self.prompt_BxP, self.tokens_BxC], axis=1)

  @property
  def sequence_mask_BxT(self) -> Array:
    return jnp.concatenate([self.prompt_mask_BxP, self.mask_BxC], axis=1)

  @property
  def prompt_len(self) -> int:
    return self.prompt_BxP.shape[1]


MIN_BUCKET_STEPS = 128  # a decode loop per this many new tokens at most: shorter ones cost more to compile than run


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  model_config: ModelConfig
  max_new_tokens: int
  group_size: int = 1  # completions per prompt
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  eos_id: int | None = None
  pad_id: int = 0
  cache_buckets: int = 4  # decode loops over growing KV caches (rlhfx.sampling)
  sampler: str = "engine"  # engine (rlhfx.engine: continuous batching, prompts prefilled once) | static
  slots: int = 0  # the engine's slots (0: one per row)

  @classmethod
  def from_config(cls, config, model_config: ModelConfig, tokenizer, **overrides) -> "SamplingSettings":
    r = config.rollout
    fields = dict(model_config=model_config, max_new_tokens=r.max_new_tokens, group_size=r.group_size,
                  temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, eos_id=tokenizer.eos_token_id,
                  pad_id=tokenizer.pad_token_id or 0,
                  cache_buckets=max(1, min(r.cache_buckets, r.max_new_tokens // MIN_BUCKET_STEPS)),
                  sampler=r.sampler, slots=r.slots)
    return cls(**{**fields, **overrides})


def rollout(policy_params, batch: dict[str, Array], rng: Array, s: SamplingSettings) -> Rollout:
  """Sample `s.group_size` completions of every prompt (rows of one prompt are consecutive). Both samplers
  draw row r's tokens from row r's own stream: the same completions."""
  prompt_BxP = jnp.repeat(batch["prompt_BxP"], s.group_size, axis=0)
  prompt_mask_BxP = jnp.repeat(batch["prompt_mask_BxP"], s.group_size, axis=0)
  common = dict(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                eos_id=s.eos_id, pad_id=s.pad_id)
  if s.sampler == "engine":
    out = engine.generate(policy_params, s.model_config, batch["prompt_BxP"], batch["prompt_mask_BxP"], rng,
                          group_size=s.group_size, slots=s.slots or prompt_BxP.shape[0], **common)
  else:
    out = sampling.generate(policy_params, s.model_config, prompt_BxP, prompt_mask_BxP, rng,
                            cache_buckets=s.cache_buckets, **common)
  return Rollout(prompt_BxP=prompt_BxP, prompt_mask_BxP=prompt_mask_BxP, tokens_BxC=out.tokens_BxC,
                 mask_BxC=out.mask_BxC, sample_logps_BxC=out.logps_BxC)


def key(seed: int, step: Array, phase: int) -> Array:
  """The key of iteration `step`'s phase (0: sampling, 1: minibatch shuffling), from the seed."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), step), phase)


def completion_stats(model: Transformer, params, r: Rollout, *, temperature: float, chunk_size: int | None = None,
                     entropy: bool = False):
  """(logps_BxC, entropy_BxC or None, hidden_BxCxD) of the completion tokens under softmax(logits / T)."""
  hidden_BxTxD = model.apply({"params": params}, r.sequence_BxT, r.sequence_mask_BxT, return_hidden=True)
  p, c = r.prompt_len, r.tokens_BxC.shape[1]
  hidden_BxCxD = hidden_BxTxD[:, p - 1:p + c - 1]
  logps_BxC, _, ent_BxC = target_logps(model, params, hidden_BxCxD, r.tokens_BxC, chunk_size=chunk_size,
                                       temperature=temperature, entropy=entropy)
  return logps_BxC, ent_BxC, hidden_BxCxD


def completion_values(score_model: ScoreModel, params, r: Rollout) -> Array:
  """values_BxC of a critic: V of the state before each completion token (the hidden state predicting it)."""
  values_BxT = score_model.apply({"params": params}, r.sequence_BxT, r.sequence_mask_BxT, per_token=True)
  p, c = r.prompt_len, r.tokens_BxC.shape[1]
  return values_BxT[:, p - 1:p + c - 1]


@dataclasses.dataclass(frozen=True)
class Scorer:
  """How completions are scored (static): a reward model (its params travel as a frozen argument) and/or reward
  functions (rlhfx.reward_functions), whose weighted sum is added. Text functions run on the host between rollout
  and update (rlhfx.rewards.score_on_host); the rest runs in the graph."""

  module: ScoreModel | None = None
  mean: float = 0.0  # reward-model score normalisation
  std: float = 1.0
  functions: tuple[RewardFunction, ...] = ()
  missing_eos_penalty: float = 0.0

  @property
  def in_graph(self) -> bool:
    """Whether all of the scoring runs in the graph (no text function)."""
    return all(f.on_tokens for f in self.functions)

  @property
  def has_graph_part(self) -> bool:
    """Whether any of it does (a reward model or a traceable function)."""
    return self.module is not None or any(f.on_tokens for f in self.functions)


def scores(r: Rollout, reward_params, scorer: Scorer) -> tuple[Array, dict[str, Array]]:
  """(scores_B, {name: scores_B} of each traceable reward function) computed in the graph: the reward model's
  normalised score at the last real token plus the traceable functions' weighted scores (text functions are
  added on the host)."""
  total_B = jnp.zeros(r.tokens_BxC.shape[:1], jnp.float32)
  if scorer.module is not None:
    raw_B = scorer.module.apply({"params": reward_params}, r.sequence_BxT, r.sequence_mask_BxT)
    total_B = (raw_B - scorer.mean) / scorer.std
  parts = {f.name: f.fn(r.prompt_BxP, r.prompt_mask_BxP, r.tokens_BxC, r.mask_BxC).astype(jnp.float32)
           for f in scorer.functions if f.on_tokens}
  return total_B + reward_functions.weighted_sum(parts, scorer.functions), parts


def finish_scores(scores_B: Array, r: Rollout, eos_id: int | None, missing_eos_penalty: float) -> tuple[Array, Array]:
  """(scores_B after the missing-EOS penalty, has_eos_B): a completion cut at max_new_tokens loses the penalty."""
  if eos_id is None:
    return scores_B, jnp.zeros(scores_B.shape, bool)
  has_eos_B = jnp.any((r.tokens_BxC == eos_id) & r.mask_BxC, axis=-1)
  return jnp.where(has_eos_B, scores_B, scores_B - missing_eos_penalty), has_eos_B


def logprob_agreement(r: Rollout, logps_BxC: Array) -> dict[str, Array]:
  """How far the trainer's recomputed log-probs of the sampled tokens are from the sampler's own (other kernels,
  another layout, bf16): |difference| over the completion tokens, mean and max. The first number to read when
  an RL run diverges."""
  diff_BxC = jnp.where(r.mask_BxC, jnp.abs(logps_BxC - r.sample_logps_BxC), 0.0)
  tokens = jnp.maximum(r.mask_BxC.sum(), 1)
  return {"rollout/logprob_diff_mean": diff_BxC.sum() / tokens, "rollout/logprob_diff_max": diff_BxC.max()}


def sequence_kl(logps_BxC: Array, ref_logps_BxC: Array, mask_BxC: Array) -> Array:
  """kl_B: KL(policy || reference) of each sampled completion, the k1 estimate summed over its tokens."""
  return jnp.sum(jnp.where(mask_BxC, logps_BxC - ref_logps_BxC, 0.0), axis=-1)


def minibatch_epochs(params, opt_state, optimizer: optax.GradientTransformation, data: dict[str, Array],
                     loss_fn: Callable, rng: Array, *, epochs: int, minibatches: int, grad_accum_steps: int = 1):
  """`epochs` shuffled passes over `data` (a dict of [B, ...] arrays), each `minibatches` optimizer updates of
  `loss_fn(params, minibatch) -> (loss, metrics)`, as nested `lax.scan`s. Returns (params, opt_state, metrics
  averaged over all updates, plus grad_norm)."""
  rows = jax.tree.leaves(data)[0].shape[0]
  if rows % minibatches:
    raise ValueError(f"{rows} rollout rows do not split into {minibatches} minibatches")

  def update(carry, minibatch):
    params, opt_state = carry
    grads, metrics = accumulate_gradients(loss_fn, params, minibatch, grad_accum_steps, average=True)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    metrics = {**metrics, "grad_norm": optax.global_norm(grads)}
    return (optax.apply_updates(params, updates), opt_state), metrics

  def epoch(carry, epoch_rng):
    order_B = jax.random.permutation(epoch_rng, rows)
    shuffled = jax.tree.map(lambda x: x[order_B].reshape(minibatches, rows // minibatches, *x.shape[1:]), data)
    return jax.lax.scan(update, carry, shuffled)

  (params, opt_state), metrics_ExM = jax.lax.scan(epoch, (params, opt_state), jax.random.split(rng, epochs))
  return params, opt_state, jax.tree.map(jnp.mean, metrics_ExM)


def eval_rollout(policy_params, batch: dict[str, Array], reference_params, rng: Array, *, model: Transformer,
                 s: SamplingSettings, chunk_size: int | None = None, lora_scale: float = 1.0):
  """(rollout, kl_B) of one sample per prompt: the held-out measurement of score and KL(policy || reference)."""
  policy_params = lora.effective(policy_params, lora_scale)
  r = rollout(policy_params, batch, rng, s)
  logps_BxC = completion_stats(model, policy_params, r, temperature=s.temperature, chunk_size=chunk_size)[0]
  ref_BxC = completion_stats(model, reference_params, r, temperature=s.temperature, chunk_size=chunk_size)[0]
  return r, sequence_kl(logps_BxC, ref_BxC, r.mask_BxC)


def sample_step(policy_params, batch: dict[str, Array], step: Array, *, seed: int, s: SamplingSettings) -> Rollout:
  """The rollout of iteration `step` (its sampling key derives from the seed and the step)."""
  return rollout(policy_params, batch, key(seed, step, 0), s)


@dataclasses.dataclass(frozen=True)
class Programs:
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
  def jit(cls, *, iteration: Callable, policy: Callable, update_step: Callable, scorer: Scorer, shardings,
          seed: int, sampling: SamplingSettings, layout: sampling_layout.Layout | None = None) -> "Programs":
    """From an algorithm's pure functions with their settings bound; `policy(state)` is the policy's parameters
    the model samples with (LoRA merged)."""
    sample = functools.partial(sample_step, seed=seed, s=sampling)

    def rollout_step(state, batch):
      return sample(policy(state), batch, state.step)

    def scored(state, r, frozen):
      return fused_iteration(update_step, state, r, frozen, scorer)

    programs = dict(
        iteration=jax.jit(iteration, in_shardings=(shardings, None, None), out_shardings=(shardings, None, None, None),
                          donate_argnums=0),
        rollout=jax.jit(rollout_step),
        score=jax.jit(lambda r, reward_params: scores(r, reward_params, scorer)),
        update=jax.jit(update_step, in_shardings=(shardings, None, None, None), out_shardings=(shardings, None),
                       donate_argnums=0),
        scored_update=jax.jit(scored, in_shardings=(shardings, None, None),
                              out_shardings=(shardings, None, None, None), donate_argnums=0))
    if layout is not None:
      training = jax.tree.leaves(shardings)[0].mesh
      programs.update(layout=layout,
                      reshard=sampling_layout.reshard_program(layout, policy, sampling.model_config.jnp_dtype),
                      sample=sampling_layout.sample_program(layout, sample, training))
    return cls(**programs)

  def sample_rollout(self, state, batch: dict[str, Array]) -> Rollout:
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


def fused_iteration(update_step: Callable, state, r: Rollout, frozen: dict, scorer: Scorer):
  """An algorithm's `iteration` after its rollout: in-graph scoring, then the update; (state, metrics with
  rewards/*, r, scores_B)."""
  scores_B, parts = scores(r, frozen["reward"], scorer)
  state, step_metrics = update_step(state, r, scores_B, frozen)
  return state, {**step_metrics, **reward_functions.metrics(parts)}, r, scores_B


def run_phases(programs: Programs, state, batch: dict[str, Array], frozen: dict, score: Callable):
  """(state, metrics + rewards/* + time/*_s, rollout, scores_B): rollout, `score(rollout) -> (scores_B, parts)`
  (the scoring program, or it and host scoring) and update one after the other, each timed."""
  t0 = time.perf_counter()
  r = jax.block_until_ready(programs.sample_rollout(state, batch))
  t1 = time.perf_counter()
  scores_B, parts = jax.block_until_ready(score(r))
  t2 = time.perf_counter()
  state, metrics = jax.block_until_ready(programs.update(state, r, scores_B, frozen))
  times = {"time/rollout_s": t1 - t0, "time/scoring_s": t2 - t1, "time/update_s": time.perf_counter() - t2}
  return state, {**metrics, **reward_functions.metrics(parts), **times}, r, scores_B


def scoring(programs: Programs, scorer: Scorer, reward_params, tokenizer, mesh, source=None) -> Callable:
  """(rollout, this process's prompt ids or None) -> (scores_B, parts): the scoring program, and the text reward
  functions on the host with the columns of `source`'s prompt rows."""
  if scorer.in_graph:
    return lambda r, ids_B=None: programs.score(r, reward_params)
  from rlhfx.rewards import score_on_host

  return lambda r, ids_B=None: score_on_host(
      scorer, tokenizer, r, mesh, in_graph=programs.score(r, reward_params) if scorer.has_graph_part else None,
      prompt_ids=ids_B, source=source)


def run_iteration(programs: Programs, state, batch: dict, frozen: dict, score: Callable, mesh, *, phased: bool):
  """(state, metrics, rollout, scores_B) of one iteration on this process's host `batch` (its `example_id_B` go
  to host scoring): the fused program, or the timed phases."""
  from rlhfx import sharding
  from rlhfx.data.prepare import drop_ids

  global_batch = sharding.global_batch(drop_ids(batch), mesh)
  if not phased:
    return programs.fused(state, global_batch, frozen)
  return run_phases(programs, state, global_batch, frozen, lambda r: score(r, batch.get("example_id_B")))


def tokens(batch: dict, s: SamplingSettings) -> int:
  """Tokens of one iteration's sequences on this host: prompts and completions, every sample of a group."""
  rows, prompt_len = batch["prompt_BxP"].shape
  return rows * s.group_size * (prompt_len + s.max_new_tokens)


def summary(before: dict, after: dict, workdir) -> list[str]:
  """The held-out score and KL before and after training, and where the samples are."""
  lines = []
  if before and after:
    lines.append(f"held-out mean score {before['eval/scores']:.3f} -> {after['eval/scores']:.3f}; "
                 f"KL(policy || reference) {before['eval/kl']:.3f} -> {after['eval/kl']:.3f} nats "
                 f"({after['eval/prompts']} prompts)")
  return lines + [f"samples: {workdir / 'samples.jsonl'}"]
