"""Reward models in Hugging Face's format, both ways: `<Arch>ForSequenceClassification` with one label.

  config, params = score_model_from_hf("path/or/hub-id")     # params of rlhfx.models.heads.ScoreModel
  score_model_to_hf(config, params, "out_dir", pad_token_id=0)

The backbone's tensors go through `convert.tensor_table` (the causal LM's rows without the LM
head; GPT-2's under `transformer.`), the head is `score.weight` [1, D]. transformers scores the
last token that is not `pad_token_id`; rlhfx scores the last token its mask keeps: the two
agree when the pad token does not occur inside a sequence (set a pad token distinct from EOS).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from rlhfx.models import convert
from rlhfx.models.config import ModelConfig
from rlhfx.models.hf_config import CheckpointError, config_from_hf, config_to_hf

CLASSES = {"gpt2": "GPT2ForSequenceClassification", "llama": "LlamaForSequenceClassification",
           "mistral": "MistralForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification",
           "qwen3": "Qwen3ForSequenceClassification", "gemma": "GemmaForSequenceClassification",
           "gemma2": "Gemma2ForSequenceClassification", "gemma3_text": "Gemma3TextForSequenceClassification"}


def _backbone_table(config: ModelConfig):
  """The causal LM's rows without its LM head (GPT-2's names without `transformer.`, as convert reads them)."""
  return [e for e in convert.tensor_table(config) if e.hf != "lm_head.weight"]


def is_score_model(path_or_hub_id: str | os.PathLike) -> bool:
  """True when a local directory's config.json names a `*ForSequenceClassification` architecture."""
  config_file = Path(path_or_hub_id) / "config.json"
  if not config_file.exists():
    return False
  return any(a.endswith("ForSequenceClassification") for a in json.loads(config_file.read_text()).get(
      "architectures") or [])


def score_model_config(path_or_hub_id: str | os.PathLike, **config_overrides) -> ModelConfig:
  """The ModelConfig of a `*ForSequenceClassification` directory or hub id with one label (config.json alone)."""
  config_file = convert.resolve(path_or_hub_id, weights=False) / "config.json"
  if not config_file.exists():
    raise CheckpointError(f"{config_file}: missing; a Hugging Face reward model directory needs config.json")
  hf = json.loads(config_file.read_text())
  architectures = hf.get("architectures") or []
  if not any(a.endswith("ForSequenceClassification") for a in architectures):
    raise CheckpointError(f"{config_file}: architectures={architectures}; a reward model is a "
                          f"*ForSequenceClassification (one of {', '.join(CLASSES.values())})")
  labels = len(hf.get("id2label") or {}) or hf.get("num_labels", 2)
  if labels != 1:
    raise CheckpointError(f"{config_file}: {labels} labels; a reward model has num_labels=1 (one score)")
  return config_from_hf(hf, str(config_file)).replace(**{"param_dtype": "float32", **config_overrides})


def score_model_from_hf(path_or_hub_id: str | os.PathLike, *, param_dtype: str | None = None, **config_overrides):
  """(ModelConfig, {"backbone", "score"}) from a `*ForSequenceClassification` directory or hub id with one label."""
  directory = convert.resolve(path_or_hub_id)
  config = score_model_config(directory, param_dtype=param_dtype or "float32", **config_overrides)
  table = _backbone_table(config)
  score = convert.Entry(hf="score.weight", ours=(("score", "kernel"),), kind="linear")
  tensors = convert.read_tensors(directory, config, table + [score], also_known={"lm_head.weight"})
  backbone = convert.params_from_hf_tensors(config, tensors, table)
  kernel = np.ascontiguousarray(tensors["score.weight"].T.astype(np.dtype(config.jnp_param_dtype)))
  if kernel.shape != (config.d_model, 1):
    raise CheckpointError(f"{directory}: tensor 'score.weight' has shape {tuple(tensors['score.weight'].shape)}, "
                          f"expected (1, {config.d_model})")
  return config, {"backbone": backbone, "score": {"kernel": kernel}}


def score_model_to_hf(config: ModelConfig, params, out_dir: str | os.PathLike, *, pad_token_id: int,
                      max_shard_bytes: int = 5 * 2**30) -> Path:
  """Write a ScoreModel's params as `<Arch>ForSequenceClassification` (num_labels=1, `pad_token_id` set)."""
  if pad_token_id is None:
    raise CheckpointError("a Hugging Face reward model needs a pad token: transformers scores the last token that "
                          "is not pad_token_id")
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  prefix = "transformer." if config.arch == "gpt2" else ""  # GPT2ForSequenceClassification's backbone
  tensors = {prefix + k: v for k, v in convert.hf_tensors(config, params["backbone"], _backbone_table(config)).items()}
  tensors["score.weight"] = np.ascontiguousarray(np.asarray(params["score"]["kernel"]).T)
  convert.write_safetensors(tensors, out, max_shard_bytes)
  hf = config_to_hf(config)
  hf.update(architectures=[CLASSES[config.arch]], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
            pad_token_id=int(pad_token_id))
  (out / "config.json").write_text(json.dumps(hf, indent=2))
  return out
