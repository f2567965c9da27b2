"""TFDS builders for local files -> ArrayRecord datasets (no TensorFlow needed).

  path = builders.build("preference", ["harmless-base-test.jsonl.gz"], data_dir="data/hh", input_format="hh",
                        eval_fraction=0.05)
  source = builders.data_source("data/hh", split="train")    # random access, read by Grain

The records come from `rlhfx.data.formats` (input formats, kinds, bad-record handling);
each kind is one builder, and the split between train and eval is by content hash.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from rlhfx import hub
from rlhfx.data.formats import (KINDS, PARSERS, DataError, RecordError, is_eval, parse_files,  # noqa: F401
                                SPLIT_BY, split_hh)


# ----------------------------------------------------------------------------- TFDS builders


def _features(kind: str):
  text = tfds.features.Text()
  return tfds.features.FeaturesDict(
      {name: (tfds.features.Scalar(dtype=np.bool_) if name == "label" else text) for name in KINDS[kind]})


class LocalFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base builder: local files (explicit paths or the manual dir) of one input format -> train/eval splits."""

  VERSION = tfds.core.Version("1.0.0")
  KIND = ""
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put the .json / .jsonl (optionally .gz) input files in the manual dir."

  def __init__(self, *, paths: Sequence[str | os.PathLike] | None = None, input_format: str, eval_fraction: float = 0.0,
               split_seed: int = 0, on_error: str = "raise", **kwargs):
    if PARSERS.get(input_format, ("",))[0] != self.KIND:
      formats = sorted(f for f, (k, _) in PARSERS.items() if k == self.KIND)
      raise ValueError(f"input_format={input_format!r} does not make {self.KIND} data; use one of {formats}")
    self._paths = [hub.local_file(p) for p in paths] if paths else None  # an hf:// file: its cached copy
    self._input_format, self._eval_fraction, self._split_seed = input_format, eval_fraction, split_seed
    self._on_error = on_error
    self.stats: collections.Counter = collections.Counter()
    super().__init__(file_format="array_record", **kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=_features(self.KIND), metadata=tfds.core.MetadataDict(),
                                 description=f"rlhfx {self.KIND} examples from local files")

  def _split_generators(self, dl_manager):
    paths = self._paths
    if paths is None:
      paths = sorted(p for p in Path(dl_manager.manual_dir).iterdir() if ".json" in p.name)
    if not paths:
      raise DataError(f"{dl_manager.manual_dir}: no .json/.jsonl(.gz) files in the manual dir")
    examples = list(parse_files(paths, self._input_format, on_error=self._on_error, stats=self.stats))
    if not examples:
      names = ", ".join(str(p) for p in paths)
      skipped = {k.removeprefix("skipped/"): v for k, v in self.stats.items() if k.startswith("skipped/")}
      raise DataError(f"{names}: no records" if not self.stats["read"] and not skipped else
                      f"{names}: no usable records (read {self.stats['read']}, skipped {skipped})")
    splits = {"train": [], "eval": []}
    for index, (_, example) in enumerate(examples):  # keys by position: the stored order ignores file paths
      held_out = is_eval(example, self._eval_fraction, self._split_seed, SPLIT_BY.get(self._input_format))
      splits["eval" if held_out else "train"].append((index, example))
    if not splits["train"]:
      raise DataError(f"all {len(examples)} examples fell in the eval split (data.eval_fraction="
                      f"{self._eval_fraction}); lower it or give more data")
    for name, items in splits.items():
      self.stats[f"written/{name}"] = len(items)
    self.info.metadata.update({"counts": dict(self.stats), "input_format": self._input_format,
                               "files": [str(p) for p in paths]})
    skipped = {k: v for k, v in self.stats.items() if k.startswith("skipped/")}
    if skipped:
      logging.warning("%s: skipped %d of %d records: %s", self.name, sum(skipped.values()), self.stats["read"],
                      skipped)
    return {name: iter(items) for name, items in splits.items() if items}

  def _generate_examples(self, items):
    yield from items


class Preference(LocalFiles):
  KIND = "preference"


class Unpaired(LocalFiles):
  KIND = "unpaired"


class Prompts(LocalFiles):
  KIND = "prompts"


class Sft(LocalFiles):
  KIND = "sft"


BUILDERS = {"preference": Preference, "unpaired": Unpaired, "prompts": Prompts, "sft": Sft}


def build(kind: str, paths: Sequence[str | os.PathLike] | None, *, data_dir: str | os.PathLike,
          input_format: str, eval_fraction: float = 0.0, split_seed: int = 0, on_error: str = "raise",
          manual_dir: str | os.PathLike | None = None) -> LocalFiles:
  """Build (or reuse, if already built in `data_dir`) a dataset; returns the prepared builder.

  `builder.stats` holds the counts of this build (read, written/train, written/eval,
  skipped/<reason>); `builder.info.metadata["counts"]` holds them for a reused one.
  """
  if kind not in BUILDERS:
    raise ValueError(f"kind={kind!r}; expected one of {sorted(BUILDERS)}")
  builder = BUILDERS[kind](paths=paths, input_format=input_format, eval_fraction=eval_fraction,
                           split_seed=split_seed, on_error=on_error, data_dir=str(data_dir))
  config = tfds.download.DownloadConfig(manual_dir=str(manual_dir)) if manual_dir else None
  tfds.disable_progress_bar()
  with contextlib.redirect_stdout(io.StringIO()):  # TFDS's "Downloading and preparing dataset Unknown size ..."
    builder.download_and_prepare(download_config=config)
  return builder


def counts(data_dir: str | os.PathLike) -> dict[str, int]:
  """The counts a built dataset recorded (read, written/<split>, skipped/<reason>)."""
  return dict(tfds.builder_from_directory(_version_dir(data_dir)).info.metadata["counts"])


def _version_dir(data_dir: str | os.PathLike) -> str:
  """data_dir itself if it holds dataset_info.json, else the single <name>/<version> below it."""
  data_dir = Path(data_dir)
  if (data_dir / "dataset_info.json").exists():
    return str(data_dir)
  found = sorted(data_dir.glob("*/*/dataset_info.json"))
  if len(found) != 1:
    raise DataError(f"{data_dir}: expected one built dataset below it, found {len(found)}")
  return str(found[0].parent)


def data_source(data_dir: str | os.PathLike, split: str = "train"):
  """Random-access source of a built dataset (a `tfds.data_source`, read by Grain)."""
  builder = tfds.builder_from_directory(_version_dir(data_dir))
  if split not in builder.info.splits:
    raise DataError(f"{data_dir}: no split {split!r}; it has {sorted(builder.info.splits)}")
  return builder.as_data_source(split=split)
