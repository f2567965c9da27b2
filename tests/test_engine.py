"""The continuous-batching engine equals the static sampler token for token, whatever the slot count."""

import jax
import numpy as np
import pytest

from conftest import GOLDENS
from rlhfx import engine, sampling
from rlhfx.models.convert import from_hf

PROMPTS = [[5, 17, 3, 9, 44], [60, 1], [7, 7, 12, 90, 33, 4, 8]]
GROUP = 4


@pytest.fixture(scope="module", params=["gpt2", "mistral"])
def model(request):
  return from_hf(GOLDENS / request.param)


def _static(config, params, rng, **kw):
  tokens, mask = sampling.pad_prompts(PROMPTS)
  rows_tokens, rows_mask = np.repeat(tokens, GROUP, axis=0), np.repeat(mask, GROUP, axis=0)
  return sampling.generate(params, config, rows_tokens, rows_mask, rng, **kw)


def _engine(config, params, rng, slots, **kw):
  tokens, mask = sampling.pad_prompts(PROMPTS)
  return engine.generate(params, config, tokens, mask, rng, group_size=GROUP, slots=slots, **kw)


def _eos_that_ends_some_rows(result) -> int:
  """A token the static run emits in some rows at varied places: with it as EOS, lengths differ."""
  tokens = np.asarray(result.tokens_BxC)
  counts = {}
  for row in tokens:
    for t in set(row[1:-1].tolist()):
      counts[t] = counts.get(t, 0) + 1
  return max(counts, key=lambda t: (min(counts[t], len(tokens) // 2), -t))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_engine_equals_static_sampler_token_for_token(model, temperature):
  config, params = model
  rng = jax.random.key(7)
  kw = dict(max_new_tokens=10, temperature=temperature)
  eos = _eos_that_ends_some_rows(_static(config, params, rng, **kw))
  static = _static(config, params, rng, eos_id=eos, **kw)
  lengths = np.asarray(static.mask_BxC).sum(-1)
  assert len(set(lengths.tolist())) > 1, "precondition: completions of varied length"
  for slots in (3, 12):  # fewer slots than rows: rows wait, take freed slots, run in other orders
    got = _engine(config, params, rng, slots, eos_id=eos, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens_BxC), np.asarray(static.tokens_BxC), err_msg=str(slots))
    np.testing.assert_array_equal(np.asarray(got.mask_BxC), np.asarray(static.mask_BxC), err_msg=str(slots))
    np.testing.assert_allclose(np.asarray(got.logps_BxC), np.asarray(static.logps_BxC), rtol=1e-5, atol=1e-5)


def test_a_row_is_the_same_whichever_slot_it_runs_in(model):
  """The rows of one prompt run in different slots and orders with 2 and 7 slots; each row's completion is the
  same (its own random stream), and the G rows of a prompt differ from each other (not one stream)."""
  config, params = model
  rng = jax.random.key(3)
  two = _engine(config, params, rng, 2, max_new_tokens=6)
  seven = _engine(config, params, rng, 7, max_new_tokens=6)
  np.testing.assert_array_equal(np.asarray(two.tokens_BxC), np.asarray(seven.tokens_BxC))
  first_prompt = np.asarray(two.tokens_BxC)[:GROUP]
  assert len({tuple(r) for r in first_prompt.tolist()}) > 1
