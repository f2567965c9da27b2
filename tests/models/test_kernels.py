"""The fused attention kernels equal the XLA path: splash (Pallas, in interpret mode on this CPU) and the cuDNN
call's mask semantics (through XLA here), forward and gradients, on the cases that matter: causal, grouped
query heads 4:1, left and right padding, a fully masked row, two examples packed in one row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhfx.models import Transformer, get_preset, init_params, kernels
from rlhfx.models.layers import attention

B, T, N, K, H = 4, 128, 8, 2, 32  # 4 query heads per key/value head


def _segments() -> np.ndarray:
  segments = np.ones((B, T), np.int32)
  segments[1, :37] = 0  # left padding
  segments[2, :] = 0  # a fully masked row
  segments[3, :50], segments[3, 50:100], segments[3, 100:] = 1, 2, 0  # two packed examples, then padding
  return segments


def _xla(q, k, v, segments, scale):
  """layers.attention with the dense mask the transformer builds: causal, same segment, key not padding."""
  allowed = np.tril(np.ones((T, T), bool))[None] & (segments[:, :, None] == segments[:, None, :]) & (
      segments[:, None, :] > 0)
  return attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), jnp.asarray(allowed), scale)


def _inputs(dtype):
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(B, T, N, H)), dtype)
  k, v = (jnp.asarray(rng.normal(size=(B, T, K, H)), dtype) for _ in range(2))
  weights = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)  # a loss that reads every output
  return q, k, v, weights


@pytest.mark.parametrize("kind", ["splash", "cudnn_call"])
@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_kernel_equals_the_xla_path_forward_and_gradients(kind, dtype, atol):
  q, k, v, weights = _inputs(dtype)
  segments = jnp.asarray(_segments())
  real = np.asarray(segments > 0)[:, :, None, None]  # padding rows' outputs are never read
  scale = H ** -0.5
  if kind == "splash":
    fused = lambda q, k, v: kernels.attention("splash", q, k, v, segments, scale)
  else:  # the cuDNN path's call, through XLA on this CPU
    fused = lambda q, k, v: kernels.segment_attention(q, k, v, segments, scale, implementation="xla")
  reference = lambda q, k, v: _xla(q, k, v, _segments(), scale)

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.where(real, fn(q, k, v).astype(jnp.float32) * weights, 0.0))

  np.testing.assert_allclose(np.where(real, jax.jit(fused)(q, k, v).astype(np.float32), 0),
                             np.where(real, reference(q, k, v).astype(np.float32), 0), atol=atol, rtol=atol)
  got = jax.jit(jax.grad(loss(fused), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
  for name, a, b in zip("qkv", got, want):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.abs(b).max() > 0.1, name  # gradients that are there
    np.testing.assert_allclose(a, b, atol=atol * 5, rtol=atol * 5, err_msg=f"d loss / d {name}")


def test_a_model_with_splash_attention_gives_the_xla_logits_and_packing_keeps_examples_apart():
  config = get_preset("tiny").replace(max_seq_len=T)
  params = init_params(config, jax.random.key(0))
  rng = np.random.default_rng(1)
  a, b = rng.integers(3, config.vocab_size, size=60), rng.integers(3, config.vocab_size, size=50)
  tokens = np.zeros((2, T), np.int32)
  tokens[0, :60], tokens[1, :60], tokens[1, 60:110] = a, a, b
  mask = tokens > 0
  segments = np.where(mask, 1, 0).astype(np.int32)
  segments[1, 60:110] = 2
  positions = np.zeros((2, T), np.int32)
  positions[0, :60], positions[1, :60], positions[1, 60:110] = np.arange(60), np.arange(60), np.arange(50)
  logits = {}
  for kind in ("xla", "splash"):
    model = Transformer(config.replace(attention=kind))
    logits[kind] = np.asarray(jax.jit(lambda p, t, m, s, x: model.apply({"params": p}, t, m, x, segments_BxT=s))(
        params, tokens, mask, segments, positions))
  np.testing.assert_allclose(logits["splash"][mask], logits["xla"][mask], atol=2e-5, rtol=2e-5)
  alone = np.asarray(Transformer(config).apply({"params": params}, b[None]))[0]  # b as a row of its own
  np.testing.assert_allclose(logits["splash"][1, 60:110], alone, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(logits["splash"][1, :60], logits["splash"][0, :60], atol=2e-5, rtol=2e-5)


def test_splash_under_a_2x2x2_mesh_runs_per_shard_and_gives_the_xla_logits():
  """shard_map over rows (data x fsdp) and key/value heads (tensor) on 8 fake devices, in its own process."""
  import subprocess
  import sys
  import textwrap

  script = textwrap.dedent("""
      import jax
      jax.config.update("jax_num_cpu_devices", 8)
      import numpy as np
      from rlhfx import sharding
      from rlhfx.models import Transformer, get_preset, init_params
      cfg = get_preset("tiny").replace(max_seq_len=128, n_heads=4, n_kv_heads=2)
      params = init_params(cfg, jax.random.key(0))
      tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (8, 128)).astype(np.int32)
      mask = np.ones((8, 128), bool)
      mask[1, 100:] = False
      mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
      out = {}
      for kind in ("xla", "splash"):
        model = Transformer(cfg.replace(attention=kind))
        with sharding.active(mesh, sharding.DEFAULT_RULES):
          batch = sharding.global_batch({"t": tokens, "m": mask}, mesh)
          out[kind] = np.asarray(jax.jit(lambda p, t, m: model.apply({"params": p}, t, m))(params, batch["t"],
                                                                                           batch["m"]))
      print("max diff", float(np.abs(out["xla"] - out["splash"])[mask].max()))
  """)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert float(proc.stdout.split("max diff")[1]) < 2e-5
