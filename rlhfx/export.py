"""The end of a run: the trained model written out (Hugging Face directory, LoRA adapters) and the summary.

Exports are folders of files written by libraries that take local paths (transformers, safetensors): for a gs://
workdir they are written to `storage.staging(workdir)` and then uploaded (`storage.publish`)."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import jax
import numpy as np

from rlhfx import storage
from rlhfx.config import ConfigError
from rlhfx.models import ModelConfig, lora
from rlhfx.models.convert import to_hf
from rlhfx.models.peft_io import save_peft
from rlhfx.models.score_hf import score_model_to_hf


def export_policy(config, model_config: ModelConfig, params, tokenizer, workdir: Path) -> list[str]:
  """Process 0 writes a LoRA run's adapters to <workdir>/adapters (PEFT's format; GPT-2: rlhfx's) and the (merged)
  policy as a Hugging Face directory to <workdir>/hf when `config.train.export_hf`; returns summary lines naming
  what it wrote."""
  if jax.process_index() != 0:
    return []
  policy, lines, local = jax.device_get(params), [], storage.staging(workdir)
  if lora.is_wrapped(policy):
    if model_config.arch == "gpt2":  # fused c_attn: no per-projection adapter in PEFT's format
      lora.save(policy["lora"], local / "adapters", rank=config.lora.rank, alpha=config.lora.alpha,
                patterns=tuple(config.lora.patterns))
      lines.append(f"LoRA adapters (rlhfx format; PEFT's has no GPT-2 q/k/v adapters): {workdir / 'adapters'}")
    else:
      save_peft(policy["lora"], local / "adapters", rank=config.lora.rank, alpha=config.lora.alpha,
                base_model=config.model.init_from)
      lines.append(f"LoRA adapters (PEFT format: peft.PeftModel.from_pretrained(base, dir)): {workdir / 'adapters'}")
    storage.publish(local / "adapters", workdir / "adapters")
    policy = lora.merge(policy["base"], policy["lora"], scale=lora.scale(config.lora))
  if config.train.export_hf:
    print(f"export: writing the Hugging Face model to {workdir / 'hf'}", flush=True)
    tokenizer.save_pretrained(to_hf(model_config, policy, local / "hf"))
    storage.publish(local / "hf", workdir / "hf")
    lines.append(f"Hugging Face export: {workdir / 'hf'}")
  return lines


def export_reward_model_hf(config, model_config: ModelConfig, params, tokenizer, stats: dict,
                           directory) -> list[str]:
  """Process 0 writes a ScoreModel as `<Arch>ForSequenceClassification` (+ tokenizer and reward_stats.json) to
  `directory` when `config.train.export_hf`; returns summary lines naming what it wrote or why it did not."""
  if jax.process_index() != 0 or not config.train.export_hf:
    return []
  params = jax.device_get(params)
  if config.reward.export_pad_token:
    model_config, params, tokenizer = with_pad_token(model_config, params, tokenizer, config.reward.export_pad_token)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model_config.pad_token_id
  if pad is None:
    return ["no Hugging Face reward model export: the tokenizer has no pad token, which transformers needs to "
            "find each sequence's last token (config.reward.export_pad_token='<|pad|>' adds one)"]
  out = score_model_to_hf(model_config, params, storage.staging(directory), pad_token_id=pad)
  tokenizer.save_pretrained(out)
  (out / "reward_stats.json").write_text(json.dumps(stats, indent=2))
  storage.publish(out, directory)
  lines = [f"Hugging Face reward model (AutoModelForSequenceClassification): {directory}"]
  if pad == tokenizer.eos_token_id:
    lines.append("  note: its pad token is EOS, so transformers scores the token before a final EOS (rlhfx scores the "
                 "EOS itself); config.reward.export_pad_token='<|pad|>' exports a distinct one for equal scores")
  return lines


def with_pad_token(model_config: ModelConfig, params, tokenizer, token: str):
  """(model config, ScoreModel params, tokenizer) whose pad token is `token`, distinct from EOS: a token the
  tokenizer lacks is added (a copy of the tokenizer), and an id past the embedding gets a zero row (never read:
  transformers' attention mask hides padding), so transformers' last-token rule (the last id that is not
  pad_token_id) lands where rlhfx's (the last position of the mask) does, EOS included."""
  tokenizer = copy.deepcopy(tokenizer)
  if token not in tokenizer.get_vocab():
    tokenizer.add_special_tokens({"pad_token": token})
  tokenizer.pad_token = token
  pad = tokenizer.pad_token_id
  if pad == tokenizer.eos_token_id:
    raise ConfigError(f"config.reward.export_pad_token={token!r} is the tokenizer's EOS; name another token")
  if pad >= model_config.vocab_size:
    table = params["backbone"]["embed"]["embedding"]
    grown = np.concatenate([table, np.zeros((pad + 1 - table.shape[0], table.shape[1]), table.dtype)])
    params = {**params, "backbone": {**params["backbone"], "embed": {"embedding": grown}}}
    model_config = model_config.replace(vocab_size=pad + 1)
  return model_config, params, tokenizer


def print_summary(title: str, lines: list[str], workdir: Path, data) -> None:
  """Process 0 prints "== summary ==", the title, `lines`, the data's counts (`prepare.Data.summary`: records
  skipped, rows truncated or dropped) and where the metrics and checkpoints are."""
  if jax.process_index() == 0:
    view = (f"tensorboard --logdir {workdir / 'tensorboard'}" if importlib.util.find_spec("tensorboard") else
            f"{workdir / 'tensorboard'} (to view: pip install 'rlhfx[tensorboard]', then tensorboard --logdir ...)")
    where = f"metrics: {workdir / 'metrics.jsonl'} and TensorBoard: {view}; checkpoints: {workdir / 'checkpoints'}"
    print("\n".join(["", "== summary ==", title, *lines, data.summary(), where]), flush=True)
