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


def test_a_distinct_export_pad_token_puts_transformers_last_token_on_the_final_eos(tmp_path):
  """config.reward.export_pad_token: with GPT-2's tokenizer (no pad; pad = EOS in TRL's recipes) transformers scores
  the last id that is not pad_token_id, the token before a row's final EOS, where rlhfx scores the EOS. The export
  with a new "<|pad|>" (id 50257, one zero row added to the embedding) makes the two rules agree on every row, and
  its weights score the run's rows as before."""
  from rlhfx.config import GPT2_TOKENIZER, base_config
  from rlhfx.data.tokenize import load_tokenizer
  from rlhfx.export import export_reward_model_hf
  from rlhfx.models import get_preset, init_params
  from rlhfx.models.heads import last_token_index

  tokenizer = load_tokenizer(GPT2_TOKENIZER)
  config = get_preset("tiny").replace(vocab_size=len(tokenizer))
  params = {"backbone": {k: v for k, v in init_params(config, jax.random.key(0)).items() if k != "lm_head"},
            "score": {"kernel": np.asarray(jax.random.normal(jax.random.key(1), (config.d_model, 1)))}}
  run = base_config("reward")
  run.train.export_hf, run.reward.export_pad_token = True, "<|pad|>"
  lines = export_reward_model_hf(run, config, params, tokenizer, {"mean": 0.0, "std": 1.0}, tmp_path / "hf")
  assert lines == [f"Hugging Face reward model (AutoModelForSequenceClassification): {tmp_path / 'hf'}"]
  assert tokenizer.pad_token is None  # the run's tokenizer is left as it was
  hf = json.loads((tmp_path / "hf" / "config.json").read_text())
  exported_tokenizer = load_tokenizer(tmp_path / "hf")
  pad, eos = exported_tokenizer.pad_token_id, exported_tokenizer.eos_token_id
  assert (exported_tokenizer.pad_token, pad, eos, hf["pad_token_id"], hf["vocab_size"]) == (
      "<|pad|>", 50257, 50256, 50257, 50258)
  texts = ["Human: hi Assistant: hello", "Human: what is two plus two? Assistant: four, I think", "a b c"]
  rows = [tokenizer(t).input_ids + [eos] for t in texts]  # the form rlhfx trains and scores: replies end in EOS
  width = max(map(len, rows))
  mask = np.array([[i < len(r) for i in range(width)] for r in rows])
  rlhfx_last = np.asarray(last_token_index(mask))

  def transformers_last(pad_id):  # *ForSequenceClassification: the rightmost token that is not pad_token_id
    ids = np.array([r + [pad_id] * (width - len(r)) for r in rows])
    return (np.arange(width) * (ids != pad_id)).argmax(-1), ids

  with_eos_pad, _ = transformers_last(eos)
  np.testing.assert_array_equal(with_eos_pad, rlhfx_last - 1)  # the mismatch the setting removes
  distinct, ids = transformers_last(pad)
  np.testing.assert_array_equal(distinct, rlhfx_last)
  exported_config, exported = score_model_from_hf(tmp_path / "hf")
  np.testing.assert_array_equal(exported["backbone"]["embed"]["embedding"][pad], 0)
  before = ScoreModel(config).apply({"params": params}, np.where(mask, ids, 0), mask)
  after = ScoreModel(exported_config).apply({"params": exported}, ids, mask)
  np.testing.assert_allclose(after, before, rtol=0, atol=1e-6)
