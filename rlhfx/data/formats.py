"""Input files -> normalised examples: the input formats, the kinds of data they make, bad records.

  for location, example in formats.parse_files(["pairs.jsonl"], "pairs", on_error="skip", stats=counter): ...

Kinds and their record fields (strings; chat turns as a JSON list of {"role", "content"}):

  preference  prompt, messages, chosen, rejected
  unpaired    prompt, messages, completion, label      (KTO)
  prompts     prompt, messages, extra                   (PPO / GRPO; extra: the record's other fields as a
                                                         JSON object, e.g. a gold answer for reward functions)
  sft         prompt, messages, completion

`prompt` holds raw text, `messages` the conversation before the completion; one
of the two is empty. Input formats (JSONL or a JSON array, optionally gzipped; Parquet; a
`datasets.save_to_disk` folder; a hub dataset id "org/name[:split]"):

  pairs     {"prompt", "chosen", "rejected"}: strings, or TRL's conversational form
            (prompt = list of messages, chosen/rejected = [assistant message])
  hh        Anthropic HH {"chosen", "rejected"} transcripts, split at the last shared "\\n\\nAssistant:"
  sharegpt  {"conversations": [{"from", "value"}...], "chosen": {...}, "rejected": {...}, "system"?}
  unpaired  {"prompt", "completion", "label"}
  prompts   {"prompt"} or {"messages"}, and any other fields (kept in `extra` for reward functions)
  sft       {"prompt", "completion"} or {"messages"} (the last message is the assistant reply)
  hh_chosen Anthropic HH transcripts as SFT data: the prompt and the chosen reply
  hh_prompts Anthropic HH transcripts as RL prompts: the conversation up to the last "\n\nAssistant:"
  hh_unpaired Anthropic HH pairs as KTO data: each pair two examples, the chosen reply desirable (label 1)
            and the rejected one undesirable (label 0), both in the same split (split by prompt)

Bad records raise `DataError` naming file:line by default; with on_error="skip"
they are counted by reason, logged, and stored in the dataset's metadata
(`dataset_info.json`), never dropped silently.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from typing import Any, Callable, Iterator, Sequence

from rlhfx.data.files import DataError, RecordError, is_hub_dataset, read_records  # noqa: F401 (re-exported)


KINDS = {
    "preference": ("prompt", "messages", "chosen", "rejected"),
    "unpaired": ("prompt", "messages", "completion", "label"),
    "prompts": ("prompt", "messages", "extra"),
    "sft": ("prompt", "messages", "completion"),
}
HH_MARKER = "\n\nAssistant:"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


# ----------------------------------------------------------------------------- parsers


def _field(record: dict, name: str, kind=str):
  if not isinstance(record, dict):
    raise RecordError("not_an_object", "record is not a JSON object")
  if name not in record or record[name] is None:
    raise RecordError("missing_field", f"missing field {name!r}")
  value = record[name]
  if not isinstance(value, kind):
    raise RecordError("wrong_type", f"field {name!r} is {type(value).__name__}, expected {kind}")
  return value


def _messages(turns: list, field: str) -> list[dict]:
  out = []
  for i, turn in enumerate(turns):
    if not isinstance(turn, dict):
      raise RecordError("wrong_type", f"{field}[{i}] is not an object")
    role = turn.get("role", turn.get("from"))
    content = turn.get("content", turn.get("value"))
    if role not in _ROLES or not isinstance(content, str):
      raise RecordError("bad_message", f"{field}[{i}] needs a known role and string content")
    out.append({"role": _ROLES[role], "content": content})
  return out


def _completion(value, field: str) -> str:
  """A completion given as a string, an assistant message, or a one-message list."""
  if isinstance(value, list) and len(value) == 1:
    value = value[0]
  if isinstance(value, dict):
    value = _messages([value], field)[0]["content"]
  if not isinstance(value, str):
    raise RecordError("wrong_type", f"field {field!r} is not a string or an assistant message")
  if not value.strip():
    raise RecordError("empty_completion", f"field {field!r} is empty")
  return value


def _prompt(record: dict, field: str = "prompt") -> tuple[str, str]:
  """(prompt text, messages JSON) from a string or a list of messages."""
  value = record.get(field) if isinstance(record, dict) else None
  if isinstance(value, list):
    messages = _messages(value, field)
    if not messages or messages[-1]["role"] != "user":
      raise RecordError("bad_message", f"{field}: the last turn before a completion must be the user's")
    return "", json.dumps(messages)
  return _field(record, field), ""


def _pairs(record):
  prompt, messages = _prompt(record)
  return dict(prompt=prompt, messages=messages, chosen=_completion(_field(record, "chosen", (str, list, dict)),
                                                                   "chosen"),
              rejected=_completion(_field(record, "rejected", (str, list, dict)), "rejected"))


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
  """(prompt, chosen reply, rejected reply) of two HH transcripts sharing all up to the last "\\n\\nAssistant:"."""
  i, j = chosen.rfind(HH_MARKER), rejected.rfind(HH_MARKER)
  if i < 0 or j < 0 or chosen[:i] != rejected[:j]:
    raise RecordError("unsplittable", "chosen and rejected differ before their last '\\n\\nAssistant:'")
  end = i + len(HH_MARKER)
  return chosen[:end], chosen[end:], rejected[end:]


def _hh(record):
  prompt, chosen, rejected = split_hh(_field(record, "chosen"), _field(record, "rejected"))
  return dict(prompt=prompt, messages="", chosen=_completion(chosen, "chosen"),
              rejected=_completion(rejected, "rejected"))


def _hh_chosen(record):
  example = _hh(record)
  return dict(prompt=example["prompt"], messages="", completion=example["chosen"])


def _hh_prompts(record):
  example = _hh(record)
  return dict(prompt=example["prompt"], messages="", extra="")


def _hh_unpaired(record):
  """Two examples of one pair (TRL's `unpair_preference_dataset` does the same)."""
  example = _hh(record)
  return [dict(prompt=example["prompt"], messages="", completion=example[side], label=side == "chosen")
          for side in ("chosen", "rejected")]


def _sharegpt(record):
  messages = _messages(_field(record, "conversations", list), "conversations")
  system = record.get("system")
  if isinstance(system, str) and system and not any(m["role"] == "system" for m in messages):
    messages.insert(0, {"role": "system", "content": system})
  if not messages or messages[-1]["role"] != "user":
    raise RecordError("bad_message", "conversations must end with a user turn")
  return dict(prompt="", messages=json.dumps(messages), chosen=_completion(_field(record, "chosen", dict), "chosen"),
              rejected=_completion(_field(record, "rejected", dict), "rejected"))


def _unpaired(record):
  prompt, messages = _prompt(record)
  label = _field(record, "label", (bool, int))
  if label not in (0, 1):
    raise RecordError("wrong_type", "field 'label' must be true/false or 0/1")
  return dict(prompt=prompt, messages=messages, completion=_completion(record.get("completion"), "completion"),
              label=bool(label))


def _prompts(record):
  if isinstance(record, dict) and "messages" in record and "prompt" not in record:
    prompt, messages = _prompt(record, "messages")
  else:
    prompt, messages = _prompt(record)
  if not (prompt.strip() or messages):
    raise RecordError("empty_prompt", "field 'prompt' is empty")
  extra = {k: v for k, v in record.items() if k not in ("prompt", "messages")} if isinstance(record, dict) else {}
  try:
    return dict(prompt=prompt, messages=messages, extra=json.dumps(extra, default=_plain) if extra else "")
  except TypeError as e:
    raise RecordError("wrong_type", f"a field is not JSON-like ({e})") from None


def _plain(value):
  """JSON for the NumPy values that Parquet and `datasets` rows hold."""
  if hasattr(value, "tolist"):
    return value.tolist()
  raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _sft(record):
  if isinstance(record, dict) and "messages" in record and "prompt" not in record:
    turns = _messages(_field(record, "messages", list), "messages")
    if len(turns) < 2 or turns[-1]["role"] != "assistant" or turns[-2]["role"] != "user":
      raise RecordError("bad_message", "messages must end with a user turn then the assistant reply")
    return dict(prompt="", messages=json.dumps(turns[:-1]), completion=_completion(turns[-1]["content"], "messages"))
  prompt, messages = _prompt(record)
  return dict(prompt=prompt, messages=messages, completion=_completion(record.get("completion"), "completion"))


PARSERS: dict[str, tuple[str, Callable[[Any], dict]]] = {
    # input format -> (kind, parser)
    "pairs": ("preference", _pairs),
    "hh": ("preference", _hh),
    "hh_chosen": ("sft", _hh_chosen),
    "hh_prompts": ("prompts", _hh_prompts),
    "hh_unpaired": ("unpaired", _hh_unpaired),
    "sharegpt": ("preference", _sharegpt),
    "unpaired": ("unpaired", _unpaired),
    "prompts": ("prompts", _prompts),
    "sft": ("sft", _sft),
}


# formats whose examples are split by some fields only (the examples made from one record stay together)
SPLIT_BY = {"hh_unpaired": ("prompt", "messages")}


def is_eval(example: dict, eval_fraction: float, seed: int = 0, fields: Sequence[str] | None = None) -> bool:
  """Deterministic split by content hash (of `fields` only when given): the same example lands in the same split
  whatever the file order."""
  example = {k: v for k, v in example.items() if k != "extra" and (fields is None or k in fields)}
  digest = hashlib.sha256((str(seed) + json.dumps(example, sort_keys=True)).encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def parse_files(paths: Sequence[str | os.PathLike], input_format: str, *, on_error: str = "raise",
                stats: collections.Counter | None = None) -> Iterator[tuple[str, dict]]:
  """(location, normalised example) for every good record; bad ones raise or are counted in `stats`."""
  if input_format not in PARSERS:
    raise ValueError(f"input_format={input_format!r}; expected one of {sorted(PARSERS)}")
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error={on_error!r}; expected raise or skip")
  stats = collections.Counter() if stats is None else stats
  _, parser = PARSERS[input_format]
  for path in paths:
    for location, record in read_records(path, on_error):
      if not (isinstance(record, RecordError) and record.reason == "truncated_file"):  # not a record: the rest
        stats["read"] += 1
      try:
        if isinstance(record, RecordError):
          raise record
        examples = parser(record)
      except RecordError as e:
        if on_error == "raise":
          raise DataError(f"{location}: {e} (set on_error='skip' to skip and count such records)") from None
        stats[f"skipped/{e.reason}"] += 1
        continue
      for example in examples if isinstance(examples, list) else [examples]:  # a record may make several
        yield location, example
