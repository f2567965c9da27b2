"""A run's data: the ArrayRecord dataset built once from the config's files, its splits, the tokenizer, batches.

  data = prepare.prepare(config, workdir, kind="preference")
  train_iter = iter(prepare.batches(config, data, data.train, seed=config.seed))
  for batch in prepare.full_batches(config, data, data.eval): ...   # every example once (evaluation)

A dataset is built in `<data.dir or workdir/data>/<recipe key>/`: the key hashes its recipe
(kind, input format, split, error policy, seed, built-in task, and each input file's size and
SHA-256), which `recipe.json` holds with the size of every file the build wrote. Before a
dataset is used it is checked against both: another recipe is another folder (a shared data.dir
holds one per recipe), and a file missing or of another size (a copy cut short, a deleted split)
is said in one line and the dataset rebuilt from its inputs. Builds of one data.dir take turns
(a lock on `<dir>/.build.lock`).

A gs:// workdir's dataset is built on local disk, `storage.cache_root()/data/<recipe key>`, by every
host (the build is deterministic): Grain reads ArrayRecord files at random offsets, which local disk
serves in microseconds and a bucket in tens of milliseconds, and the key already names the inputs'
bytes, so a cached build is reused by every run of the same recipe on that machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlhfx import sharding, storage, workdir as workdirs
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


RECIPE = "recipe.json"


def recipe(config, kind: str) -> dict:
  """What a built dataset is made from: a change of any of it is another dataset."""
  d = config.data
  return {"kind": kind, "input_format": d.input_format, "eval_fraction": d.eval_fraction, "on_error": d.on_error,
          "seed": config.seed, "builtin": d.builtin, "train_files": [str(f) for f in d.train_files],
          "inputs": workdirs.fingerprints(config)}


def _inventory(data_dir: Path) -> dict[str, int]:
  return {str(p.relative_to(data_dir)): p.stat().st_size for p in sorted(data_dir.rglob("*"))
          if p.is_file() and p.name != RECIPE}


def check(data_dir: Path, wanted: dict) -> str | None:
  """Why the dataset in `data_dir` cannot be used for `wanted` (None: it can; "" when none was built there)."""
  if not (data_dir / RECIPE).exists():
    return "" if not data_dir.exists() else f"{data_dir} holds no complete build ({RECIPE} missing)"
  try:
    saved = json.loads((data_dir / RECIPE).read_text())
    built, files = saved["recipe"], saved["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"{data_dir / RECIPE} cannot be read ({type(e).__name__})"
  if built != wanted:
    return f"{data_dir} was built from another recipe"
  found = _inventory(data_dir)
  for name, size in files.items():
    if name not in found:
      return f"{data_dir / name} is missing"
    if found[name] != size:
      return f"{data_dir / name} has {found[name]} bytes, {size} when built"
  return None


@contextlib.contextmanager
def _build_lock(base: Path):
  """Builds of one data directory take turns (a second run waits, then finds the dataset built)."""
  base.mkdir(parents=True, exist_ok=True)
  fd = os.open(base / ".build.lock", os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f"data: waiting for another run building in {base}", flush=True)
      fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)


def _build(config, kind: str, data_dir: Path, wanted: dict) -> None:
  """Build (process 0) the dataset of `wanted` into `data_dir`, then write its recipe and file sizes."""
  d = config.data
  files = [data_dir / "raw" / f"{d.builtin}.jsonl"] if d.builtin else list(d.train_files)
  if d.builtin:
    synthetic.write_task(d.builtin, files[0], seed=config.seed)
  if not files:
    raise ConfigError("config.data.train_files is empty (and config.data.builtin is not set)")
  print(f"data: building the {kind} dataset from {len(files)} file(s) into {data_dir}", flush=True)
  t0 = time.perf_counter()
  stats = builders.build(kind, files, data_dir=data_dir, input_format=d.input_format, eval_fraction=d.eval_fraction,
                         split_seed=config.seed, on_error=d.on_error).stats
  print(f"data: built in {time.perf_counter() - t0:.1f} s: {stats.get('written/train', 0)} train / "
        f"{stats.get('written/eval', 0)} eval examples", flush=True)
  tmp = data_dir / f"{RECIPE}.tmp"
  tmp.write_text(json.dumps({"recipe": wanted, "files": _inventory(data_dir)}, indent=1))
  os.replace(tmp, data_dir / RECIPE)


def dataset_dir(config, workdir: Path, kind: str) -> Path:
  """The checked (or freshly built) dataset of this run's recipe (process 0 builds; every process waits)."""
  if storage.is_remote(config.data.dir):
    raise ConfigError(f"config.data.dir={config.data.dir!r}: a dataset is read from local disk; leave it '' (a gs:// "
                      f"workdir's dataset is built under {storage.cache_root() / 'data'}) or name a local folder")
  cached = storage.is_remote(workdir) and not config.data.dir  # every host builds its own copy, kept for reuse
  base = Path(config.data.dir) if config.data.dir else storage.cache_root() / "data" if cached else workdir / "data"
  wanted = recipe(config, kind)
  key = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:16]
  data_dir = base / key
  if jax.process_index() == 0 or cached:
    with _build_lock(base):
      problem = check(data_dir, wanted)
      if problem is not None:
        if problem:
          print(f"data: {problem}: rebuilding the dataset from its inputs", flush=True)
        shutil.rmtree(data_dir, ignore_errors=True)
        _build(config, kind, data_dir, wanted)
      if not config.data.dir and not cached:  # the workdir's own data: builds of earlier recipes are derived, not kept
        for other in base.iterdir():
          if other.is_dir() and other != data_dir:
            shutil.rmtree(other, ignore_errors=True)
  sharding.sync("data_built")
  return data_dir


def prepare(config, workdir: Path, kind: str) -> Data:
  """The run's dataset (`dataset_dir`: checked, built when needed), its splits and the tokenizer."""
  d = config.data
  data_dir = dataset_dir(config, workdir, kind)
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
  repeating its last row, and `valid_B` marks the real rows (so shapes stay divisible over the mesh). With several
  processes each pads its own share of the short batch, none of its rows left out (`pipeline._share`)."""
  size = config.train.global_batch_size // jax.process_count()
  for i, batch in enumerate(batches(config, data, source, seed=0, shuffle=False, num_epochs=1,
                                    stats=pipeline.Stats(), drop_remainder=False, packing=False)):
    if limit is not None and i >= limit:
      return
    ids_B = batch["example_id_B"]
    rows = int(np.sum(ids_B >= 0))  # a stand-in row (pipeline._share: id -1 - i) is no example of this process
    batch["example_id_B"] = np.where(ids_B < 0, -1 - ids_B, ids_B)
    padded = {k: np.concatenate([v, np.repeat(v[-1:], size - len(v), axis=0)]) for k, v in batch.items()
              if k != "example_id_B" or keep_ids}
    padded["valid_B"] = np.arange(size) < rows
    yield padded


def tokens(batch: dict) -> int:
  """Token slots of a host batch, padding included: every `*tokens_BxT` array (chosen and rejected both)."""
  return sum(v.size for k, v in batch.items() if k.endswith("tokens_BxT"))


def drop_ids(batch: dict) -> dict:
  """A host batch without the pipeline's `example_id_B` (the step does not take it)."""
  return {k: v for k, v in batch.items() if k != "example_id_B"}
