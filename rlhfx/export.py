"""The end of a run: the trained model written out (Hugging Face directory, LoRA adapters) and the summary."""

from __future__ import annotations

from pathlib import Path

import jax

from rlhfx.models import ModelConfig, lora


def export_policy(config, model_config: ModelConfig, params, tokenizer, workdir: Path) -> list[str]:
  """Process 0 writes a LoRA run's adapters to <workdir>/adapters and the (merged) policy as a Hugging Face
  directory to <workdir>/hf when `config.train.export_hf`; returns summary lines naming what it wrote."""
  if jax.process_index() != 0:
    return []
  policy, lines = jax.device_get(params), []
  if lora.is_wrapped(policy):
    lora.save(policy["lora"], workdir / "adapters", rank=config.lora.rank, alpha=config.lora.alpha,
              patterns=tuple(config.lora.patterns))
    policy = lora.merge(policy["base"], policy["lora"], scale=lora.scale(config.lora))
    lines.append(f"LoRA adapters: {workdir / 'adapters'}")
  if config.train.export_hf:
    from rlhfx.models.convert import to_hf

    tokenizer.save_pretrained(to_hf(model_config, policy, workdir / "hf"))
    lines.append(f"Hugging Face export: {workdir / 'hf'}")
  return lines


def print_summary(title: str, lines: list[str], workdir: Path, data) -> None:
  """Process 0 prints "== summary ==", the title, `lines`, the data's counts (`prepare.Data.summary`: records
  skipped, rows truncated or dropped) and where the metrics and checkpoints are."""
  if jax.process_index() == 0:
    where = (f"metrics: {workdir / 'metrics.jsonl'} and TensorBoard: tensorboard --logdir {workdir / 'tensorboard'}; "
             f"checkpoints: {workdir / 'checkpoints'}")
    print("\n".join(["", "== summary ==", title, *lines, data.summary(), where]), flush=True)

