"""TFDS builders: every record accounted for; formats parsed right; bad input named and counted."""

import gzip
import json

import pytest

from rlhfx.data import builders
from rlhfx.data.builders import DataError


def _write_jsonl(path, records, raw_lines=()):
  lines = [json.dumps(r) for r in records] + list(raw_lines)
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "wt") as f:
    f.write("\n".join(lines) + "\n")
  return path


def test_hh_harmless_all_records_accounted_for(shared_data, tmp_path, capsys):
  path = shared_data("hh_rlhf/harmless-base-test.jsonl.gz")
  builder = builders.build("preference", [path], data_dir=tmp_path, input_format="hh", eval_fraction=0.1,
                           on_error="skip")
  counts = builders.counts(tmp_path)
  assert counts == dict(builder.stats)
  assert counts["read"] == 2312
  written = counts["written/train"] + counts["written/eval"]
  skipped = {k: v for k, v in counts.items() if k.startswith("skipped/")}
  assert written + sum(skipped.values()) == 2312
  # the data card: 2,307 pairs share everything up to the last "\n\nAssistant:"
  assert skipped["skipped/unsplittable"] == 5
  assert set(skipped) <= {"skipped/unsplittable", "skipped/empty_completion"}
  assert len(builders.data_source(tmp_path, "train")) == counts["written/train"]
  assert 0.05 < counts["written/eval"] / written < 0.15
  # prompts end at the assistant's turn; replies do not contain the marker's prefix
  example = builders.data_source(tmp_path, "eval")[0]
  assert example["prompt"].decode().endswith("\n\nAssistant:")
  assert example["prompt"].decode().startswith("\n\nHuman:")
  # no record text in what the build printed (red-team content)
  out = capsys.readouterr()
  assert "Human:" not in out.out + out.err


def test_hh_unpaired_makes_each_pair_two_labelled_examples_in_one_split(shared_data, tmp_path):
  """hh_unpaired (configs/kto_hh.py): the chosen reply desirable, the rejected one undesirable, as TRL's
  unpair_preference_dataset; a pair's two examples never straddle the train/eval split."""
  path = shared_data("hh_rlhf/harmless-base-test.jsonl.gz")
  builders.build("preference", [path], data_dir=tmp_path / "pairs", input_format="hh", eval_fraction=0.1,
                 on_error="skip")
  builders.build("unpaired", [path], data_dir=tmp_path / "unpaired", input_format="hh_unpaired", eval_fraction=0.1,
                 on_error="skip")
  pairs, unpaired = builders.counts(tmp_path / "pairs"), builders.counts(tmp_path / "unpaired")
  assert unpaired["read"] == 2312 and unpaired["skipped/unsplittable"] == 5
  assert unpaired["written/train"] + unpaired["written/eval"] == 2 * (pairs["written/train"] + pairs["written/eval"])
  splits = {}
  for split in ("train", "eval"):
    for example in builders.data_source(tmp_path / "unpaired", split):
      splits.setdefault(example["prompt"], []).append((split, bool(example["label"]), example["completion"]))
  want = {}
  for split in ("train", "eval"):
    for example in builders.data_source(tmp_path / "pairs", split):
      want.setdefault(example["prompt"], []).extend([(True, example["chosen"]), (False, example["rejected"])])
  assert sorted((label, text) for rows in splits.values() for _, label, text in rows) == sorted(
      pair for rows in want.values() for pair in rows)
  assert all(len({split for split, _, _ in rows}) == 1 for rows in splits.values())
  labels = [label for rows in splits.values() for _, label, _ in rows]
  assert labels.count(True) == labels.count(False)


def test_split_hh_on_synthetic_transcripts():
  chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: like this"
  rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: no"
  prompt, c, r = builders.split_hh(chosen, rejected)
  assert prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:"
  assert (c, r) == (" like this", " no")
  with pytest.raises(builders.RecordError, match="differ"):
    builders.split_hh(chosen, "\n\nHuman: other\n\nAssistant: no")


def test_sharegpt_demo_keeps_system_and_all_turns(shared_data, tmp_path):
  path = shared_data("sharegpt_dpo/dpo_en_demo.json")
  builder = builders.build("preference", [path], data_dir=tmp_path, input_format="sharegpt")
  raw = json.loads(path.read_text())
  assert builder.stats["written/train"] == len(raw) == 300
  source = builders.data_source(tmp_path)
  examples = [source[i] for i in range(len(source))]
  by_chosen = {e["chosen"].decode(): json.loads(e["messages"]) for e in examples}
  n_system = n_multi = 0
  for record in raw:
    messages = by_chosen[record["chosen"]["value"]]
    turns = record["conversations"]
    has_system = any(t["from"] == "system" for t in turns) or bool(record.get("system"))
    assert len(messages) == len(turns) + (1 if record.get("system") and not any(
        t["from"] == "system" for t in turns) else 0)
    assert messages[-1]["role"] == "user" and messages[-1]["content"] == turns[-1]["value"]
    n_system += has_system
    n_multi += len(turns) > 1
  assert n_system > 0 and n_multi > 0  # the demo really has both


def test_formats_pairs_unpaired_prompts_sft(tmp_path):
  pairs = _write_jsonl(tmp_path / "pairs.jsonl.gz", [
      {"prompt": "2+2=", "chosen": " 4", "rejected": " 5"},
      {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
       "rejected": [{"role": "assistant", "content": "go away"}]}])
  b = builders.build("preference", [pairs], data_dir=tmp_path / "p", input_format="pairs")
  assert b.stats["written/train"] == 2
  rows = sorted((builders.data_source(tmp_path / "p")[i] for i in range(2)), key=lambda e: e["prompt"])
  assert rows[0]["prompt"] == b"" and json.loads(rows[0]["messages"]) == [{"role": "user", "content": "hi"}]
  assert rows[0]["chosen"] == b"hello" and rows[1]["chosen"] == b" 4"

  unpaired = _write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "q", "completion": "a", "label": True},
                                                    {"prompt": "q", "completion": "b", "label": 0}])
  builders.build("unpaired", [unpaired], data_dir=tmp_path / "u", input_format="unpaired")
  labels = sorted(bool(builders.data_source(tmp_path / "u")[i]["label"]) for i in range(2))
  assert labels == [False, True]

  prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Once"}, {"messages": [
      {"role": "user", "content": "tell a story"}]}])
  assert builders.build("prompts", [prompts], data_dir=tmp_path / "q", input_format="prompts"
                        ).stats["written/train"] == 2

  sft = _write_jsonl(tmp_path / "sft.jsonl", [{"messages": [
      {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "hello"}]}, {"prompt": "a", "completion": "b"}])
  builders.build("sft", [sft], data_dir=tmp_path / "s", input_format="sft")
  rows = [builders.data_source(tmp_path / "s")[i] for i in range(2)]
  chat = next(r for r in rows if r["messages"])
  assert [m["role"] for m in json.loads(chat["messages"])] == ["system", "user"]
  assert chat["completion"] == b"hello"


def test_manual_dir(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  _write_jsonl(manual / "a.jsonl", [{"prompt": "x", "chosen": "y", "rejected": "z"}])
  b = builders.build("preference", None, data_dir=tmp_path / "d", input_format="pairs", manual_dir=manual)
  assert b.stats["written/train"] == 1


def test_split_is_deterministic_and_order_free(tmp_path):
  records = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(200)]
  _write_jsonl(tmp_path / "a.jsonl", records)
  _write_jsonl(tmp_path / "b.jsonl", records[::-1])
  evals = []
  for name in "ab":
    builders.build("preference", [tmp_path / f"{name}.jsonl"], data_dir=tmp_path / name, input_format="pairs",
                   eval_fraction=0.2)
    source = builders.data_source(tmp_path / name, "eval")
    evals.append(sorted(source[i]["prompt"] for i in range(len(source))))
  assert evals[0] == evals[1] and 20 < len(evals[0]) < 60


BAD_LINES = {
    "malformed_json": '{"prompt": "a", "chosen": ',
    "missing_field": json.dumps({"prompt": "a", "chosen": "b"}),
    "empty_completion": json.dumps({"prompt": "a", "chosen": "  ", "rejected": "c"}),
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_record_names_file_and_line(tmp_path, reason):
  path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2,
                      raw_lines=[BAD_LINES[reason]])
  with pytest.raises(DataError, match=r"bad\.jsonl:3: .*on_error='skip'"):
    builders.build("preference", [path], data_dir=tmp_path / "d", input_format="pairs")


def test_bad_records_skipped_and_counted(tmp_path):
  good = [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 3
  path = _write_jsonl(tmp_path / "bad.jsonl", good, raw_lines=list(BAD_LINES.values()) + ["[1, 2]"])
  b = builders.build("preference", [path], data_dir=tmp_path / "d", input_format="pairs", on_error="skip")
  assert dict(b.stats) == {"read": 7, "written/train": 3, "written/eval": 0, "skipped/malformed_json": 1,
                           "skipped/missing_field": 1, "skipped/empty_completion": 1, "skipped/not_an_object": 1}
  assert builders.counts(tmp_path / "d") == dict(b.stats)


def test_wrong_kind_for_format_and_missing_file(tmp_path):
  with pytest.raises(ValueError, match="input_format='hh' does not make sft data"):
    builders.build("sft", [tmp_path / "x.jsonl"], data_dir=tmp_path, input_format="hh")
  with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
    builders.build("preference", [tmp_path / "nope.jsonl"], data_dir=tmp_path / "d", input_format="pairs")


def test_stored_order_does_not_depend_on_the_file_path(tmp_path):
  records = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(50)]
  orders = []
  for name in ("one", "two"):
    (tmp_path / name).mkdir()
    path = _write_jsonl(tmp_path / name / f"{name}.jsonl", records)
    builders.build("preference", [path], data_dir=tmp_path / name / "d", input_format="pairs")
    source = builders.data_source(tmp_path / name / "d")
    orders.append([source[i]["prompt"] for i in range(len(source))])
  assert orders[0] == orders[1]
