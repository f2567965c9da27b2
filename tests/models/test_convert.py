"""Conversion: logits equal transformers' PyTorch forward; export round trips; bad files fail clearly."""

import json
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy
import transformers

from conftest import GOLDENS, forward
from rlhfx.models import get_preset, init_params
from rlhfx.models.convert import CheckpointError, from_hf, to_hf
from rlhfx.models.llama2c import from_llama2c

FAMILIES = ["gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scan_layers", [False, True])
def test_logits_match_transformers(family, scan_layers):
  """Goldens made by tests/make_goldens.py with torch 2.13 + transformers 5 (eager attention, fp32)."""
  config, params = from_hf(GOLDENS / family, scan_layers=scan_layers)
  expected = np.load(GOLDENS / family / "expected.npz")
  got = forward(config, params, expected["tokens"], expected["mask"])
  mask = expected["mask"]
  # the same float32 model computed by two frameworks in another order agrees to 1.6e-6 at most (measured over the
  # five families, 224-token rows); a rope_theta off by one moves logits 2.8e-6 (mistral) to 2.3e-4 (qwen3), a
  # doubled norm eps 2.4e-4 or more: 2.5e-6 lets round-off through and neither mistake. Gemma 3 (embeddings x 8,
  # three layers) differs by 2.9e-6: against transformers in float64 (the unpadded row) rlhfx's float32 is 2.5e-6
  # off and transformers' own float32 1.4e-6, round-off both; its local rope theta off by one moves 1.5e-5
  tolerance = 4e-6 if family == "gemma3" else 2.5e-6
  assert np.abs(got - expected["logits"])[mask].max() <= tolerance


def test_golden_configs_exercise_each_feature():
  """The goldens really cover GQA, llama3 rope scaling, qkv bias, q/k norm, sliding window, tying, and Gemma's
  norms, post-norms, soft-caps, mixed sliding/full layers and local rope theta."""
  configs = {f: from_hf(GOLDENS / f)[0] for f in FAMILIES}
  assert configs["llama"].num_kv_heads < configs["llama"].n_heads
  assert configs["llama"].rope_scaling_dict["rope_type"] == "llama3"
  assert configs["qwen2"].qkv_bias and not configs["qwen2"].out_bias
  assert configs["qwen3"].qk_norm and configs["qwen3"].tie_embeddings
  assert configs["qwen3"].dim_per_head * configs["qwen3"].n_heads != configs["qwen3"].d_model
  assert configs["mistral"].sliding_window == 5 < expected_length()
  assert configs["gpt2"].positions == "learned" and configs["gpt2"].norm == "layernorm"
  for gemma in ("gemma", "gemma2", "gemma3"):
    c = configs[gemma]
    assert c.norm_offset == 1.0 and c.embed_scale and c.mlp == "geglu" and c.post_norms == (gemma != "gemma")
  assert configs["gemma2"].attn_softcap == 0.5 and configs["gemma2"].logit_softcap == 2.0
  assert configs["gemma2"].query_scale == 32 ** -0.5 and configs["gemma2"].sliding_window == 5
  assert [configs["gemma2"].is_sliding(i) for i in range(3)] == [True, False, True]
  assert [configs["gemma3"].is_sliding(i) for i in range(3)] == [True, True, False]
  assert configs["gemma3"].qk_norm and configs["gemma3"].rope_local_theta == 10000.0
  assert configs["gemma3"].rope_scaling_dict == {"rope_type": "linear", "factor": 8.0}


def expected_length():
  return np.load(GOLDENS / "llama" / "expected.npz")["tokens"].shape[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip(family, tmp_path):
  config, params = from_hf(GOLDENS / family)
  out = to_hf(config, params, tmp_path / "export")
  config2, params2 = from_hf(out)
  assert config2 == config
  assert jax.tree.structure(params2) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(a, b)
  hf_config = transformers.AutoConfig.from_pretrained(out)
  assert hf_config.model_type == config.arch == {"gemma3": "gemma3_text"}.get(family, family)
  # the original safetensors and the exported ones hold the same tensors
  original = safetensors.numpy.load_file(GOLDENS / family / "model.safetensors")
  exported = safetensors.numpy.load_file(out / "model.safetensors")
  original = {k.removeprefix("transformer."): v for k, v in original.items() if not k.endswith(".attn.bias")}
  if config.tie_embeddings:
    original.pop("lm_head.weight", None)
  assert set(exported) == set(original)
  for name, tensor in exported.items():
    np.testing.assert_array_equal(tensor, original[name], err_msg=name)


def test_export_from_presets_parses_with_autoconfig(tmp_path):
  for name in ["gpt2", "llama3.2-1b", "llama3.1-8b", "qwen2.5-0.5b", "qwen3-0.6b", "mistral-7b", "smollm-135m",
               "gemma2-2b", "gemma2-27b", "gemma3-1b", "gemma3-4b"]:
    config = get_preset(name)
    from rlhfx.models.convert import config_from_hf, config_to_hf

    hf = config_to_hf(config)
    (tmp_path / f"{name}.json").write_text(json.dumps(hf))
    parsed = transformers.AutoConfig.for_model(**hf)
    assert parsed.vocab_size == config.vocab_size
    back = config_from_hf(json.loads((tmp_path / f"{name}.json").read_text()))
    assert back == config, name


def test_scanned_params_export_like_unscanned(tmp_path):
  config = get_preset("tiny", arch="qwen2", qkv_bias=True)
  params = init_params(config, jax.random.key(0))
  to_hf(config, params, tmp_path / "a")
  config_s, params_s = from_hf(tmp_path / "a", scan_layers=True)
  assert params_s["layers"]["attn"]["q_proj"]["kernel"].shape[0] == config.n_layers
  to_hf(config_s, params_s, tmp_path / "b")
  a = safetensors.numpy.load_file(tmp_path / "a" / "model.safetensors")
  b = safetensors.numpy.load_file(tmp_path / "b" / "model.safetensors")
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_sharded_export_reloads(tmp_path):
  config = get_preset("tiny")
  params = init_params(config, jax.random.key(1))
  out = to_hf(config, params, tmp_path / "sharded", max_shard_bytes=40_000)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  _, params2 = from_hf(out)
  tokens = np.arange(1, 9)[None]
  np.testing.assert_array_equal(forward(config, params, tokens, None), forward(config, params2, tokens, None))


def test_bf16_parameters(tmp_path):
  config, params = from_hf(GOLDENS / "llama", param_dtype="bfloat16")
  assert all(x.dtype == np.dtype("bfloat16") for x in jax.tree.leaves(params))
  out = to_hf(config, params, tmp_path / "bf16")
  _, params2 = from_hf(out, param_dtype="bfloat16")
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- bad input


def _copy_golden(tmp_path, family="llama"):
  directory = tmp_path / family
  shutil.copytree(GOLDENS / family, directory)
  return directory


def test_unknown_architecture_names_the_file(tmp_path):
  directory = _copy_golden(tmp_path)
  cfg = json.loads((directory / "config.json").read_text())
  cfg["model_type"] = "mamba"
  (directory / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match=r"config\.json.*model_type='mamba'"):
    from_hf(directory)


def test_missing_tensor_names_the_tensor(tmp_path):
  directory = _copy_golden(tmp_path)
  tensors = safetensors.numpy.load_file(directory / "model.safetensors")
  del tensors["model.layers.1.mlp.up_proj.weight"]
  safetensors.numpy.save_file(tensors, directory / "model.safetensors")
  with pytest.raises(CheckpointError, match=r"llama.*'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
    from_hf(directory)


def test_wrong_shape_names_file_tensor_and_shapes(tmp_path):
  directory = _copy_golden(tmp_path)
  tensors = safetensors.numpy.load_file(directory / "model.safetensors")
  tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"]
  safetensors.numpy.save_file(tensors, directory / "model.safetensors")
  with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight'"
                                            r" has shape \(64, 64\), expected \(32, 64\)"):
    from_hf(directory)


def test_missing_config_and_missing_weights(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="config.json: missing"):
    from_hf(tmp_path / "empty")
  shutil.copy(GOLDENS / "llama" / "config.json", tmp_path / "empty")
  with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
    from_hf(tmp_path / "empty")


def test_truncated_llama2c_names_file_and_tensor(tmp_path, shared_data):
  data = shared_data("stories260k/stories260K.bin").read_bytes()
  truncated = tmp_path / "stories_truncated.bin"
  truncated.write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match=r"stories_truncated\.bin: truncated at tensor 'w1'"):
    from_llama2c(truncated)
  (tmp_path / "tiny.bin").write_bytes(data[:10])
  with pytest.raises(CheckpointError, match=r"tiny\.bin: 10 bytes is too short"):
    from_llama2c(tmp_path / "tiny.bin")


def test_llama2c_matches_its_header(shared_data):
  config, params = from_llama2c(shared_data("stories260k/stories260K.bin"))
  assert (config.d_model, config.ff_dim, config.n_layers, config.n_heads, config.num_kv_heads,
          config.vocab_size, config.max_seq_len) == (64, 172, 5, 8, 4, 512, 512)
  assert config.tie_embeddings
  n = sum(x.size for x in jax.tree.leaves(params))
  assert n == config.num_params()
