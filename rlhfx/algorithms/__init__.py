"""Algorithms: one file each, its `train(config, workdir)` read top to bottom (set-up, init, jit, the step loop,
export and summary), its step and loss pure functions above it."""

from __future__ import annotations

import importlib

from rlhfx.config import ALGORITHMS, ConfigError


def train(config, workdir: str, **kwargs):
  """Run the algorithm named by `config.algorithm` (`python -m rlhfx.main` calls this; its `train` checks every
  config field before anything is built); `kwargs` go to it (dpo: `loss=`)."""
  if config.algorithm not in ALGORITHMS:
    raise ConfigError(f"config.algorithm={config.algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
  return importlib.import_module(f"rlhfx.algorithms.{config.algorithm}").train(config, workdir, **kwargs)


__all__ = ["ALGORITHMS", "train"]
