"""A run's data: the ArrayRecord dataset built once from the config's files, its splits, the tokenizer, batches.

  data = prepare.prepare(config, workdir, kind="preference")
  train_iter = iter(prepare.batches(config, data, data.train, seed=config.seed))
  for batch in prepare.full_batches(config, data, data.eval): ...   # every example once (evaluation)
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlhfx import sharding
from rlhfx.config import ConfigError
from rlhfx.data import builders, pipeline, synthetic
from rlhfx.data.tokenize import Truncation, load_tokenizer


@dataclasses.dataclass
class Data:
  tokenizer: Any
  kind: str  # the batch layout (rlhfx.data.pipeline): sft | preference | unpaired | prompts
  train: Any  # random-access source
  eval: Any | None
  counts: dict[str, int]  # of the build: read, written/<split>, skipped/<reason>
  truncation: Truncation
  stats: pipeline.Stats = dataclasses.field(default_factory=pipeline.Stats)  # the train stream's, this process

  def report(self) -> dict[str, int]:
    """data/* counts for the metrics: records skipped at build time by reason, and the train rows this run
    encoded, truncated or skipped as over-long (`data.on_overlong`) on this process."""
    built = {f"data/{k}": v for k, v in self.counts.items() if k.startswith("skipped/") or k == "read"}
    return {**built, **{f"data/{k}": v for k, v in self.stats.snapshot().items()}}

  def summary(self) -> str:
    """One line for the run's summary: what was read, kept and dropped."""
    c, s = self.counts, self.stats.snapshot()
    skipped = {k.removeprefix("skipped/"): v for k, v in c.items() if k.startswith("skipped/")}
    line = (f"data: {c.get('read', 0)} records read, {c.get('written/train', 0)} train / "
            f"{c.get('written/eval', 0)} eval examples, {sum(skipped.values())} skipped at build"
            + (f" ({', '.join(f'{k} {v}' for k, v in sorted(skipped.items()))})" if skipped else ""))
    return line + (f"; this run's train rows: {s.get('encoded', 0)} encoded, {s.get('truncated', 0)} truncated, "
                   f"{s.get('skipped/overlong', 0)} skipped as over-long")


def prepare(config, workdir: Path, kind: str) -> Data:
  """Build the ArrayRecord dataset once (process 0), then open its splits and the tokenizer."""
  d = config.data
  data_dir = Path(d.dir) if d.dir else workdir / "data"
  files = list(d.train_files)
  if d.builtin:
    files = [data_dir / "raw" / f"{d.builtin}.jsonl"]
  if jax.process_index() == 0 and not any(data_dir.glob("*/*/dataset_info.json")):
    if d.builtin:
      synthetic.write_task(d.builtin, files[0], seed=config.seed)
    if not files:
      raise ConfigError("config.data.train_files is empty (and config.data.builtin is not set)")
    builders.build(kind, files, data_dir=data_dir, input_format=d.input_format, eval_fraction=d.eval_fraction,
                   split_seed=config.seed, on_error=d.on_error)
  sharding.sync("data_built")
  counts = builders.counts(data_dir)
  logging.info("data %s: %s", data_dir, counts)
  tokenizer = load_tokenizer(d.tokenizer or config.model.init_from)
  truncation = Truncation(max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                          max_completion_length=d.max_completion_length or None, prompt_side=d.prompt_side,
                          on_overlong=d.on_overlong)
  eval_source = builders.data_source(data_dir, "eval") if counts.get("written/eval") else None
  return Data(tokenizer, kind, builders.data_source(data_dir, "train"), eval_source, counts, truncation)


def batches(config, data: Data, source, *, seed: int, shuffle: bool = True, num_epochs=None,
            stats: pipeline.Stats | None = None, drop_remainder: bool = True, packing: bool | None = None):
  """This process's share of global batches of `config.train.global_batch_size` rows (a Grain iterator). The
  train split is packed per `config.data.packing` and counts its encoding into `data.stats` unless `packing` /
  `stats` say otherwise (`full_batches`: one sequence per row, not counted)."""
  if stats is None and source is data.train:
    stats = data.stats
  if packing is None:
    packing = config.data.packing and source is data.train
  return pipeline.make_dataset(source, data.tokenizer, kind=data.kind, global_batch_size=config.train.global_batch_size,
                               buckets=tuple(config.data.buckets), truncation=data.truncation, seed=seed,
                               shuffle=shuffle, num_epochs=num_epochs, stats=stats,
                               read_threads=config.data.read_threads, drop_remainder=drop_remainder,
                               packing=packing)


def full_batches(config, data: Data, source, limit: int | None = None, keep_ids: bool = False):
  """Every example of `source` once, in order, in full-size batches: a short last batch is padded by
  repeating its last row, and `valid_B` marks the real rows (so shapes stay divisible over the mesh)."""
  size = config.train.global_batch_size // jax.process_count()
  for i, batch in enumerate(batches(config, data, source, seed=0, shuffle=False, num_epochs=1,
                                    stats=pipeline.Stats(), drop_remainder=False, packing=False)):
    if limit is not None and i >= limit:
      return
    rows = len(next(iter(batch.values())))
    padded = {k: np.concatenate([v, np.repeat(v[-1:], size - rows, axis=0)]) for k, v in batch.items()
              if k != "example_id_B" or keep_ids}
    padded["valid_B"] = np.arange(size) < rows
    yield padded


def tokens(batch: dict) -> int:
  """Token slots of a host batch, padding included: every `*tokens_BxT` array (chosen and rejected both)."""
  return sum(v.size for k, v in batch.items() if k.endswith("tokens_BxT"))


def drop_ids(batch: dict) -> dict:
  """A host batch without the pipeline's `example_id_B` (the step does not take it)."""
  return {k: v for k, v in batch.items() if k != "example_id_B"}
