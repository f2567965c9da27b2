"""Algorithms: one file each, its `train(config, workdir)` read top to bottom (set-up, init, jit, the step loop,
export and summary), its step and loss pure functions above it."""

from __future__ import annotations

import importlib

from rlhfx.config import ALGORITHMS


def train(config, workdir: str):
  """Run the algorithm named by `config.algorithm` (checked by `rlhfx.validation` first)."""
  from rlhfx import validation

  validation.check(config)
  return importlib.import_module(f"rlhfx.algorithms.{config.algorithm}").train(config, workdir)


__all__ = ["ALGORITHMS", "train"]
