"""Algorithms: one file per algorithm (state, init, step builder, train loop)."""

from __future__ import annotations

import importlib

ALGORITHMS = ("sft", "reward", "dpo", "ppo", "grpo")


def train(config, workdir: str):
  """Run the algorithm named by `config.algorithm`."""
  if config.algorithm not in ALGORITHMS:
    raise ValueError(f"config.algorithm={config.algorithm!r}; expected one of {ALGORITHMS}")
  return importlib.import_module(f"rlhfx.algorithms.{config.algorithm}").train(config, workdir)
