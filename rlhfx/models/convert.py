"""Checkpoint conversion: Hugging Face directories (both ways) and llama2.c files -> rlhfx params.

  config, params = from_hf("path/or/hub-id")       # config.json + *.safetensors (sharded or not)
  to_hf(config, params, "out_dir")                 # a directory transformers loads
  config, params = from_llama2c("stories260K.bin") # legacy llama2.c checkpoints

Every tensor goes through one table of `_Entry` rows per family, used in both
directions, so import and export cannot drift apart. Shapes are checked against
the shapes the rlhfx model expects, and errors name the file and the tensor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import struct
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhfx.models.config import ModelConfig
from rlhfx.models.transformer import init_params

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")


class CheckpointError(ValueError):
  """A checkpoint that cannot be converted; the message names the file and the tensor."""


# ----------------------------------------------------------------------------- config.json <-> ModelConfig


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


# ----------------------------------------------------------------------------- tensor table


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One HF tensor and the rlhfx parameter(s) it holds."""

  hf: str
  ours: tuple[tuple[str, ...], ...]
  kind: str  # copy | flatten | linear (torch [out, in]) | conv1d (GPT-2 [in, out]) | fused (GPT-2 c_attn)
  n_in: int = 1  # leading input axes of our kernel (2 for the attention output projection)


def _to_hf_tensor(entry: _Entry, ours: list) -> Any:
  """rlhfx arrays -> the HF tensor (works on numpy arrays and on tracers)."""
  if entry.kind == "copy":
    return ours[0]
  if entry.kind == "flatten":
    return ours[0].reshape(-1)
  if entry.kind == "fused":
    return jnp.concatenate([x.reshape(x.shape[0], -1) if x.ndim == 3 else x.reshape(-1) for x in ours], axis=-1)
  flat = ours[0].reshape(math.prod(ours[0].shape[:entry.n_in]), -1)
  return flat.T if entry.kind == "linear" else flat


def _from_hf_tensor(entry: _Entry, tensor: np.ndarray, shapes: list[tuple]) -> list[np.ndarray]:
  """The HF tensor -> rlhfx arrays of the given shapes."""
  if entry.kind == "copy":
    return [tensor]
  if entry.kind == "fused":
    return [part.reshape(shape) for part, shape in zip(np.split(tensor, 3, axis=-1), shapes)]
  return [(tensor.T if entry.kind == "linear" else tensor).reshape(shapes[0])]


def _table(cfg: ModelConfig) -> list[_Entry]:
  E = _Entry
  if cfg.arch == "gpt2":
    rows = [E("wte.weight", (("embed", "embedding"),), "copy"),
            E("wpe.weight", (("pos_embed", "embedding"),), "copy"),
            E("ln_f.weight", (("final_norm", "scale"),), "copy"),
            E("ln_f.bias", (("final_norm", "bias"),), "copy")]
    for i in range(cfg.n_layers):
      h, l = f"h.{i}.", f"layer_{i}"
      qkv = tuple((l, "attn", p, "kernel") for p in ("q_proj", "k_proj", "v_proj"))
      rows += [E(h + "ln_1.weight", ((l, "attn_norm", "scale"),), "copy"),
               E(h + "ln_1.bias", ((l, "attn_norm", "bias"),), "copy"),
               E(h + "attn.c_attn.weight", qkv, "fused"),
               E(h + "attn.c_attn.bias", tuple(p[:-1] + ("bias",) for p in qkv), "fused"),
               E(h + "attn.c_proj.weight", ((l, "attn", "o_proj", "kernel"),), "conv1d", 2),
               E(h + "attn.c_proj.bias", ((l, "attn", "o_proj", "bias"),), "copy"),
               E(h + "ln_2.weight", ((l, "mlp_norm", "scale"),), "copy"),
               E(h + "ln_2.bias", ((l, "mlp_norm", "bias"),), "copy"),
               E(h + "mlp.c_fc.weight", ((l, "mlp", "up_proj", "kernel"),), "conv1d"),
               E(h + "mlp.c_fc.bias", ((l, "mlp", "up_proj", "bias"),), "copy"),
               E(h + "mlp.c_proj.weight", ((l, "mlp", "down_proj", "kernel"),), "conv1d"),
               E(h + "mlp.c_proj.bias", ((l, "mlp", "down_proj", "bias"),), "copy")]
    return rows
  rows = [E("model.embed_tokens.weight", (("embed", "embedding"),), "copy"),
          E("model.norm.weight", (("final_norm", "scale"),), "copy")]
  if not cfg.tie_embeddings:
    rows.append(E("lm_head.weight", (("lm_head", "kernel"),), "linear"))
  for i in range(cfg.n_layers):
    h, l = f"model.layers.{i}.", f"layer_{i}"
    rows += [E(h + "input_layernorm.weight", ((l, "attn_norm", "scale"),), "copy"),
             E(h + "post_attention_layernorm.weight", ((l, "mlp_norm", "scale"),), "copy")]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
      n_in = 2 if proj == "o_proj" else 1
      rows.append(E(h + f"self_attn.{proj}.weight", ((l, "attn", proj, "kernel"),), "linear", n_in))
      if cfg.out_bias if proj == "o_proj" else cfg.qkv_bias:
        rows.append(E(h + f"self_attn.{proj}.bias", ((l, "attn", proj, "bias"),), "flatten"))
    if cfg.qk_norm:
      rows += [E(h + "self_attn.q_norm.weight", ((l, "attn", "q_norm", "scale"),), "copy"),
               E(h + "self_attn.k_norm.weight", ((l, "attn", "k_norm", "scale"),), "copy")]
    for proj in ("gate_proj", "up_proj", "down_proj"):
      rows.append(E(h + f"mlp.{proj}.weight", ((l, "mlp", proj, "kernel"),), "linear"))
      if cfg.mlp_bias:
        rows.append(E(h + f"mlp.{proj}.bias", ((l, "mlp", proj, "bias"),), "copy"))
  return rows


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _per_layer_shapes(config: ModelConfig):
  """Shapes of unstacked params (layer_i keys) as a pytree of ShapeDtypeStruct."""
  return jax.eval_shape(lambda key: init_params(config.replace(scan_layers=False), key), jax.random.key(0))


def stack_layers(params: dict, n_layers: int) -> dict:
  """layer_0..layer_{L-1} -> one "layers" tree with a leading axis (for scan_layers=True)."""
  out = {k: v for k, v in params.items() if not k.startswith("layer_")}
  out["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *[params[f"layer_{i}"] for i in range(n_layers)])
  return out


def unstack_layers(params: dict, n_layers: int) -> dict:
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(n_layers):
    out[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
  return out


def expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> shape, derived from the rlhfx model's own shapes."""
  shapes = _per_layer_shapes(config)
  out = {}
  for entry in _table(config):
    structs = [_get(shapes, p) for p in entry.ours]
    out[entry.hf] = jax.eval_shape(lambda *xs, e=entry: _to_hf_tensor(e, list(xs)), *structs).shape
  return out


# ----------------------------------------------------------------------------- Hugging Face directories


def _resolve(path_or_hub_id: str | os.PathLike) -> Path:
  path = Path(path_or_hub_id)
  if path.is_dir():
    return path
  if path.exists():
    raise CheckpointError(f"{path}: expected a directory holding config.json and *.safetensors")
  from huggingface_hub import snapshot_download  # a hub id: needs a network or a warm cache

  try:
    return Path(snapshot_download(str(path_or_hub_id), allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                       "*.txt"]))
  except Exception as e:  # noqa: BLE001 (offline, unknown repo, ...: one clear message)
    raise CheckpointError(f"{path_or_hub_id}: not a local directory and the hub download failed: {e}") from e


def _safetensor_files(directory: Path) -> dict[str, Path]:
  """HF tensor name -> the .safetensors file holding it (single file or index.json)."""
  from safetensors import safe_open

  index = directory / "model.safetensors.index.json"
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    return {name: directory / file for name, file in weight_map.items()}
  files = sorted(directory.glob("*.safetensors"))
  if not files:
    raise CheckpointError(f"{directory}: no *.safetensors files (and no model.safetensors.index.json)")
  located = {}
  for file in files:
    with safe_open(str(file), framework="np") as f:
      located.update({name: file for name in f.keys()})
  return located


def _strip_prefix(names: dict[str, Path], cfg: ModelConfig) -> dict[str, tuple[str, Path]]:
  """Map canonical names to stored ones: GPT-2 files may say `transformer.h.0...` or `h.0...`."""
  out = {}
  for stored, file in names.items():
    canonical = stored.removeprefix("transformer.") if cfg.arch == "gpt2" else stored
    out[canonical] = (stored, file)
  return out


_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def hf_model_config(path_or_hub_id: str | os.PathLike, *, param_dtype: str | None = None,
                    **config_overrides) -> ModelConfig:
  """The ModelConfig of a Hugging Face directory or hub id, from its config.json alone (no tensors read)."""
  config_file = _resolve(path_or_hub_id) / "config.json"
  if not config_file.exists():
    raise CheckpointError(f"{config_file}: missing; a Hugging Face model directory needs config.json")
  config = config_from_hf(json.loads(config_file.read_text()), str(config_file))
  return config.replace(param_dtype=param_dtype or "float32", **config_overrides)


def from_hf(path_or_hub_id: str | os.PathLike, *, param_dtype: str | None = None, **config_overrides):
  """(ModelConfig, params) from a Hugging Face directory or hub id.

  `param_dtype` sets the parameter dtype (default: float32); other keyword arguments
  override ModelConfig fields (e.g. dtype="bfloat16" compute, scan_layers=True, remat="full").
  """
  from safetensors import safe_open

  directory = _resolve(path_or_hub_id)
  config = hf_model_config(directory, param_dtype=param_dtype, **config_overrides)
  located = _strip_prefix(_safetensor_files(directory), config)
  table = _table(config)
  wanted = {e.hf for e in table}
  if config.tie_embeddings:
    wanted.add("lm_head.weight")  # some tied checkpoints store a copy
  unused = [name for name in located if name not in wanted and not name.endswith(_IGNORED_SUFFIXES)]
  if unused:
    logging.warning("%s: %d tensors not used by rlhfx (e.g. %s)", directory, len(unused), unused[:3])

  expected = expected_hf_shapes(config)
  tensors: dict[str, np.ndarray] = {}
  handles: dict[Path, Any] = {}
  for entry in table:
    if entry.hf not in located:
      raise CheckpointError(f"{directory}: tensor {entry.hf!r} is missing from the safetensors files "
                            f"(needed for {config.arch})")
    stored, file = located[entry.hf]
    if file not in handles:
      if not file.exists():
        raise CheckpointError(f"{file}: listed in the index for {stored!r} but not found")
      handles[file] = safe_open(str(file), framework="np")
    tensor = handles[file].get_tensor(stored)
    if tuple(tensor.shape) != tuple(expected[entry.hf]):
      raise CheckpointError(f"{file}: tensor {stored!r} has shape {tuple(tensor.shape)}, "
                            f"expected {tuple(expected[entry.hf])} for this config.json")
    tensors[entry.hf] = tensor
  return config, _params_from_hf_tensors(config, tensors)


def to_hf(config: ModelConfig, params, out_dir: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30) -> Path:
  """Write config.json + safetensors (sharded past `max_shard_bytes`, with an index) to `out_dir`."""
  from safetensors.numpy import save_file

  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  hf_config = config_to_hf(config)
  params = jax.tree.map(np.asarray, params)
  if "layers" in params:
    params = unstack_layers(params, config.n_layers)
  tensors = {}
  for entry in _table(config):
    tensors[entry.hf] = np.ascontiguousarray(np.asarray(_to_hf_tensor(entry, [_get(params, p) for p in entry.ours])))
  shards, current, size = [], {}, 0
  for name, tensor in tensors.items():
    if current and size + tensor.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = tensor
    size += tensor.nbytes
  shards.append(current)
  if len(shards) == 1:
    save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, str(out / name), metadata={"format": "pt"})
      weight_map.update({k: name for k in shard})
    total = sum(t.nbytes for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
  (out / "config.json").write_text(json.dumps(hf_config, indent=2))
  return out


# ----------------------------------------------------------------------------- llama2.c


def _permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Interleaved-pair RoPE rows (llama2.c / Meta) -> rotate-half order (as HF's conversion script)."""
  out_dim, in_dim = w.shape
  return w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


def from_llama2c(path: str | os.PathLike, **config_overrides):
  """(ModelConfig, params) from a llama2.c legacy checkpoint (e.g. stories260K.bin).

  Layout: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
  a negative vocab_size means an unshared classifier), then float32 arrays.
  """
  path = Path(path)
  data = path.read_bytes()
  if len(data) < 28:
    raise CheckpointError(f"{path}: {len(data)} bytes is too short for a llama2.c header (28 bytes)")
  dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("7i", data[:28])
  shared = vocab > 0
  vocab = abs(vocab)
  if min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) <= 0 or dim % n_heads:
    raise CheckpointError(f"{path}: header {(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len)} is not valid")
  head = dim // n_heads
  layout = [("tok_embeddings", (vocab, dim)), ("rms_att", (n_layers, dim)),
            ("wq", (n_layers, n_heads * head, dim)), ("wk", (n_layers, n_kv * head, dim)),
            ("wv", (n_layers, n_kv * head, dim)), ("wo", (n_layers, dim, n_heads * head)),
            ("rms_ffn", (n_layers, dim)), ("w1", (n_layers, hidden, dim)), ("w2", (n_layers, dim, hidden)),
            ("w3", (n_layers, hidden, dim)), ("rms_final", (dim,)),
            ("freq_cis_real", (seq_len, head // 2)), ("freq_cis_imag", (seq_len, head // 2))]
  if not shared:
    layout.append(("classifier", (vocab, dim)))
  arrays, offset = {}, 28
  for name, shape in layout:
    nbytes = 4 * math.prod(shape)
    if offset + nbytes > len(data):
      raise CheckpointError(f"{path}: truncated at tensor {name!r} (needs bytes {offset}..{offset + nbytes}, "
                            f"file has {len(data)})")
    arrays[name] = np.frombuffer(data, np.float32, math.prod(shape), offset).reshape(shape)
    offset += nbytes
  if offset != len(data):
    raise CheckpointError(f"{path}: {len(data) - offset} unexpected trailing bytes after the last tensor")

  config = ModelConfig(vocab_size=vocab, d_model=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                       d_ff=hidden, max_seq_len=seq_len, tie_embeddings=shared, bos_token_id=1, eos_token_id=2,
                       arch="llama")
  config = config.replace(**config_overrides)
  hf = {"model.embed_tokens.weight": arrays["tok_embeddings"], "model.norm.weight": arrays["rms_final"]}
  if not shared:
    hf["lm_head.weight"] = arrays["classifier"]
  for i in range(n_layers):
    h = f"model.layers.{i}."
    hf.update({h + "input_layernorm.weight": arrays["rms_att"][i],
               h + "post_attention_layernorm.weight": arrays["rms_ffn"][i],
               h + "self_attn.q_proj.weight": _permute_rope_rows(arrays["wq"][i], n_heads),
               h + "self_attn.k_proj.weight": _permute_rope_rows(arrays["wk"][i], n_kv),
               h + "self_attn.v_proj.weight": arrays["wv"][i], h + "self_attn.o_proj.weight": arrays["wo"][i],
               h + "mlp.gate_proj.weight": arrays["w1"][i], h + "mlp.down_proj.weight": arrays["w2"][i],
               h + "mlp.up_proj.weight": arrays["w3"][i]})
  return config, _params_from_hf_tensors(config, hf)


def _params_from_hf_tensors(config: ModelConfig, tensors: dict[str, np.ndarray]):
  shapes = _per_layer_shapes(config)
  np_dtype = np.dtype(config.jnp_param_dtype)
  params: dict = {}
  for entry in _table(config):
    parts = _from_hf_tensor(entry, tensors[entry.hf], [_get(shapes, p).shape for p in entry.ours])
    for p, value in zip(entry.ours, parts):
      _set(params, p, np.ascontiguousarray(value.astype(np_dtype)))
  return stack_layers(params, config.n_layers) if config.scan_layers else params
