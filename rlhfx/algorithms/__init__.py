"""Algorithms: one file each, its `train(config, workdir)` read top to bottom (set-up, init, jit, the step loop,
export and summary), its step and loss pure functions above it."""

from __future__ import annotations

import importlib

from rlhfx.config import ALGORITHMS


def train(config, workdir: str):
  """Run the algorithm named by `config.algorithm` (its `train` validates the config before anything else)."""
  if config.algorithm not in ALGORITHMS:
    from rlhfx.config import ConfigError

    raise ConfigError(f"config.algorithm={config.algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
  return importlib.import_module(f"rlhfx.algorithms.{config.algorithm}").train(config, workdir)


__all__ = ["ALGORITHMS", "train"]
