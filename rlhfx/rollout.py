"""Rollouts: what PPO and GRPO share on the device — sampling, completion log-probs, the epochs x
minibatches scan — and the held-out rollouts of their evaluations.

One iteration = rollout (sample completions of a batch of prompts with the
current policy) -> scoring (reward model or reward function: rlhfx.scoring) -> statistics
under the frozen trees (reference log-probs; old log-probs and values) -> advantages ->
`epochs` passes over the rollout in `minibatches` shuffled minibatches, each one
optimizer update. The jitted programs an iteration runs as are rlhfx.onpolicy's.

Sequences are [prompt (left-padded, P) | completion (C)]: positions count real
tokens, so a row's completion follows its prompt directly. Everything about a
completion lives on [B, C] arrays; the LM head runs only on the C positions that
predict completion tokens (hidden states P-1 .. P+C-2), never on the prompt.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Iterable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhfx import engine, reward_functions, sampling, scoring, sharding
from rlhfx.logprobs import target_logps
from rlhfx.models import ModelConfig, Transformer, lora
from rlhfx.models.heads import ScoreModel
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
    """From config.rollout and the tokenizer's EOS and pad ids (None: the model's own, as the planner has no
    tokenizer)."""
    r = config.rollout
    ids = tokenizer if tokenizer is not None else model_config
    fields = dict(model_config=model_config, max_new_tokens=r.max_new_tokens, group_size=r.group_size,
                  temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, eos_id=ids.eos_token_id,
                  pad_id=ids.pad_token_id or 0,
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


def heldout_rollouts(eval_fn: Callable, score: Callable, batches: Iterable[dict], mesh, *, seed: int,
                     eos_id: int | None, missing_eos_penalty: float) -> dict[str, float]:
  """Mean score (with its standard error), each reward function's eval/rewards/* and KL(policy || reference) of
  one sample per held-out prompt.

  `eval_fn(global batch, rng) -> (rollout, kl_B)` (`eval_rollout`, jitted), `score(rollout, ids_B) ->
  (scores_B, parts)` (rlhfx.onpolicy.score_fn; the batches keep their `example_id_B`); batch i samples with a key
  fixed by the seed and i, so every evaluation of a run sees the same draws.
  """
  scores, kls, lengths, parts = [], [], [], collections.defaultdict(list)
  for i, local in enumerate(batches):
    valid_B, ids_B = local.pop("valid_B"), local.pop("example_id_B", None)
    r, kl_B = eval_fn(sharding.global_batch(local, mesh), jax.random.fold_in(jax.random.PRNGKey(seed + 1), i))
    scores_B, parts_B = score(r, ids_B)
    scores_B = scoring.finish_scores(scores_B, r, eos_id, missing_eos_penalty)[0]
    host = sharding.gather((scores_B, kl_B, r.mask_BxC.sum(-1), parts_B))
    valid_B = sharding.gather(valid_B) if jax.process_count() > 1 else valid_B
    scores.append(host[0][valid_B]), kls.append(host[1][valid_B]), lengths.append(host[2][valid_B])
    for name, part_B in host[3].items():
      parts[name].append(np.asarray(part_B)[valid_B])
  scores, kls = np.concatenate(scores), np.concatenate(kls)
  rewards = reward_functions.metrics({k: np.concatenate(v) for k, v in parts.items()}, prefix="eval/rewards")
  return {"eval/scores": float(scores.mean()), "eval/scores_sem": float(scores.std() / max(len(scores), 1) ** .5),
          "eval/kl": float(kls.mean()), "eval/completion_length": float(np.concatenate(lengths).mean()),
          "eval/prompts": len(scores), **{k: float(v) for k, v in rewards.items()}}
