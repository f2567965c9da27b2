"""Reading input files record by record: JSONL or a JSON array (gzip accepted), Parquet, a `datasets.save_to_disk`
folder, a hub dataset id "org/name[:split]", a hub repository's file "hf://datasets/org/name/path"
(`rlhfx.hub`). A record that cannot be read is a `RecordError` in the stream, so
the caller counts or raises it with its file:line (`rlhfx.data.formats`).
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from pathlib import Path
from typing import Any, Iterator

from rlhfx import hub


class DataError(ValueError):
  """A bad input record; the message names file:line and the reason, never the record's text."""


class RecordError(ValueError):
  """Raised by a parser; `reason` is the counter key (e.g. "missing_field")."""

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason = reason


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
  """(line number, bytes) of a file, gunzipped when it ends in .gz; a damaged or truncated .gz ends the lines
  with DataError naming the file and the last line read."""
  opener = gzip.open if path.suffix == ".gz" else open
  lineno = 0
  try:
    with opener(path, "rb") as f:
      for lineno, line in enumerate(f, 1):
        yield lineno, line
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise DataError(f"{path}: damaged or truncated compressed file after line {lineno} "
                    f"({type(e).__name__}: {e})") from None


def is_hub_dataset(name: str) -> bool:
  """A `data.train_files` entry that is a hub dataset id ("org/name", optionally ":split"), not a local path."""
  return not hub.is_hub_file(name) and hub.is_repo_id(name.split(":")[0])


def read_records(path: str | os.PathLike, on_error: str = "raise") -> Iterator[tuple[str, Any]]:
  """(location, record or RecordError) for each record of a JSONL or JSON-array file (gzip accepted), a Parquet
  file, a folder written by `datasets.save_to_disk`, or a hub dataset id ("org/name[:split]", read through
  `datasets.load_dataset`: the local hub cache when offline).

  A line that is not UTF-8 is a RecordError("undecodable"). A truncated .gz file raises DataError; with
  on_error="skip" the records before the damage are kept and the loss is one RecordError("truncated_file")."""
  if is_hub_dataset(str(path)):
    yield from _hub_dataset(str(path))
    return
  path = hub.local_file(path)  # an hf:// file: its copy in the Hugging Face cache
  if not path.exists():
    raise DataError(f"{path}: file not found")
  if path.is_dir():
    yield from _saved_dataset(path)
    return
  if path.suffix == ".parquet":
    yield from _parquet(path)
    return
  if path.name.removesuffix(".gz").endswith(".json"):
    yield from _json_array(path)
    return
  try:
    for lineno, raw in _lines(path):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield f"{path}:{lineno}", RecordError("undecodable", f"not UTF-8 (byte {e.start}: {raw[e.start]:#04x})")
        continue
      if not line.strip():
        continue
      try:
        yield f"{path}:{lineno}", json.loads(line)
      except json.JSONDecodeError as e:
        yield f"{path}:{lineno}", RecordError("malformed_json", f"malformed JSON ({e.msg})")
  except DataError as e:
    if on_error == "raise":
      raise
    yield str(path), RecordError("truncated_file", str(e).removeprefix(f"{path}: "))


def _parquet(path: Path) -> Iterator[tuple[str, Any]]:
  import pyarrow.parquet as pq

  try:
    table = pq.ParquetFile(path)
  except Exception as e:  # noqa: BLE001 (pyarrow's errors for a damaged file: one line naming it)
    raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
  row = 0
  for batch in table.iter_batches(batch_size=1024):
    for record in batch.to_pylist():
      yield f"{path}:row {row}", record
      row += 1


def _rows(name: str, dataset) -> Iterator[tuple[str, Any]]:
  for i, record in enumerate(dataset):
    yield f"{name}[{i}]", record


def _split(name: str, datasets_by_split, split: str | None):
  """One split of a DatasetDict: the named one, or "train"."""
  split = split or "train"
  if split not in datasets_by_split:
    raise DataError(f"{name}: no split {split!r} (splits: {', '.join(datasets_by_split)}); name one as "
                    f"'{name}:<split>'")
  return datasets_by_split[split]


def _saved_dataset(path: Path) -> Iterator[tuple[str, Any]]:
  """A folder written by `datasets.save_to_disk` (a Dataset, or a DatasetDict: its "train" split)."""
  import datasets

  if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
    raise DataError(f"{path}: a folder, but not one written by datasets.save_to_disk (no dataset_info.json or "
                    "dataset_dict.json)")
  loaded = datasets.load_from_disk(str(path))
  if isinstance(loaded, datasets.DatasetDict):
    loaded = _split(str(path), loaded, None)
  yield from _rows(str(path), loaded)


def _hub_dataset(spec: str) -> Iterator[tuple[str, Any]]:
  """A hub dataset id, "org/name" or "org/name:split" (default train), through the local cache when offline."""
  import datasets

  name, _, split = spec.partition(":")
  try:
    loaded = datasets.load_dataset(name)
  except Exception as e:  # noqa: BLE001 (offline and not cached, unknown id, ...: one line)
    raise DataError(f"{spec}: not a local file, and loading it as a hub dataset failed "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
  yield from _rows(spec, _split(name, loaded, split or None))


def _json_array(path: Path) -> Iterator[tuple[str, Any]]:
  try:
    text = b"".join(line for _, line in _lines(path)).decode("utf-8")
    records = json.loads(text)
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 at byte {e.start}") from None
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from e
  if not isinstance(records, list):
    raise DataError(f"{path}: expected a JSON array of records")
  for i, record in enumerate(records):
    yield f"{path}:record {i}", record
