"""KV-cache sampler: equals recomputing the full forward, padding-invariant, stops at EOS, filters right."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import GOLDENS, forward
from rlhfx import sampling
from rlhfx.data.tokenize import llama2c_tokenizer
from rlhfx.models.convert import from_hf, stack_layers
from rlhfx.models.llama2c import from_llama2c

PROMPTS = [[5, 17, 3, 9, 44], [60, 1], [7, 7, 12, 90, 33, 4, 8]]


@pytest.fixture(scope="module", params=["gpt2", "mistral", "gemma3"])
def model(request):
  return from_hf(GOLDENS / request.param)


def _full_forward_logps(config, params, prompt, completion, temperature=1.0):
  """log p of each completion token, recomputing the whole forward without a cache."""
  logits = forward(config, params, [list(prompt) + list(completion)])[0] / temperature
  logps = jax.nn.log_softmax(logits, -1)
  return np.array([logps[len(prompt) - 1 + i, t] for i, t in enumerate(completion)])


def _generate(config, params, prompts, rng=0, **kw):
  tokens, mask = sampling.pad_prompts(prompts)
  return sampling.generate(params, config, tokens, mask, jax.random.key(rng), **kw)


def test_cached_greedy_equals_full_recompute(model):
  config, params = model
  result = _generate(config, params, PROMPTS[:1], max_new_tokens=10, temperature=0.0)
  completion = np.asarray(result.tokens_BxC[0])
  # greedy by recomputation: argmax of the full forward, one token at a time
  tokens = list(PROMPTS[0])
  length = len(tokens) + 10  # right-padded to one length: one compilation, same logits at real positions
  for _ in range(10):
    n = len(tokens)
    logits = forward(config, params, [tokens + [0] * (length - n)], [[True] * n + [False] * (length - n)])
    tokens.append(int(np.argmax(logits[0, n - 1])))
  np.testing.assert_array_equal(completion, tokens[len(PROMPTS[0]):])
  np.testing.assert_allclose(result.logps_BxC[0], _full_forward_logps(config, params, PROMPTS[0], completion),
                             atol=1e-5)


def test_padded_batch_equals_each_prompt_alone(model):
  config, params = model
  batch = _generate(config, params, PROMPTS, max_new_tokens=8, temperature=0.0)
  for i, prompt in enumerate(PROMPTS):
    alone = _generate(config, params, [prompt], max_new_tokens=8, temperature=0.0)
    np.testing.assert_array_equal(batch.tokens_BxC[i], alone.tokens_BxC[0])
    np.testing.assert_allclose(batch.logps_BxC[i], alone.logps_BxC[0], atol=1e-5)


def test_scan_layers_samples_the_same_tokens(model):
  """The nn.scan decoder (one layer's cache per step) samples what the per-layer loop does."""
  config, params = model
  loop = _generate(config, params, PROMPTS, rng=1, max_new_tokens=6, temperature=0.7)
  scanned = _generate(config.replace(scan_layers=True), stack_layers(params, config.n_layers), PROMPTS, rng=1,
                      max_new_tokens=6, temperature=0.7)
  np.testing.assert_array_equal(scanned.tokens_BxC, loop.tokens_BxC)
  np.testing.assert_allclose(scanned.logps_BxC, loop.logps_BxC, atol=1e-5)


def test_sampled_logps_are_the_policy_logps(model):
  config, params = model
  result = _generate(config, params, PROMPTS, rng=3, max_new_tokens=6, temperature=0.7)
  for i, prompt in enumerate(PROMPTS):
    want = _full_forward_logps(config, params, prompt, np.asarray(result.tokens_BxC[i]), temperature=0.7)
    np.testing.assert_allclose(result.logps_BxC[i], want, atol=1e-5)


def test_stops_at_eos_and_masks_after_it():
  config, params = from_hf(GOLDENS / "llama")
  free = _generate(config, params, PROMPTS, max_new_tokens=12, temperature=0.0)
  # choose as EOS the token row 0 emits at step 3 (if it also appears earlier, the first occurrence counts)
  eos = int(free.tokens_BxC[0, 3])
  result = _generate(config, params, PROMPTS, max_new_tokens=12, temperature=0.0, eos_id=eos, pad_id=0)
  tokens, mask = np.asarray(result.tokens_BxC), np.asarray(result.mask_BxC)
  for row in range(len(PROMPTS)):
    hits = np.flatnonzero(np.asarray(free.tokens_BxC[row]) == eos)
    stop = hits[0] + 1 if hits.size else 12
    np.testing.assert_array_equal(mask[row], np.arange(12) < stop)
    np.testing.assert_array_equal(tokens[row, :stop], free.tokens_BxC[row, :stop])
    assert (tokens[row, stop:] == 0).all() and (np.asarray(result.logps_BxC)[row, stop:] == 0).all()
  assert mask[0].sum() <= 4


def test_all_rows_done_ends_early_with_full_mask_semantics():
  config, params = from_hf(GOLDENS / "llama")
  free = _generate(config, params, PROMPTS[:1], max_new_tokens=5, temperature=0.0)
  result = _generate(config, params, PROMPTS[:1], max_new_tokens=5, temperature=0.0,
                     eos_id=int(free.tokens_BxC[0, 0]))
  np.testing.assert_array_equal(result.mask_BxC[0], [True, False, False, False, False])


def _numpy_filter(logits, top_k, top_p):
  """Reference: keep the k largest, then the smallest prefix (by probability) reaching mass top_p."""
  keep = np.ones_like(logits, bool)
  order = np.argsort(-logits, kind="stable")
  if top_k:
    keep[order[top_k:]] = False
  if top_p < 1.0:
    masked = np.where(keep, logits, -np.inf)
    probs = np.exp(masked - masked.max())
    probs /= probs.sum()
    mass = 0.0
    for rank, idx in enumerate(order):
      if rank > 0 and mass >= top_p:
        keep[idx] = False
      mass += probs[idx]
  return keep


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.5), (0, 0.9), (10, 0.8), (1, 1.0)])
def test_filter_logits_matches_numpy_reference(top_k, top_p):
  logits = np.random.default_rng(0).normal(size=(16, 50)).astype(np.float32) * 2
  got = np.isfinite(np.asarray(sampling.filter_logits(jnp.asarray(logits), top_k=top_k, top_p=top_p)))
  want = np.stack([_numpy_filter(row, top_k, top_p) for row in logits])
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.6)])
def test_sampling_never_leaves_the_allowed_set(top_k, top_p):
  config, params = from_hf(GOLDENS / "qwen2")
  prompt = PROMPTS[0]
  logits = forward(config, params, [prompt])[0, -1]
  allowed = set(np.flatnonzero(_numpy_filter(logits, top_k, top_p)))
  assert 1 < len(allowed) < config.vocab_size // 2
  seen = set()
  for seed in range(4):
    result = _generate(config, params, [prompt] * 64, rng=seed, max_new_tokens=1, top_k=top_k, top_p=top_p)
    seen |= set(np.asarray(result.tokens_BxC[:, 0]).tolist())
  assert seen <= allowed
  assert len(seen) > 1  # it does sample, not just pick the argmax


def test_categorical_draws_follow_the_softmax():
  """Inverse-CDF sampling: frequencies of 200k draws match softmax(logits) within 5 standard errors, in
  each row; -inf logits are never drawn."""
  with np.errstate(divide="ignore"):  # log 0 = -inf: tokens that must never come out
    logits = np.log(np.array([[0.5, 0.25, 0.15, 0.07, 0.03, 0.0], [0.0, 0.0, 0.9, 0.0, 0.1, 0.0]], np.float32))
  n = 100_000
  keys = jax.random.split(jax.random.key(0), 2 * n).reshape(n, 2)  # a key per row and draw
  draws = jax.jit(jax.vmap(sampling.categorical, (0, None)))(keys, jnp.asarray(logits))
  draws = np.asarray(draws)
  probs = np.exp(logits)
  for row in range(2):
    freq = np.bincount(draws[:, row], minlength=6) / n
    stderr = np.sqrt(probs[row] * (1 - probs[row]) / n)
    assert (np.abs(freq - probs[row]) <= 5 * stderr + 1e-12).all(), (freq, probs[row])
    assert (freq[probs[row] == 0] == 0).all()


def test_stories260k_decodes_the_known_story(shared_data):
  """The real pretrained llama2.c model, greedy from BOS, 60 tokens (../shared/data/README.md)."""
  config, params = from_llama2c(shared_data("stories260k/stories260K.bin"))
  tokenizer = llama2c_tokenizer(shared_data("stories260k/tok512.bin"))
  result = sampling.generate(params, config, jnp.array([[1]]), jnp.array([[True]]), jax.random.key(0),
                             max_new_tokens=60, temperature=0.0)
  text = tokenizer.decode(np.asarray(result.tokens_BxC[0]).tolist())
  assert text == ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
                  "One day, she saw a big, red ball. She wanted to play with it, but it was too high")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_decode_in_cache_buckets_gives_the_tokens_of_one_full_length_loop(model, temperature):
  """Four loops, each over a cache just long enough for its steps, sample what one loop over the whole cache
  samples (the slots not yet written are masked either way); log-probs to float32 round-off."""
  config, params = model
  one = _generate(config, params, PROMPTS, rng=3, max_new_tokens=11, temperature=temperature, cache_buckets=1)
  four = _generate(config, params, PROMPTS, rng=3, max_new_tokens=11, temperature=temperature, cache_buckets=4)
  assert sampling.cache_lengths(7, 11, 4) == [10, 13, 16, 18]
  np.testing.assert_array_equal(np.asarray(four.tokens_BxC), np.asarray(one.tokens_BxC))
  np.testing.assert_array_equal(np.asarray(four.mask_BxC), np.asarray(one.mask_BxC))
  np.testing.assert_allclose(np.asarray(four.logps_BxC), np.asarray(one.logps_BxC), rtol=1e-5, atol=1e-5)


def test_a_decode_step_early_in_a_long_cache_does_a_fraction_of_a_late_ones_attention_work():
  """Compiled for a TPU chip: with 8 cache buckets over 64 prompt + 4,032 new tokens, a step in the first loop
  (cache of 576 slots) costs a fraction of a step in the last (4,096 slots): its FLOPs and HBM bytes, read
  from the program with rlhfx.hlo."""
  pytest.importorskip("libtpu", reason="compiling for a TPU chip needs libtpu: pip install -e '.[test,tpu]'")
  from rlhfx import hlo_cost, sharding, topology
  from rlhfx.models import Transformer, get_preset

  config = get_preset("tiny", vocab_size=256, max_seq_len=4096)
  _, devices = topology.devices("v5e-4")
  one = jax.sharding.SingleDeviceSharding(devices[0])
  shapes = jax.eval_shape(lambda: Transformer(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                        sharding.unbox(shapes["params"]))
  prompt = jax.ShapeDtypeStruct((8, 64), jnp.int32, sharding=one)
  mask = jax.ShapeDtypeStruct((8, 64), bool, sharding=one)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=one)
  text = sampling.generate.lower(params, config, prompt, mask, key, max_new_tokens=4032,
                                 cache_buckets=8).compile().as_text()
  cost = hlo_cost.program_cost(text)
  steps = [b for b in cost.bodies if b.decode and b.flops]
  assert sorted(b.trips for b in steps) == [447] + [512] * 7  # 4,031 steps (the first token is prefill's)
  first, last = min(steps, key=lambda b: b.flops), max(steps, key=lambda b: b.flops)
  assert first.flops < 0.35 * last.flops and first.hbm_bytes < 0.35 * last.hbm_bytes
  # all steps together: about half the attention work of 4,032 steps over 4,096 slots
  assert sum(b.trips * b.flops for b in steps) < 0.7 * 4032 * last.flops
