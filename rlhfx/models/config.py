"""ModelConfig: one frozen dataclass describing every decoder rlhfx runs, plus presets.

GPT-2, Llama 2/3, Qwen2/2.5, Qwen3, Mistral, SmolLM and Gemma 1/2/3 differ only in the
switches below (norm, MLP, positions, biases, q/k norm, tied embeddings, Gemma's norm
offset, embedding scale, post-norms, soft-capping and per-layer sliding windows), so one
Linen module (`transformer.py`) covers them all.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "geglu")
POSITIONS = ("learned", "rope")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTIONS = ("xla", "splash", "cudnn")  # whole-sequence attention paths (rlhfx.models.kernels); config adds "auto"
ROPE_SCALINGS = ("linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and flavour of a decoder-only transformer."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int | None = None  # None: same as n_heads (no grouped-query attention)
  head_dim: int | None = None  # None: d_model // n_heads
  d_ff: int | None = None  # None: 4 * d_model
  max_seq_len: int = 2048
  norm: str = "rmsnorm"
  norm_eps: float = 1e-5
  mlp: str = "swiglu"
  positions: str = "rope"
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None  # {"rope_type": "linear" | "llama3", "factor": ...}
  qkv_bias: bool = False
  out_bias: bool = False  # bias on the attention output projection
  mlp_bias: bool = False
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on queries and keys before RoPE
  sliding_window: int | None = None  # Mistral, Gemma: attend to at most this many previous tokens
  layer_types: tuple[str, ...] | None = None  # per layer: full_attention | sliding_attention (Gemma 2/3); None:
  #                                             every layer slides when sliding_window is set
  rope_local_theta: float | None = None  # Gemma 3: the sliding layers' rope theta (no scaling); None: rope_theta
  norm_offset: float = 0.0  # Gemma: RMSNorm multiplies by (norm_offset + scale), the weights stored around 0
  embed_scale: bool = False  # Gemma: token embeddings x sqrt(d_model)
  post_norms: bool = False  # Gemma 2/3: norm the attention and MLP outputs too, before each residual add
  query_scale: float | None = None  # attention scores x this (Gemma: query_pre_attn_scalar^-1/2); None: head_dim^-1/2
  attn_softcap: float | None = None  # Gemma 2: attention scores -> c tanh(scores / c)
  logit_softcap: float | None = None  # Gemma 2: final logits -> c tanh(logits / c)
  tie_embeddings: bool = False
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype
  remat: str = "none"  # rematerialisation policy per layer: none | full | dots | dots_no_batch
  attention: str = "xla"  # whole-sequence attention: xla | splash (Pallas, TPU) | cudnn (GPU); rlhfx.models.kernels
  scan_layers: bool = False  # one scanned layer (stacked params with a leading "layers" axis)
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  pad_token_id: int | None = None
  arch: str = "llama"  # Hugging Face family used by to_hf: gpt2 | llama | qwen2 | qwen3 | mistral | gemma | gemma2 |
  #                      gemma3_text

  def __post_init__(self):
    # Resolve derived defaults so that equal models compare equal.
    for name, default in (("n_kv_heads", self.n_heads), ("head_dim", self.d_model // self.n_heads),
                          ("d_ff", 4 * self.d_model)):
      if getattr(self, name) is None:
        object.__setattr__(self, name, default)
    if self.layer_types is not None:  # accept a list; store a tuple (hashable)
      object.__setattr__(self, "layer_types", tuple(self.layer_types))
      if len(self.layer_types) != self.n_layers or not set(self.layer_types) <= set(LAYER_TYPES):
        raise ValueError(f"ModelConfig.layer_types: expected {self.n_layers} of {LAYER_TYPES}, got {self.layer_types}")
    if self.rope_scaling is not None:  # accept a dict; store a sorted tuple (hashable, order-free equality)
      object.__setattr__(self, "rope_scaling", tuple(sorted(dict(self.rope_scaling).items())))
    checks = (
        ("norm", self.norm, NORMS),
        ("mlp", self.mlp, MLPS),
        ("positions", self.positions, POSITIONS),
        ("remat", self.remat, REMAT_POLICIES),
        ("attention", self.attention, ATTENTIONS),
        ("param_dtype", self.param_dtype, tuple(DTYPES)),
        ("dtype", self.dtype, tuple(DTYPES)),
    )
    for name, value, allowed in checks:
      if value not in allowed:
        raise ValueError(f"ModelConfig.{name}={value!r}; expected one of {allowed}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"ModelConfig.n_heads={self.n_heads} is not a multiple of n_kv_heads={self.num_kv_heads}")
    if self.rope_scaling is not None and self.rope_scaling_dict.get("rope_type") not in ROPE_SCALINGS:
      raise ValueError(f"ModelConfig.rope_scaling: rope_type must be one of {ROPE_SCALINGS}, got {self.rope_scaling}")

  @property
  def num_kv_heads(self) -> int:
    return self.n_kv_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim

  @property
  def ff_dim(self) -> int:
    return self.d_ff

  def is_sliding(self, layer: int) -> bool:
    """Whether layer `layer` attends within the sliding window."""
    return self.sliding_window is not None and (self.layer_types is None or
                                                self.layer_types[layer] == "sliding_attention")

  @property
  def mixed_attention(self) -> bool:
    """Whether some layers slide and others attend to everything (Gemma 2/3): only then does a layer's kind vary
    at run time (one scanned layer for all)."""
    return len({self.is_sliding(i) for i in range(self.n_layers)}) > 1

  @property
  def rope_scaling_dict(self) -> dict[str, Any]:
    return dict(self.rope_scaling or ())

  @property
  def jnp_dtype(self):
    return DTYPES[self.dtype]

  @property
  def jnp_param_dtype(self):
    return DTYPES[self.param_dtype]

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Parameter count, computed from shapes (no initialisation)."""
    d, f, h, k, dh = self.d_model, self.ff_dim, self.n_heads, self.num_kv_heads, self.dim_per_head
    norm = d * (2 if self.norm == "layernorm" else 1)
    attn = d * dh * (h + 2 * k) + h * dh * d
    attn += dh * (h + 2 * k) * self.qkv_bias + d * self.out_bias + 2 * dh * self.qk_norm
    mlp = (2 if self.mlp == "gelu" else 3) * d * f + (f + d) * self.mlp_bias
    layer = attn + mlp + (4 if self.post_norms else 2) * norm
    total = self.n_layers * layer + self.vocab_size * d + norm
    total += 0 if self.tie_embeddings else d * self.vocab_size
    total += self.max_seq_len * d if self.positions == "learned" else 0
    return total


def _gpt2(d_model, n_layers, n_heads, vocab_size=50257):
  return ModelConfig(
      vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads, max_seq_len=1024,
      norm="layernorm", mlp="gelu", positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
      tie_embeddings=True, bos_token_id=50256, eos_token_id=50256, arch="gpt2")


def _llama3_scaling(factor: float):
  return (("rope_type", "llama3"), ("factor", factor), ("low_freq_factor", 1.0), ("high_freq_factor", 4.0),
          ("original_max_position_embeddings", 8192))


def _llama3(d_model, n_layers, n_heads, d_ff, scaling: float | None, max_seq_len=131072, tie=False, head_dim=None):
  return ModelConfig(vocab_size=128256, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=8,
                     head_dim=head_dim, d_ff=d_ff, max_seq_len=max_seq_len, rope_theta=500000.0,
                     rope_scaling=_llama3_scaling(scaling) if scaling else None, tie_embeddings=tie,
                     bos_token_id=128000, eos_token_id=128001)


def _gemma2(d_model, n_layers, n_heads, n_kv_heads, head_dim, d_ff, query_pre_attn_scalar):
  return ModelConfig(vocab_size=256000, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                     head_dim=head_dim, d_ff=d_ff, max_seq_len=8192, norm_eps=1e-6, mlp="geglu", sliding_window=4096,
                     layer_types=tuple("sliding_attention" if (i + 1) % 2 else "full_attention"
                                       for i in range(n_layers)),
                     norm_offset=1.0, embed_scale=True, post_norms=True, query_scale=query_pre_attn_scalar ** -0.5,
                     attn_softcap=50.0, logit_softcap=30.0, tie_embeddings=True, bos_token_id=2, eos_token_id=1,
                     pad_token_id=0, arch="gemma2")


def _gemma3(vocab_size, d_model, n_layers, n_heads, n_kv_heads, d_ff, window, max_seq_len, rope_factor=None):
  return ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                     n_kv_heads=n_kv_heads, head_dim=256, d_ff=d_ff, max_seq_len=max_seq_len, norm_eps=1e-6,
                     mlp="geglu", rope_theta=1000000.0, rope_local_theta=10000.0,
                     rope_scaling=(("rope_type", "linear"), ("factor", rope_factor)) if rope_factor else None,
                     sliding_window=window, qk_norm=True,
                     layer_types=tuple("sliding_attention" if (i + 1) % 6 else "full_attention"
                                       for i in range(n_layers)),
                     norm_offset=1.0, embed_scale=True, post_norms=True, query_scale=256 ** -0.5,
                     tie_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0, arch="gemma3_text")

PRESETS: dict[str, ModelConfig] = {
    # Built-in toy model for demos and tests; trains in seconds on a CPU.
    "tiny": ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                        max_seq_len=256, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "gpt2": _gpt2(768, 12, 12),
    "gpt2-medium": _gpt2(1024, 24, 16),
    "gpt2-large": _gpt2(1280, 36, 20),
    "stories260k": ModelConfig(vocab_size=512, d_model=64, n_layers=5, n_heads=8, n_kv_heads=4, d_ff=172,
                               max_seq_len=512, tie_embeddings=True, bos_token_id=1, eos_token_id=2),
    "llama2-7b": ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008,
                             max_seq_len=4096, bos_token_id=1, eos_token_id=2),
    "llama3.2-1b": _llama3(2048, 16, 32, 8192, scaling=32.0, tie=True, head_dim=64),
    "llama3.2-3b": _llama3(3072, 28, 24, 8192, scaling=32.0, tie=True, head_dim=128),
    "llama3-8b": _llama3(4096, 32, 32, 14336, scaling=None, max_seq_len=8192),
    "llama3.1-8b": _llama3(4096, 32, 32, 14336, scaling=8.0),
    "llama3-70b": _llama3(8192, 80, 64, 28672, scaling=None, max_seq_len=8192),
    "llama3.1-70b": _llama3(8192, 80, 64, 28672, scaling=8.0),
    # Gemma 2 (the 2B's and 9B's head_dim 256; query_pre_attn_scalar 256, the 27B's d_model / n_heads)
    "gemma2-2b": _gemma2(2304, 26, 8, 4, 256, 9216, 256),
    "gemma2-9b": _gemma2(3584, 42, 16, 8, 256, 14336, 256),
    "gemma2-27b": _gemma2(4608, 46, 32, 16, 128, 36864, 144),
    # Gemma 3 text models: 1B (text only); 4B's language model (its hub checkpoint is multimodal)
    "gemma3-1b": _gemma3(262144, 1152, 26, 4, 1, 6912, window=512, max_seq_len=32768),
    "gemma3-4b": _gemma3(262208, 2560, 34, 8, 4, 10240, window=1024, max_seq_len=131072, rope_factor=8.0),
    "qwen2.5-0.5b": ModelConfig(vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
                                d_ff=4864, max_seq_len=32768, norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True,
                                tie_embeddings=True, eos_token_id=151643, arch="qwen2"),
    "qwen3-0.6b": ModelConfig(vocab_size=151936, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8,
                              head_dim=128, d_ff=3072, max_seq_len=40960, norm_eps=1e-6, rope_theta=1000000.0,
                              qk_norm=True, tie_embeddings=True, eos_token_id=151645, arch="qwen3"),
    "mistral-7b": ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                              d_ff=14336, max_seq_len=32768, rope_theta=1000000.0, bos_token_id=1,
                              eos_token_id=2, arch="mistral"),
    "smollm-135m": ModelConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                               d_ff=1536, max_seq_len=2048, tie_embeddings=True, bos_token_id=0,
                               eos_token_id=0),
    "smollm2-360m": ModelConfig(vocab_size=49152, d_model=960, n_layers=32, n_heads=15, n_kv_heads=5,
                                d_ff=2560, max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True,
                                bos_token_id=1, eos_token_id=2),
}


def get_preset(name: str, **overrides) -> ModelConfig:
  """A preset by name, with dataclass fields overridden (e.g. dtype="bfloat16")."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)
