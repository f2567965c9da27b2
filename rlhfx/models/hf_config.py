"""Hugging Face config.json <-> ModelConfig, for the families rlhfx converts."""

from __future__ import annotations

from rlhfx.models.config import ModelConfig

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")


class CheckpointError(ValueError):
  """A checkpoint that cannot be converted; the message names the file and the tensor."""


def _rope(hf: dict) -> tuple[float, tuple | None]:
  """(rope_theta, rope_scaling) from a transformers-5 `rope_parameters` or legacy `rope_theta/rope_scaling`."""
  params = dict(hf.get("rope_parameters") or {})
  theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
  scaling = {k: v for k, v in params.items() if k != "partial_rotary_factor"} or dict(hf.get("rope_scaling") or {})
  if "type" in scaling:
    scaling["rope_type"] = scaling.pop("type")
  if scaling.get("rope_type", "default") == "default":
    return float(theta), None
  return float(theta), tuple(sorted(scaling.items()))


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
  """ModelConfig from a Hugging Face config dict."""
  family = hf.get("model_type")
  if family not in FAMILIES:
    raise CheckpointError(f"{source}: unsupported architecture model_type={family!r}; rlhfx converts {FAMILIES}")
  common = dict(vocab_size=hf["vocab_size"], bos_token_id=hf.get("bos_token_id"),
                eos_token_id=_first(hf.get("eos_token_id")), pad_token_id=hf.get("pad_token_id"), arch=family)
  if family == "gpt2":
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
      raise CheckpointError(f"{source}: activation_function={hf['activation_function']!r} is not supported")
    return ModelConfig(d_model=hf["n_embd"], n_layers=hf["n_layer"], n_heads=hf["n_head"], d_ff=hf.get("n_inner"),
                       max_seq_len=hf["n_positions"], norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                       mlp="gelu", positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
                       tie_embeddings=hf.get("tie_word_embeddings", True), **common)
  if hf.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (expected silu)")
  theta, scaling = _rope(hf)
  attention_bias = bool(hf.get("attention_bias", False))
  sliding = hf.get("sliding_window") if (family == "mistral" or hf.get("use_sliding_window")) else None
  return ModelConfig(
      d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
      n_kv_heads=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"), d_ff=hf["intermediate_size"],
      max_seq_len=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
      rope_theta=theta, rope_scaling=scaling, qkv_bias=attention_bias or family == "qwen2",
      out_bias=attention_bias, mlp_bias=bool(hf.get("mlp_bias", False)), qk_norm=family == "qwen3",
      sliding_window=sliding, tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **common)


def _first(token_id):
  return token_id[0] if isinstance(token_id, list) else token_id


def config_to_hf(config: ModelConfig) -> dict:
  """A config.json dict that `transformers.AutoConfig` reads back as the same model."""
  cfg = config
  tokens = dict(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
                vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, dtype=cfg.param_dtype)
  if cfg.arch == "gpt2":
    if not (cfg.norm == "layernorm" and cfg.mlp == "gelu" and cfg.positions == "learned"):
      raise CheckpointError("ModelConfig.arch='gpt2' needs norm=layernorm, mlp=gelu, positions=learned")
    return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_embd=cfg.d_model, n_layer=cfg.n_layers,
                n_head=cfg.n_heads, n_inner=cfg.ff_dim, n_positions=cfg.max_seq_len,
                layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, **tokens)
  if cfg.arch not in FAMILIES or cfg.norm != "rmsnorm" or cfg.mlp != "swiglu" or cfg.positions != "rope":
    raise CheckpointError(f"ModelConfig.arch={cfg.arch!r}: cannot export this configuration to Hugging Face")
  arch_class = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}[cfg.arch]
  out = dict(architectures=[arch_class], model_type=cfg.arch, hidden_size=cfg.d_model,
             num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.num_kv_heads,
             head_dim=cfg.dim_per_head, intermediate_size=cfg.ff_dim, max_position_embeddings=cfg.max_seq_len,
             rms_norm_eps=cfg.norm_eps, hidden_act="silu", mlp_bias=cfg.mlp_bias,
             rope_parameters={"rope_type": "default", **cfg.rope_scaling_dict, "rope_theta": cfg.rope_theta},
             **tokens)
  if cfg.arch == "qwen2":
    if cfg.out_bias or not cfg.qkv_bias:
      raise CheckpointError("ModelConfig.arch='qwen2' needs qkv_bias=True and out_bias=False")
  elif cfg.qkv_bias != cfg.out_bias:
    raise CheckpointError(f"ModelConfig.arch={cfg.arch!r} needs qkv_bias == out_bias (HF attention_bias)")
  else:
    out["attention_bias"] = cfg.qkv_bias
  if cfg.qk_norm != (cfg.arch == "qwen3"):
    raise CheckpointError(f"ModelConfig.qk_norm={cfg.qk_norm} does not match arch={cfg.arch!r}")
  if cfg.sliding_window is not None:
    if cfg.arch not in ("mistral", "qwen2"):
      raise CheckpointError(f"ModelConfig.sliding_window is not supported by arch={cfg.arch!r}")
    out.update(sliding_window=cfg.sliding_window, use_sliding_window=True, max_window_layers=0)
  elif cfg.arch == "mistral":
    out["sliding_window"] = None
  return out
