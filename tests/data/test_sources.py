"""Inputs as researchers have them: Parquet files, `datasets.save_to_disk` folders and hub dataset ids, in TRL's
standard (strings) and conversational (message lists) preference formats: the same examples as from JSONL."""

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhfx.data import builders, files, formats
from rlhfx.data.builders import DataError

RECORDS = [
    {"prompt": "2+2=", "chosen": " 4", "rejected": " 5"},
    {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
     "rejected": [{"role": "assistant", "content": "go away"}]},
]


def _jsonl(tmp_path, records):
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def _examples(path, input_format="pairs"):
  return [example for _, example in formats.parse_files([path], input_format)]


@pytest.mark.parametrize("records", [RECORDS[:1], RECORDS[1:]], ids=["standard", "conversational"])
def test_parquet_and_saved_datasets_give_the_jsonl_examples(tmp_path, records):
  want = _examples(_jsonl(tmp_path, records))
  pq.write_table(pa.Table.from_pylist(records), tmp_path / "pairs.parquet")
  datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
  datasets.DatasetDict({"train": datasets.Dataset.from_list(records),
                        "test": datasets.Dataset.from_list(RECORDS[:1])}).save_to_disk(str(tmp_path / "dict"))
  assert _examples(tmp_path / "pairs.parquet") == want
  assert _examples(tmp_path / "saved") == want
  assert _examples(tmp_path / "dict") == want  # a DatasetDict: its train split


def test_a_parquet_file_builds_a_dataset_and_bad_rows_are_named(tmp_path):
  rows = RECORDS + [{"prompt": "q", "chosen": None, "rejected": "r"}]
  pq.write_table(pa.Table.from_pylist([{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()}
                                       for r in rows[:1] + rows[2:]]), tmp_path / "bad.parquet")
  with pytest.raises(DataError, match=r"bad.parquet:row 1: "):
    builders.build("preference", [tmp_path / "bad.parquet"], data_dir=tmp_path / "b", input_format="pairs")
  b = builders.build("preference", [tmp_path / "bad.parquet"], data_dir=tmp_path / "s", input_format="pairs",
                     on_error="skip")
  assert b.stats["written/train"] == 1 and sum(v for k, v in b.stats.items() if k.startswith("skipped/")) == 1


def test_unreadable_sources_are_one_line(tmp_path, monkeypatch):
  (tmp_path / "x.parquet").write_bytes(b"not parquet")
  with pytest.raises(DataError, match="x.parquet: not a readable Parquet file"):
    _examples(tmp_path / "x.parquet")
  (tmp_path / "folder").mkdir()
  with pytest.raises(DataError, match="folder: a folder, but not one written by datasets.save_to_disk"):
    _examples(tmp_path / "folder")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  assert formats.is_hub_dataset("someorg/pairs") and not formats.is_hub_dataset(str(tmp_path / "pairs.jsonl"))
  with pytest.raises(DataError, match="someorg/pairs: not a local file, and loading it as a hub dataset failed"):
    _examples("someorg/pairs")
  datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS[:1])}).save_to_disk(str(tmp_path / "d"))
  with pytest.raises(DataError, match="no split 'validation' \\(splits: train\\)"):
    files._split("d", datasets.load_from_disk(str(tmp_path / "d")), "validation")
