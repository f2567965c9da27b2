"""Optimizers: AdamW with warmup + cosine (or constant) schedule, global-norm clipping, frozen labels."""

from __future__ import annotations

import re
from typing import Sequence

import jax
import optax


def learning_rate_schedule(cfg, num_steps: int) -> optax.Schedule:
  """Linear warmup to cfg.learning_rate, then cosine decay to min_lr_ratio * lr (or constant)."""
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=max(num_steps, cfg.warmup_steps + 1), end_value=cfg.learning_rate * cfg.min_lr_ratio)
  if cfg.schedule == "constant":
    if not cfg.warmup_steps:
      return optax.constant_schedule(cfg.learning_rate)
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps),
                                 optax.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps])
  raise ValueError(f"config.optim.schedule={cfg.schedule!r}; expected cosine or constant")


def param_path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_labels(params, frozen_patterns: Sequence[str]):
  """"frozen" for parameters whose path ("layer_0/attn/q_proj/kernel") matches a pattern, else "trainable"."""
  compiled = [re.compile(p) for p in frozen_patterns]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if any(c.search(param_path(path)) for c in compiled) else "trainable", params)


def make_optimizer(cfg, num_steps: int, params=None, frozen: Sequence[str] = ()) -> optax.GradientTransformation:
  """AdamW (no decay on vectors: biases and norm scales) after global-norm clipping.

  Parameters matching cfg.freeze or `frozen` (regexes over paths) get no update and no optimizer state.
  """
  patterns = tuple(cfg.freeze) + tuple(frozen)
  decay_mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm else optax.identity(),
      optax.adamw(learning_rate_schedule(cfg, num_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=decay_mask))
  if patterns:
    if params is None:
      raise ValueError("make_optimizer: freezing parameters needs the parameter tree")
    labels = param_labels(params, patterns)
    if "trainable" not in jax.tree.leaves(labels):
      raise ValueError(f"config.optim.freeze={list(patterns)} freezes every parameter")
    tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
  return tx


def scaled(tx: optax.GradientTransformation, factor) -> optax.GradientTransformation:
  """`tx` with its updates multiplied by `factor` (a traced value is fine) and the same state as `tx`.

  AdamW's update is linear in its learning rate (-lr_t (m / (sqrt(v) + eps) + wd p), with lr_t = lr x the
  schedule's shape), so the optimizer of `cfg` at learning rate 1 scaled by lr is the optimizer at lr, to
  round-off: members of one sweep program (rlhfx.members) each step with their own lr this way."""

  def update(updates, state, params=None):
    updates, state = tx.update(updates, state, params)
    return jax.tree.map(lambda u: u * factor, updates), state

  return optax.GradientTransformation(tx.init, update)


def unit_learning_rate(cfg):
  """A copy of config.optim with learning_rate 1 (see `scaled`)."""
  unit = cfg.copy_and_resolve_references()
  unit.learning_rate = 1.0
  return unit
