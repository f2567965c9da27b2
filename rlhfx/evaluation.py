"""Evaluation over a dataset: a jitted function over every batch, its outputs on the host.

  for out, valid_B, batch in evaluation.outputs(lambda b: eval_fn(params, b), batches, mesh):
    correct += int(((out["chosen_B"] - out["rejected_B"]) > 0)[valid_B].sum())

`batches` are host batches (`rlhfx.data.prepare.full_batches` marks padding rows with
`valid_B`; batches without it count every row). Outputs are gathered whole on every
process.
"""

from __future__ import annotations

import functools
import json
from typing import Callable, Iterable, Iterator

import jax
import numpy as np

from rlhfx import engine, sampling, sharding
from rlhfx.data.tokenize import encode_prompt


def outputs(fn: Callable, batches: Iterable[dict], mesh) -> Iterator[tuple[dict, np.ndarray, dict]]:
  """(host outputs of fn(global batch), valid_B of the global rows, this host's batch) per batch; `valid_B` is
  all True when the batch has none. Each call runs under the caller's `sharding.active`."""
  for local in batches:
    valid_B = local.pop("valid_B", np.ones(len(next(iter(local.values()))), bool))
    out = sharding.gather(fn(sharding.global_batch(local, mesh)))
    yield out, sharding.gather(valid_B) if jax.process_count() > 1 else valid_B, local


@functools.lru_cache(maxsize=8)
def _greedy(model_config, max_new_tokens: int, eos_id: int | None, pad_id: int) -> Callable:
  """The jitted greedy sampler of a model (one per settings: every evaluation of a run reuses its program): the
  engine, one slot per prompt (the static sampler's tokens)."""
  def generate(params, prompt_BxP, prompt_mask_BxP, rng):
    return engine.generate(params, model_config, prompt_BxP, prompt_mask_BxP, rng, group_size=1,
                           slots=prompt_BxP.shape[0], max_new_tokens=max_new_tokens, temperature=0.0,
                           eos_id=eos_id, pad_id=pad_id)

  return jax.jit(generate)


def heldout_samples(params, model_config, source, tokenizer, *, n: int, max_new_tokens: int,
                    reference: str) -> list[dict]:
  """Greedy completions of the first `n` held-out prompts (their chat template when they have messages):
  [{"prompt", "completion", "reference"}], `reference` naming the source's field to show beside (SFT's completion,
  DPO's chosen). Every process runs the program; the texts are the same on each."""
  examples = [source[i] for i in range(min(n, len(source)))]
  if not examples:
    return []
  text = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731
  keep = max(model_config.max_seq_len - max_new_tokens, 1)  # a prompt keeps its end, like training's truncation
  prompts = [encode_prompt(tokenizer, text(e["prompt"]), json.loads(text(e["messages"]) or "[]"))[-keep:]
             for e in examples]
  pad_id = tokenizer.pad_token_id or 0
  tokens, mask = sampling.pad_prompts(prompts, pad_id)
  generate = _greedy(model_config, max_new_tokens, tokenizer.eos_token_id, pad_id)
  result = jax.device_get(generate(params, prompt_BxP=tokens, prompt_mask_BxP=mask, rng=jax.random.key(0)))
  return [{"prompt": tokenizer.decode(p, skip_special_tokens=True),
           "completion": tokenizer.decode(row[row_mask], skip_special_tokens=True),
           "reference": text(e[reference])}
          for e, p, row, row_mask in zip(examples, prompts, np.asarray(result.tokens_BxC), np.asarray(result.mask_BxC))]


def log_heldout_samples(log, step: int, config, params, model_config, data, *, reference: str) -> None:
  """`config.train.eval_samples` held-out samples written by `log.samples` (metrics.StepLog): SFT and DPO call this
  at each evaluation."""
  t = config.train
  if t.eval_samples and data.eval is not None:
    log.samples(step, heldout_samples(params, model_config, data.eval, data.tokenizer, n=t.eval_samples,
                                      max_new_tokens=t.eval_sample_tokens, reference=reference))
