"""Matmul FLOPs of a step from the model's shape, and each device's peak: MFU in the metrics and the planner's
figures both come from here.

The counts are per token of forward + backward (Kaplan et al. 2020, sec. 2.1; PaLM appendix B);
each algorithm's `init` says which count its step is (`train_state.Initial.flops_per_token`).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from rlhfx import topology


# Dense bf16 matmul peak per GPU (FLOP/s); TPU chips' are in rlhfx.topology.CHIPS, CPUs are measured.
GPU_PEAK_FLOPS = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


def peak_flops_per_device() -> float:
  """Known peak for TPU/GPU kinds; on CPU, a measured f32 matmul rate (all local CPU devices share the cores)."""
  kind = jax.devices()[0].device_kind
  for chip in topology.CHIPS.values():
    if kind == chip.device_kind:
      return chip.peak_flops
  for name, peak in GPU_PEAK_FLOPS.items():
    if kind.startswith(name):
      return peak
  n = 1024
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(5):
    f(a).block_until_ready()
  rate = 5 * 2 * n**3 / (time.perf_counter() - t0)
  return rate / max(1, jax.local_device_count())


def train_flops_per_token(config, seq_len: int, *, lm_head: bool = True) -> float:
  """Matmul FLOPs of forward + backward per token: 6 x (layer params + LM head) + attention scores
  (Kaplan et al. 2020, sec. 2.1; PaLM appendix B). Embedding lookups cost no matmul."""
  cfg = config
  embeddings = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
  embeddings += cfg.max_seq_len * cfg.d_model if cfg.positions == "learned" else 0
  norm = cfg.d_model * (2 if cfg.norm == "layernorm" else 1)
  layers = cfg.num_params() - embeddings - norm
  matmul = layers + (cfg.vocab_size * cfg.d_model if lm_head else 0)
  return 6 * matmul + 12 * cfg.n_layers * cfg.n_heads * cfg.dim_per_head * seq_len


def sequence_train_flops(config, seq_len: int, *, kept: int | None = None, lm_head: bool = True) -> float:
  """Forward + backward matmul FLOPs of one sequence when only `kept` of its positions (default all) go
  through the last layer's queries, attention output and MLP and through the LM head; keys and values
  cover every position (a reward model keeps 1, DPO with a completion window W + 1)."""
  kept = seq_len if kept is None else min(kept, seq_len)
  per_token = train_flops_per_token(config, seq_len, lm_head=False)
  last_layer_unkept = per_token / config.n_layers - 6 * 2 * config.d_model * config.num_kv_heads * config.dim_per_head
  body = per_token * seq_len - last_layer_unkept * (seq_len - kept)
  return body + (6 * config.vocab_size * config.d_model * kept if lm_head else 0)


def iteration_flops(model_config, prompt_len: int, completion_len: int, epochs: int, critic: bool) -> float:
  """Matmul FLOPs per sequence token of one on-policy iteration: sampling, old/ref (+ value) forwards and `epochs`
  passes of forward + backward (+ the critic's); the LM head runs only at completion positions."""
  seq_len = prompt_len + completion_len
  body = train_flops_per_token(model_config, seq_len, lm_head=False)  # forward + backward, per token
  head = 6 * model_config.vocab_size * model_config.d_model
  per_sequence = seq_len * body * ((3 + critic) / 3 + epochs * (1 + critic)) + completion_len * head * (1 + epochs)
  return per_sequence / seq_len
