"""Checkpoint conversion: Hugging Face directories, both ways (llama2.c files: rlhfx.models.llama2c).

  config, params = from_hf("path/or/hub-id")       # config.json + *.safetensors (sharded or not)
  to_hf(config, params, "out_dir")                 # a directory transformers loads

Every tensor goes through one table of `Entry` rows per family, used in both
directions, so import and export cannot drift apart. Shapes are checked against
the shapes the rlhfx model expects, and errors name the file and the tensor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhfx import hub, storage
from rlhfx.models.config import ModelConfig
from rlhfx.models.hf_config import FAMILIES, CheckpointError, config_from_hf, config_to_hf  # noqa: F401
from rlhfx.models.transformer import init_params

# ----------------------------------------------------------------------------- tensor table


@dataclasses.dataclass(frozen=True)
class Entry:
  """One HF tensor and the rlhfx parameter(s) it holds."""

  hf: str
  ours: tuple[tuple[str, ...], ...]
  kind: str  # copy | flatten | linear (torch [out, in]) | conv1d (GPT-2 [in, out]) | fused (GPT-2 c_attn)
  n_in: int = 1  # leading input axes of our kernel (2 for the attention output projection)


def _to_hf_tensor(entry: Entry, ours: list) -> Any:
  """rlhfx arrays -> the HF tensor (works on numpy arrays and on tracers)."""
  if entry.kind == "copy":
    return ours[0]
  if entry.kind == "flatten":
    return ours[0].reshape(-1)
  if entry.kind == "fused":
    return jnp.concatenate([x.reshape(x.shape[0], -1) if x.ndim == 3 else x.reshape(-1) for x in ours], axis=-1)
  flat = ours[0].reshape(math.prod(ours[0].shape[:entry.n_in]), -1)
  return flat.T if entry.kind == "linear" else flat


def _from_hf_tensor(entry: Entry, tensor: np.ndarray, shapes: list[tuple]) -> list[np.ndarray]:
  """The HF tensor -> rlhfx arrays of the given shapes."""
  if entry.kind == "copy":
    return [tensor]
  if entry.kind == "fused":
    return [part.reshape(shape) for part, shape in zip(np.split(tensor, 3, axis=-1), shapes)]
  return [(tensor.T if entry.kind == "linear" else tensor).reshape(shapes[0])]


def tensor_table(cfg: ModelConfig) -> list[Entry]:
  """The HF tensors of a causal LM of `cfg` and the rlhfx parameters each holds."""
  E = Entry
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
    rows.append(E(h + "input_layernorm.weight", ((l, "attn_norm", "scale"),), "copy"))
    if cfg.post_norms:  # Gemma 2/3: HF's post_attention_layernorm is the attention output's norm
      rows += [E(h + "post_attention_layernorm.weight", ((l, "attn_post_norm", "scale"),), "copy"),
               E(h + "pre_feedforward_layernorm.weight", ((l, "mlp_norm", "scale"),), "copy"),
               E(h + "post_feedforward_layernorm.weight", ((l, "mlp_post_norm", "scale"),), "copy")]
    else:
      rows.append(E(h + "post_attention_layernorm.weight", ((l, "mlp_norm", "scale"),), "copy"))
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
  for entry in tensor_table(config):
    structs = [_get(shapes, p) for p in entry.ours]
    out[entry.hf] = jax.eval_shape(lambda *xs, e=entry: _to_hf_tensor(e, list(xs)), *structs).shape
  return out


# ----------------------------------------------------------------------------- Hugging Face directories


def resolve(path_or_hub_id: str | os.PathLike, *, weights: bool = True) -> Path:
  """A Hugging Face model directory, or a hub id's snapshot in the Hugging Face cache (`rlhfx.hub`): its config,
  tokenizer and (with `weights`) safetensors, downloaded when missing; a gs:// folder: its local copy."""
  path = storage.local(path_or_hub_id)
  if path.is_dir():
    return path
  if path.exists():
    raise CheckpointError(f"{path}: expected a directory holding config.json and *.safetensors")
  if not hub.is_repo_id(path_or_hub_id):
    raise CheckpointError(f"{path}: no such directory (and not a hub id, which is 'org/name')")
  if not weights:
    return hub.local_repo(str(path_or_hub_id), hub.TOKENIZER_FILES, required=("config.json",))
  return hub.local_repo(str(path_or_hub_id), hub.CHECKPOINT_FILES, required=("config.json", "*.safetensors"))


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
    try:
      with safe_open(str(file), framework="np") as f:
        located.update({name: file for name in f.keys()})
    except Exception as e:  # noqa: BLE001 (safetensors raises its own kinds for a damaged header)
      raise CheckpointError(f"{file}: not a readable safetensors file ({type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:120]}); the model directory is damaged") from None
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
  config_file = resolve(path_or_hub_id, weights=False) / "config.json"
  if not config_file.exists():
    raise CheckpointError(f"{config_file}: missing; a Hugging Face model directory needs config.json")
  try:
    raw = json.loads(config_file.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{config_file}: not valid JSON ({e}); the model directory is damaged") from None
  if not isinstance(raw, dict):
    raise CheckpointError(f"{config_file}: not a JSON object; the model directory is damaged")
  config = config_from_hf(raw, str(config_file))
  return config.replace(param_dtype=param_dtype or "float32", **config_overrides)


def from_hf(path_or_hub_id: str | os.PathLike, *, param_dtype: str | None = None, **config_overrides):
  """(ModelConfig, params) from a Hugging Face directory or hub id.

  `param_dtype` sets the parameter dtype (default: float32); other keyword arguments
  override ModelConfig fields (e.g. dtype="bfloat16" compute, scan_layers=True, remat="full").
  """
  directory = resolve(path_or_hub_id)
  config = hf_model_config(directory, param_dtype=param_dtype, **config_overrides)
  rows = tensor_table(config)
  extra = {"lm_head.weight"} if config.tie_embeddings else set()  # some tied checkpoints store a copy
  return config, params_from_hf_tensors(config, read_tensors(directory, config, rows, also_known=extra), rows)


def read_tensors(directory: Path, config: ModelConfig, table: list[Entry], *,
                 also_known: set[str] = frozenset()) -> dict[str, np.ndarray]:
  """{HF name: tensor} of every `table` row from a directory's safetensors files, shapes checked; tensors that
  neither the table nor `also_known` names are reported in one warning."""
  from safetensors import safe_open

  located = _strip_prefix(_safetensor_files(directory), config)
  wanted = {e.hf for e in table} | set(also_known)
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
    try:
      tensor = handles[file].get_tensor(stored)
    except Exception as e:  # noqa: BLE001 (a file cut short fails when its tensor is read)
      raise CheckpointError(f"{file}: tensor {stored!r} cannot be read ({type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:120]}); the file is damaged or cut short") from None
    want = expected.get(entry.hf)
    if want is not None and tuple(tensor.shape) != tuple(want):
      raise CheckpointError(f"{file}: tensor {stored!r} has shape {tuple(tensor.shape)}, "
                            f"expected {tuple(want)} for this config.json")
    tensors[entry.hf] = tensor
  return tensors


def hf_tensors(config: ModelConfig, params, table: list[Entry]) -> dict[str, np.ndarray]:
  """{HF name: tensor} of rlhfx params (scanned or not) for every `table` row."""
  params = jax.tree.map(np.asarray, params)
  if "layers" in params:
    params = unstack_layers(params, config.n_layers)
  return {entry.hf: np.ascontiguousarray(np.asarray(_to_hf_tensor(entry, [_get(params, p) for p in entry.ours])))
          for entry in table}


def write_safetensors(tensors: dict[str, np.ndarray], out: Path, max_shard_bytes: int) -> None:
  """model.safetensors, or shards of at most `max_shard_bytes` with model.safetensors.index.json."""
  from safetensors.numpy import save_file

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
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, str(out / name), metadata={"format": "pt"})
    weight_map.update({k: name for k in shard})
  total = sum(t.nbytes for t in tensors.values())
  (out / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def to_hf(config: ModelConfig, params, out_dir: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30) -> Path:
  """Write config.json + safetensors (sharded past `max_shard_bytes`, with an index) to `out_dir`."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  hf_config = config_to_hf(config)
  write_safetensors(hf_tensors(config, params, tensor_table(config)), out, max_shard_bytes)
  (out / "config.json").write_text(json.dumps(hf_config, indent=2))
  return out


def params_from_hf_tensors(config: ModelConfig, tensors: dict[str, np.ndarray], table: list[Entry]):
  """rlhfx params (stacked when config.scan_layers) from {HF name: tensor} of `table`'s rows."""
  shapes = _per_layer_shapes(config)
  np_dtype = np.dtype(config.jnp_param_dtype)
  params: dict = {}
  for entry in table:
    parts = _from_hf_tensor(entry, tensors[entry.hf], [_get(shapes, p).shape for p in entry.ours])
    for p, value in zip(entry.ours, parts):
      _set(params, p, np.ascontiguousarray(value.astype(np_dtype)))
  return stack_layers(params, config.n_layers) if config.scan_layers else params
