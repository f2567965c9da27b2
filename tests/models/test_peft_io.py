"""LoRA adapters in PEFT's format against an adapter PEFT itself saved (tests/goldens/peft_llama, made by
tests/make_peft_goldens.py; torch and peft run only there)."""

import json

import jax
import numpy as np
import pytest
import safetensors.numpy

from conftest import GOLDENS, assert_same_files, forward
from rlhfx.models import lora
from rlhfx.models.convert import from_hf
from rlhfx.models.peft_io import hf_module, load_peft, save_peft

PEFT_DIR = GOLDENS / "peft_llama"


def test_a_peft_adapter_gives_peft_logits():
  config, base = from_hf(GOLDENS / "llama")
  adapters, settings = load_peft(PEFT_DIR)
  assert settings["rank"] == 4 and settings["alpha"] == 8.0
  assert len(adapters) == 4 * config.n_layers
  assert set(lora.targets(base, settings["patterns"])) == set(adapters)  # the patterns select those kernels
  golden = np.load(PEFT_DIR / "expected.npz")
  merged = lora.merge(base, adapters, scale=settings["alpha"] / settings["rank"])
  logits = forward(config, merged, golden["tokens"])
  np.testing.assert_allclose(logits, golden["logits"], rtol=0, atol=2e-5)
  assert np.abs(forward(config, base, golden["tokens"]) - golden["logits"]).max() > 1e-2  # the adapter matters


def test_saving_writes_peft_key_layout_and_values(tmp_path):
  adapters, settings = load_peft(PEFT_DIR)
  out = save_peft(adapters, tmp_path / "adapters", rank=settings["rank"], alpha=settings["alpha"])
  assert_same_files((out, "adapter_model.safetensors"), (PEFT_DIR, "adapter_model.safetensors"),
                    ("peft_type", "task_type", "r", "lora_alpha", "bias", "fan_in_fan_out", "use_rslora", "use_dora"),
                    "adapter_config.json")
  c_theirs, c_ours = (json.loads((d / "adapter_config.json").read_text()) for d in (PEFT_DIR, out))
  assert sorted(c_ours["target_modules"]) == sorted(c_theirs["target_modules"])


def test_scanned_layers_round_trip(tmp_path):
  config, base = from_hf(GOLDENS / "llama", scan_layers=True)
  adapters, settings = load_peft(PEFT_DIR, scanned=True)
  assert all(p.startswith("layers/") for p in adapters)
  assert set(lora.targets(base, settings["patterns"])) == set(adapters)
  golden = np.load(PEFT_DIR / "expected.npz")
  merged = lora.merge(base, adapters, scale=2.0)
  np.testing.assert_allclose(forward(config, merged, golden["tokens"]), golden["logits"], atol=2e-5)
  out = save_peft(adapters, tmp_path, rank=4, alpha=8)
  np.testing.assert_array_equal(safetensors.numpy.load_file(out / "adapter_model.safetensors")[
      "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"],
      safetensors.numpy.load_file(PEFT_DIR / "adapter_model.safetensors")[
      "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"])


def test_rlhfx_adapters_through_peft_format_merge_alike(tmp_path):
  """Adapters rlhfx trains (every Llama projection) saved and read back merge to the same weights."""
  config, base = from_hf(GOLDENS / "llama")
  adapters = lora.init(base, patterns=("attn/(q|k|v|o)_proj/kernel", "mlp/(gate|up|down)_proj/kernel"), rank=3,
                       rng=jax.random.key(0))
  adapters = jax.tree.map(lambda x: x + 0.1, adapters)
  loaded, settings = load_peft(save_peft(adapters, tmp_path, rank=3, alpha=6.0))
  assert settings["patterns"] == [r"(attn|mlp)/(down_proj|gate_proj|k_proj|o_proj|q_proj|up_proj|v_proj)/kernel"]
  for a, b in zip(jax.tree.leaves(lora.merge(base, adapters, scale=2.0)), jax.tree.leaves(lora.merge(
      base, loaded, scale=settings["alpha"] / settings["rank"]))):
    np.testing.assert_array_equal(a, b)


def test_what_rlhfx_cannot_read_is_named(tmp_path):
  with pytest.raises(ValueError, match="GPT-2 adapters are saved in rlhfx's format"):
    hf_module("layer_0/attn/c_attn/kernel")
  bad = tmp_path / "dora"
  bad.mkdir()
  config = json.loads((PEFT_DIR / "adapter_config.json").read_text())
  (bad / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
  with pytest.raises(ValueError, match="use_dora=True; rlhfx reads plain LoRA"):
    load_peft(bad)
  with pytest.raises(ValueError, match="adapter_config.json: missing"):
    load_peft(tmp_path)
