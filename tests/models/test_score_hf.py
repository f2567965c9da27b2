"""Reward models in Hugging Face's *ForSequenceClassification format, against transformers' own scores.

tests/goldens/reward_<family>/ are made by tests/make_reward_goldens.py (torch runs only there).
"""

import json

import jax
import numpy as np
import pytest

from conftest import GOLDENS, assert_same_files
from rlhfx.models.heads import ScoreModel
from rlhfx.models.hf_config import CheckpointError
from rlhfx.models.score_hf import is_score_model, score_model_from_hf, score_model_to_hf

FAMILIES = ["gpt2", "llama", "qwen2"]


def _scores(config, params, golden):
  return ScoreModel(config).apply({"params": params}, golden["tokens"], golden["mask"].astype(bool))


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_equal_transformers(family):
  directory = GOLDENS / f"reward_{family}"
  golden = np.load(directory / "expected.npz")
  config, params = score_model_from_hf(directory)
  scores = _scores(config, params, golden)
  np.testing.assert_allclose(scores, golden["scores"], rtol=0, atol=2e-6)
  assert np.abs(golden["scores"]).max() > 0.05  # not a head that scores 0 whatever the input


@pytest.mark.parametrize("family", FAMILIES)
def test_export_writes_the_tensors_and_config_transformers_wrote(family, tmp_path):
  """What transformers loads from an export is what it saved: the same tensor names, shapes and values, and a
  config.json with its architecture, one label and the pad token."""
  directory = GOLDENS / f"reward_{family}"
  config, params = score_model_from_hf(directory)
  out = score_model_to_hf(config, params, tmp_path / "rm", pad_token_id=0)
  assert_same_files((out, "model.safetensors"), (directory, "model.safetensors"),
                    ("architectures", "id2label", "pad_token_id", "model_type", "vocab_size"), "config.json")
  assert is_score_model(out) and not is_score_model(GOLDENS / family)
  config2, params2 = score_model_from_hf(out)
  np.testing.assert_array_equal(_scores(config2, params2, np.load(directory / "expected.npz")),
                                _scores(config, params, np.load(directory / "expected.npz")))


def test_scanned_and_bf16_configs_load(tmp_path):
  directory = GOLDENS / "reward_llama"
  golden = np.load(directory / "expected.npz")
  config, params = score_model_from_hf(directory, scan_layers=True)
  assert "layers" in params["backbone"]
  np.testing.assert_allclose(_scores(config, params, golden), golden["scores"], atol=2e-6)


def test_a_causal_lm_or_many_labels_is_refused_by_name(tmp_path):
  with pytest.raises(CheckpointError, match="config.json: architectures=\\['LlamaForCausalLM'\\]; a reward model"):
    score_model_from_hf(GOLDENS / "llama")
  bad = tmp_path / "two_labels"
  bad.mkdir()
  hf = json.loads((GOLDENS / "reward_llama" / "config.json").read_text())
  hf["id2label"] = {"0": "a", "1": "b"}
  (bad / "config.json").write_text(json.dumps(hf))
  with pytest.raises(CheckpointError, match="2 labels; a reward model has num_labels=1"):
    score_model_from_hf(bad)
  config, params = score_model_from_hf(GOLDENS / "reward_llama")
  with pytest.raises(CheckpointError, match="needs a pad token"):
    score_model_to_hf(config, params, tmp_path / "x", pad_token_id=None)


def test_params_fit_the_score_model_tree():
  config, params = score_model_from_hf(GOLDENS / "reward_qwen2")
  init = jax.eval_shape(lambda: ScoreModel(config).init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"])
  from rlhfx.sharding import unbox
  want = jax.tree.map(lambda x: (x.shape, x.dtype), unbox(init))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == want


def test_scoring_model_takes_an_hf_reward_model_like_an_rlhfx_export(tmp_path):
  """`config.scoring.model=<HF dir>` loads the same tree (with the run's shardings) as the rlhfx export of the
  same weights, with the stats beside it when there are some and raw scores otherwise."""
  from rlhfx import scoring, sharding
  from rlhfx.models.load import abstract_params

  config, params = score_model_from_hf(GOLDENS / "reward_llama")
  stats = {"mean": 0.25, "std": 2.0, "count": 8}
  scoring.export_reward_model(tmp_path / "native", config, params, stats)
  hf_dir = score_model_to_hf(config, params, tmp_path / "hf", pad_token_id=0)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
  target = abstract_params(ScoreModel(config), sharding.Runtime(mesh=mesh, rules=sharding.DEFAULT_RULES,
                                                                workdir=tmp_path))
  raw = scoring.load_reward_model(hf_dir, target)
  assert (raw.mean, raw.std) == (0.0, 1.0)
  (hf_dir / "reward_stats.json").write_text(json.dumps(stats))
  from_hf, native = scoring.load_reward_model(hf_dir, target), scoring.load_reward_model(tmp_path / "native", target)
  assert (from_hf.mean, from_hf.std) == (native.mean, native.std) == (0.25, 2.0)
  assert scoring.reward_model_config(hf_dir) == native.config.replace(param_dtype=from_hf.config.param_dtype)
  for a, b, t in zip(jax.tree.leaves(from_hf.params), jax.tree.leaves(native.params), jax.tree.leaves(target)):
    np.testing.assert_array_equal(a, b)
    assert a.sharding == t.sharding
  with pytest.raises(Exception, match="no reward model there"):
    scoring.load_reward_model(tmp_path, target)
