"""The Linen decoder: options that must not change results, padding, axes, config errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import GOLDENS, forward
from rlhfx.models import PRESETS, ModelConfig, Transformer, get_preset, init_params
from rlhfx.models.convert import from_hf, stack_layers, unstack_layers
from rlhfx.models.transformer import attention


TOKENS = np.array([[5, 17, 3, 9, 44, 2, 71, 8], [60, 1, 7, 7, 12, 90, 33, 4]], np.int32)


def _numpy_attention(q, k, v, mask, scale, softcap=None):
  """Textbook softmax attention per (row, query head), in float64; a query that sees no key averages all values;
  `softcap` c: scores -> c tanh(scores / c) (Gemma 2)."""
  b, t, n, h = q.shape
  kv_heads = k.shape[1]
  out = np.zeros((b, t, n, h))
  for i in range(b):
    for head in range(n):
      kv = head // (n // kv_heads)
      scores = q[i, :, head].astype(np.float64) @ k[i, kv].T.astype(np.float64) * scale
      if softcap is not None:
        scores = softcap * np.tanh(scores / softcap)
      scores = np.where(mask[i], scores, -np.inf)
      scores[~mask[i].any(-1)] = 0.0
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      out[i, :, head] = probs / probs.sum(-1, keepdims=True) @ v[i, kv]
  return out


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (4, 1)])
def test_attention_matches_numpy_and_jax_gradients(heads, kv_heads):
  """`attention` (mask as a bias, normalised after the value product) against a float64 NumPy softmax, and
  its gradients against jax.nn.dot_product_attention's; causal + padding masks with a fully masked query."""
  b, t, s, h = 2, 5, 7, 8
  rng = np.random.default_rng(0)
  q = rng.normal(size=(b, t, heads, h)).astype(np.float32)
  k, v = (rng.normal(size=(b, kv_heads, s, h)).astype(np.float32) for _ in range(2))
  mask = np.arange(s)[None, None, :] <= np.arange(t)[None, :, None] + 2
  mask = np.broadcast_to(mask, (b, t, s)).copy()
  mask[1, :, :4] = False  # left padding of row 1: its query 0 sees no key
  scale = 1 / np.sqrt(h)
  got = attention(q, k, v, mask, scale)
  np.testing.assert_allclose(got, _numpy_attention(q, k, v, mask, scale), rtol=1e-5, atol=1e-6)

  weights = rng.normal(size=q.shape).astype(np.float32)
  ours = jax.grad(lambda *a: (attention(*a, mask, scale) * weights).sum(), argnums=(0, 1, 2))(q, k, v)
  theirs = jax.grad(lambda q, k, v: (jax.nn.dot_product_attention(
      q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask=mask[:, None], scale=scale) * weights).sum(),
      argnums=(0, 1, 2))(q, k, v)
  for a, want in zip(ours, theirs):
    np.testing.assert_allclose(a, want, rtol=1e-4, atol=1e-5)


def test_soft_capped_attention_matches_numpy():
  rng = np.random.default_rng(1)
  q = rng.normal(size=(1, 6, 4, 8)).astype(np.float32) * 3  # large scores, so the cap bends them
  k, v = (rng.normal(size=(1, 2, 6, 8)).astype(np.float32) for _ in range(2))
  mask = np.tril(np.ones((6, 6), bool))[None]
  got = attention(q, k, v, mask, 0.25, softcap=1.5)
  np.testing.assert_allclose(got, _numpy_attention(q, k, v, mask, 0.25, softcap=1.5), rtol=1e-5, atol=1e-6)
  assert np.abs(got - _numpy_attention(q, k, v, mask, 0.25)).max() > 0.05


@pytest.mark.parametrize("family", ["gpt2", "qwen3", "gemma2", "gemma3"])
def test_scan_and_remat_do_not_change_logits_or_grads(family):
  config, params = from_hf(GOLDENS / family)

  def loss(p, cfg):
    return Transformer(cfg).apply({"params": p}, TOKENS).mean()

  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  ref_loss, ref_grad = value_and_grad(params, config)
  for remat in ["none", "full", "dots"]:
    cfg = config.replace(scan_layers=True, remat=remat)
    stacked = stack_layers(params, cfg.n_layers)
    value, grad = value_and_grad(stacked, cfg)
    np.testing.assert_allclose(value, ref_loss, rtol=1e-6)
    # every gradient leaf, unstacked back to per-layer trees: the same arithmetic, the backward pass possibly
    # recomputed (remat) and fused differently, so float32 round-off
    unstacked = unstack_layers(grad, cfg.n_layers)
    assert jax.tree.structure(unstacked) == jax.tree.structure(ref_grad)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(unstacked), jax.tree.leaves(ref_grad)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=f"{remat} {jax.tree_util.keystr(path)}")


def test_padding_does_not_change_real_positions():
  config, params = from_hf(GOLDENS / "llama")
  alone = forward(config, params, TOKENS[:1, :5])
  # right padding: pad tokens after the real ones
  right = forward(config, params, TOKENS[:1], np.array([[1, 1, 1, 1, 1, 0, 0, 0]], bool))
  np.testing.assert_allclose(right[:, :5], alone, atol=1e-5)
  # left padding: positions count real tokens only, so RoPE sees 0..4 as alone
  left_tokens = np.concatenate([np.zeros((1, 3), np.int32), TOKENS[:1, :5]], axis=1)
  left = forward(config, params, left_tokens, np.array([[0, 0, 0, 1, 1, 1, 1, 1]], bool))
  np.testing.assert_allclose(left[:, 3:], alone, atol=1e-5)


def test_hidden_states_and_unembed():
  config = get_preset("tiny")
  params = init_params(config, jax.random.key(0))
  model = Transformer(config)
  hidden = model.apply({"params": params}, TOKENS, return_hidden=True)
  assert hidden.shape == TOKENS.shape + (config.d_model,)
  logits = model.apply({"params": params}, hidden, method=Transformer.unembed)
  np.testing.assert_allclose(logits, forward(config, params, TOKENS), atol=1e-6)
  assert logits.dtype == jnp.float32


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_selected_positions_equal_the_full_pass_there(family):
  """select_BxQ: the last layer runs queries and MLP at the selected positions only; values and grads
  equal the full pass's at those positions (RoPE with left padding, learned positions, scan_layers)."""
  config, params = from_hf(GOLDENS / family)
  mask = np.array([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]], bool)
  select = np.array([[7, 2], [4, 7]], np.int32)

  def hidden(p, cfg, sel):
    return Transformer(cfg).apply({"params": p}, TOKENS, mask, return_hidden=True, select_BxQ=sel)

  full = np.asarray(jax.jit(hidden, static_argnums=1)(params, config, None))
  want = np.take_along_axis(full, select[..., None], axis=1)
  got = jax.jit(hidden, static_argnums=1)(params, config, select)
  assert got.shape == (2, 2, config.d_model)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  scanned = config.replace(scan_layers=True)
  np.testing.assert_allclose(jax.jit(hidden, static_argnums=1)(stack_layers(params, config.n_layers), scanned, select),
                             want, rtol=1e-5, atol=1e-5)

  weights = jax.random.normal(jax.random.key(0), want.shape)
  grad_full = jax.jit(jax.grad(
      lambda p: (jnp.take_along_axis(hidden(p, config, None), select[..., None], 1) * weights).sum()))
  grad_sel = jax.jit(jax.grad(lambda p: (hidden(p, config, select) * weights).sum()))
  for a, b in zip(jax.tree.leaves(grad_sel(params)), jax.tree.leaves(grad_full(params))):
    # float32 sums in another order: a few entries of ~0.01 differ by ~4e-6
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bf16_compute_is_close_to_f32():
  config, params = from_hf(GOLDENS / "llama")
  f32 = forward(config, params, TOKENS)
  bf16 = forward(config.replace(dtype="bfloat16"), params, TOKENS)
  assert bf16.dtype == np.float32  # logits always come back in f32
  # bf16 really computes in bf16 (an ignored dtype would give f32's numbers exactly): bf16 keeps 8 bits of
  # mantissa, so logits of magnitude ~1 move by ~1e-3 and more
  assert np.abs(bf16 - f32).max() > 1e-3
  assert np.abs(bf16 - f32).max() < 0.1
  assert np.mean(bf16.argmax(-1) == f32.argmax(-1)) > 0.9


def test_every_parameter_has_logical_axes():
  for name in ["tiny", "gpt2", "qwen3-0.6b"]:
    config = get_preset(name, n_layers=2)
    for scan in [False, True]:
      cfg = config.replace(scan_layers=scan)
      boxed = jax.eval_shape(lambda key, cfg=cfg: Transformer(cfg).init(key, jnp.zeros((1, 4), jnp.int32)),
                             jax.random.key(0))["params"]
      leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
      assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
      for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim
        assert ("layers" in leaf.names) == (scan and leaf.value.ndim > 1 and leaf.names[0] == "layers")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_parameter_count(name):
  config = PRESETS[name]
  shapes = jax.eval_shape(lambda key: init_params(config, key), jax.random.key(0))
  assert sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)) == config.num_params()


def test_known_parameter_counts():
  # published sizes (the checkpoints' tensor element counts, tied embeddings once): GPT-2 124M, Qwen3-0.6B,
  # Llama 3.1/3.2, Gemma 2 and Gemma 3 1B
  published = {"gpt2": 124_439_808, "qwen3-0.6b": 596_049_920, "llama3.2-1b": 1_235_814_400,
               "llama3.2-3b": 3_212_749_824, "llama3.1-8b": 8_030_261_248, "llama3.1-70b": 70_553_706_496,
               "gemma2-2b": 2_614_341_888, "gemma2-9b": 9_241_705_984, "gemma2-27b": 27_227_128_320,
               "gemma3-1b": 999_885_952}
  assert {name: get_preset(name).num_params() for name in published} == published


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match=r"ModelConfig\.norm='batchnorm'"):
    ModelConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=2, norm="batchnorm")
  with pytest.raises(ValueError, match=r"n_heads=3 is not a multiple of n_kv_heads=2"):
    ModelConfig(vocab_size=8, d_model=12, n_layers=1, n_heads=3, n_kv_heads=2)
  with pytest.raises(ValueError, match=r"unknown model preset 'gpt5'"):
    get_preset("gpt5")
