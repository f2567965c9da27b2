"""Hugging Face config.json <-> ModelConfig, for the families rlhfx converts."""

from __future__ import annotations

from rlhfx.models.config import ModelConfig

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
GEMMAS = ("gemma", "gemma2", "gemma3_text")


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
  if family in GEMMAS:
    return _gemma_config(hf, family, source, common)
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


def _gemma_config(hf: dict, family: str, source: str, common: dict) -> ModelConfig:
  """Gemma 1/2/3 (text): (1 + w) RMSNorms, embeddings x sqrt(d), GeGLU; 2 and 3 add post-norms and
  sliding/full layers; 2 soft-caps scores and logits; 3 norms q and k and gives sliding layers their own theta."""
  act = hf.get("hidden_activation") or hf.get("hidden_act", "gelu_pytorch_tanh")
  if act not in ("gelu_pytorch_tanh", "gelu"):  # Gemma's released configs say "gelu" and mean the tanh form
    raise CheckpointError(f"{source}: hidden_activation={act!r} is not supported (expected gelu_pytorch_tanh)")
  if hf.get("use_bidirectional_attention"):
    raise CheckpointError(f"{source}: use_bidirectional_attention (an embedding model) is not a causal LM")
  rope = dict(hf.get("rope_parameters") or {})
  local_theta = None
  if family == "gemma3_text":
    if "full_attention" in rope:  # transformers 5: rope parameters per layer type
      local_theta = float(rope.get("sliding_attention", {}).get("rope_theta", 10000.0))
      rope = rope["full_attention"]
      theta, scaling = _rope({"rope_parameters": rope})
    else:
      local_theta = float(hf.get("rope_local_base_freq", 10000.0))
      theta, scaling = _rope({"rope_theta": 1000000.0, **hf})
  else:
    theta, scaling = _rope(hf)
  n_layers, gemma1 = hf["num_hidden_layers"], family == "gemma"
  layer_types, window = None, None
  if not gemma1:
    pattern = 2 if family == "gemma2" else hf.get("sliding_window_pattern", 6)
    layer_types = tuple(hf.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                                  for i in range(n_layers)])
    window = hf.get("sliding_window") if "sliding_attention" in layer_types else None
    layer_types = layer_types if window else None
  return ModelConfig(
      d_model=hf["hidden_size"], n_layers=n_layers, n_heads=hf["num_attention_heads"],
      n_kv_heads=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim", 256), d_ff=hf["intermediate_size"],
      max_seq_len=hf.get("max_position_embeddings", 8192), norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="geglu",
      rope_theta=theta, rope_scaling=scaling, qkv_bias=bool(hf.get("attention_bias", False)),
      out_bias=bool(hf.get("attention_bias", False)), qk_norm=family == "gemma3_text", sliding_window=window,
      layer_types=layer_types, rope_local_theta=local_theta, norm_offset=1.0, embed_scale=True,
      post_norms=not gemma1, query_scale=None if gemma1 else hf.get("query_pre_attn_scalar", 256) ** -0.5,
      attn_softcap=hf.get("attn_logit_softcapping"), logit_softcap=hf.get("final_logit_softcapping"),
      tie_embeddings=bool(hf.get("tie_word_embeddings", True)), **common)


def _gemma_to_hf(cfg: ModelConfig, tokens: dict) -> dict:
  """config.json of a Gemma model (the inverse of _gemma_config)."""
  arch_class = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
  gemma1 = cfg.arch == "gemma"
  if not (cfg.norm == "rmsnorm" and cfg.mlp == "geglu" and cfg.norm_offset == 1.0 and cfg.embed_scale
          and cfg.post_norms != gemma1 and cfg.qk_norm == (cfg.arch == "gemma3_text")):
    raise CheckpointError(f"ModelConfig.arch={cfg.arch!r}: this configuration is not a {arch_class[cfg.arch]}")
  out = dict(architectures=[arch_class[cfg.arch]], model_type=cfg.arch, hidden_size=cfg.d_model,
             num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.num_kv_heads,
             head_dim=cfg.dim_per_head, intermediate_size=cfg.ff_dim, max_position_embeddings=cfg.max_seq_len,
             rms_norm_eps=cfg.norm_eps, attention_bias=cfg.qkv_bias, **tokens)
  out["hidden_act" if gemma1 else "hidden_activation"] = "gelu_pytorch_tanh"
  full = {"rope_type": "default", **cfg.rope_scaling_dict, "rope_theta": cfg.rope_theta}
  if cfg.arch == "gemma3_text":
    out["rope_parameters"] = {"full_attention": full,
                              "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta}}
  else:
    out["rope_parameters"] = full
  if not gemma1:
    out.update(query_pre_attn_scalar=round(cfg.query_scale ** -2) if cfg.query_scale else cfg.dim_per_head,
               attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.logit_softcap,
               sliding_window=cfg.sliding_window,
               layer_types=list(cfg.layer_types or ["full_attention"] * cfg.n_layers))
  return out


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
  if cfg.arch in GEMMAS:
    return _gemma_to_hf(cfg, tokens)
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
