"""LoRA adapters in PEFT's format, both ways: adapter_config.json + adapter_model.safetensors.

  save_peft(adapters, "out/adapters", rank=8, alpha=16)   # `peft.PeftModel.from_pretrained(base, dir)` applies it
  adapters, settings = load_peft("out/adapters")           # settings: rank, alpha, patterns (config.lora)

PEFT names a Llama-family module by its Hugging Face path: rlhfx's "layer_3/attn/q_proj/kernel" is
`base_model.model.model.layers.3.self_attn.q_proj`, with `lora_A.weight` = A.T [r, in] and
`lora_B.weight` = B.T [out, r] (the HF weight is the kernel transposed, so B_hf A_hf = (A B).T), and
the scale alpha / r. Scanned layers (a leading "layers" axis) are written per layer. GPT-2's fused
c_attn has no per-projection adapter in PEFT, so GPT-2 adapters stay in rlhfx's own format (lora.save).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from rlhfx import storage
from rlhfx.models.hf_config import CheckpointError

PREFIX = "base_model.model."
_GROUPS = {"attn": "self_attn", "mlp": "mlp"}
_OURS = re.compile(r"^layer_(\d+)/(attn|mlp)/(\w+_proj)/kernel$")
_THEIRS = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight$")


def _per_layer(adapters: dict) -> dict[str, dict[str, np.ndarray]]:
  """Scanned adapters ("layers/...", leading L axis) as "layer_i/..." entries."""
  out = {}
  for path, ab in adapters.items():
    ab = {k: np.asarray(v) for k, v in ab.items()}
    if path.startswith("layers/"):
      for i in range(ab["a"].shape[0]):
        out[f"layer_{i}/" + path.removeprefix("layers/")] = {k: v[i] for k, v in ab.items()}
    else:
      out[path] = ab
  return out


def hf_module(path: str) -> str:
  """rlhfx kernel path -> PEFT's module name ("layer_0/attn/q_proj/kernel" -> ...model.layers.0.self_attn.q_proj)."""
  match = _OURS.match(path)
  if not match:
    raise CheckpointError(f"LoRA adapter on {path!r}: PEFT's format names Llama-family projections "
                     "(layer_i/attn|mlp/*_proj/kernel); GPT-2 adapters are saved in rlhfx's format (lora.save)")
  layer, group, proj = match.groups()
  return f"{PREFIX}model.layers.{layer}.{_GROUPS[group]}.{proj}"


def save_peft(adapters: dict, directory: str | os.PathLike, *, rank: int, alpha: float,
              base_model: str = "") -> Path:
  """Write adapters as PEFT writes a LoRA adapter of a causal LM."""
  from safetensors.numpy import save_file

  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tensors, modules = {}, set()
  for path, ab in _per_layer(adapters).items():
    name = hf_module(path)
    modules.add(name.rsplit(".", 1)[1])
    tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(ab["a"].T)
    tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(ab["b"].T)
  save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
            "target_modules": sorted(modules), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "modules_to_save": None, "rank_pattern": {},
            "alpha_pattern": {}, "base_model_name_or_path": base_model, "inference_mode": True}
  (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  return directory


def load_peft(directory: str | os.PathLike, *, scanned: bool = False) -> tuple[dict, dict]:
  """(adapters, {"rank", "alpha", "patterns"}) of a PEFT LoRA directory; `scanned` stacks layers (L leading)."""
  from safetensors.numpy import load_file

  directory = storage.local(directory)  # a gs:// folder: its local copy
  config_file = directory / "adapter_config.json"
  if not config_file.exists():
    raise CheckpointError(f"{config_file}: missing; a PEFT adapter directory holds adapter_config.json and "
                     "adapter_model.safetensors")
  config = json.loads(config_file.read_text())
  unsupported = {k: config.get(k) for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern",
                                            "modules_to_save") if config.get(k)}
  if config.get("peft_type") != "LORA" or unsupported:
    raise CheckpointError(f"{config_file}: peft_type={config.get('peft_type')!r}{', ' if unsupported else ''}"
                     f"{', '.join(f'{k}={v!r}' for k, v in unsupported.items())}; rlhfx reads plain LoRA "
                     "(one rank and alpha, no DoRA/rsLoRA, no modules_to_save)")
  adapters: dict = {}
  for name, value in load_file(str(directory / "adapter_model.safetensors")).items():
    match = _THEIRS.match(name)
    if not match:
      raise CheckpointError(f"{directory / 'adapter_model.safetensors'}: tensor {name!r} is not a Llama-family "
                       "projection's lora_A/lora_B")
    layer, group, proj, which = match.groups()
    group = {v: k for k, v in _GROUPS.items()}[group]
    adapters.setdefault(f"layer_{layer}/{group}/{proj}/kernel", {})["a" if which == "A" else "b"] = value.T
  if scanned:
    paths = sorted({p.split("/", 1)[1] for p in adapters})
    layers = sorted({int(p.split("/")[0].removeprefix("layer_")) for p in adapters})
    adapters = {f"layers/{p}": {k: np.stack([adapters[f"layer_{i}/{p}"][k] for i in layers]) for k in ("a", "b")}
                for p in paths}
  modules = "|".join(sorted(config["target_modules"]))
  return adapters, {"rank": int(config["r"]), "alpha": float(config["lora_alpha"]),
                    "patterns": [rf"(attn|mlp)/({modules})/kernel"]}
