"""Grain input pipelines: shuffle, tokenize, truncate, bucket-pad, batch, shard per process.

  source = builders.data_source("data/hh", "train")
  ds = pipeline.make_dataset(source, tokenizer, kind="preference", global_batch_size=32,
                             buckets=(128, 256, 512), truncation=Truncation(max_length=512))
  it = iter(ds); batch = next(it)                # dict of numpy arrays, this process's rows
  state = it.get_state(); ...; it.set_state(state)  # checkpointable (stored by the training spine)

Batches per kind (right padding; `loss_mask` is True on completion tokens only):

  preference  chosen_tokens_BxT, chosen_mask_BxT, chosen_loss_mask_BxT, rejected_... (one T for both)
  sft         tokens_BxT, mask_BxT, loss_mask_BxT
  unpaired    tokens_BxT, mask_BxT, loss_mask_BxT, label_B
  prompts     prompt_BxP, prompt_mask_BxP   (left padding, ready for sampling.generate)

and every batch has example_id_B: each row's index in the source (for per-example caches).

T is the smallest bucket that holds the longest row of the *global* batch, so a run
compiles at most len(buckets) programs and every process agrees on the shape.
Every process walks the same shuffled global stream and keeps rows
[process_index * B, (process_index + 1) * B) of each global batch.
"""

from __future__ import annotations

import collections
import json
import threading
from typing import Sequence

import grain
import numpy as np

from rlhfx.data import builders
from rlhfx.data.tokenize import Overlong, Truncation, encode_completion, encode_prompt, fit, layout


class Stats:
  """Thread-safe counters of what the pipeline did (encoded, truncated, skipped/overlong)."""

  def __init__(self):
    self._lock = threading.Lock()
    self.counts: collections.Counter = collections.Counter()

  def add(self, key: str, n: int = 1):
    with self._lock:
      self.counts[key] += n

  def snapshot(self) -> dict[str, int]:
    with self._lock:
      return dict(self.counts)


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class Encode:
  """One stored example -> variable-length token arrays (or None when skipped as over-long)."""

  def __init__(self, tokenizer, kind: str, truncation: Truncation, stats: Stats):
    self.tokenizer, self.kind, self.truncation, self.stats = tokenizer, kind, truncation, stats
    # prompts alone: the prompt limit is the whole limit
    self.prompt_only = Truncation(max_length=truncation.max_prompt_length + 1,
                                  max_prompt_length=truncation.max_prompt_length,
                                  prompt_side=truncation.prompt_side, on_overlong=truncation.on_overlong)

  def __call__(self, example: dict) -> dict | None:
    messages_json = _text(example["messages"])
    messages = json.loads(messages_json) if messages_json else []
    prompt_ids = encode_prompt(self.tokenizer, _text(example["prompt"]), messages)
    try:
      if self.kind == "prompts":
        out = {"prompt": np.asarray(fit(prompt_ids, [], self.prompt_only)[0], np.int32)}
        truncated = len(out["prompt"]) < len(prompt_ids)
      else:
        fields = ("chosen", "rejected") if self.kind == "preference" else ("completion",)
        out, truncated = {}, False
        for field in fields:
          completion_ids = encode_completion(self.tokenizer, _text(example[field]), messages)
          p, c, cut = fit(prompt_ids, completion_ids, self.truncation)
          tokens, loss_mask = layout(p, c)
          prefix = f"{field}_" if self.kind == "preference" else ""
          out[prefix + "tokens"], out[prefix + "loss_mask"] = tokens, loss_mask
          truncated |= cut
        if self.kind == "unpaired":
          out["label"] = np.asarray(bool(example["label"]))
    except Overlong as e:
      if self.truncation.on_overlong == "error":
        raise Overlong(f"{e} (set truncation.on_overlong='truncate' or 'skip')") from None
      self.stats.add("skipped/overlong")
      return None
    self.stats.add("encoded")
    if truncated:
      self.stats.add("truncated")
    out["example_id"] = np.asarray(example["_index"], np.int64)
    return out


def bucket_length(length: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if length <= b:
      return b
  raise ValueError(f"a row of {length} tokens is longer than the largest bucket {buckets[-1]}")


def _pad(rows: list[np.ndarray], length: int, left: bool = False, value=0) -> np.ndarray:
  out = np.full((len(rows), length), value, dtype=rows[0].dtype)
  for i, row in enumerate(rows):
    if left:
      out[i, length - len(row):] = row
    else:
      out[i, :len(row)] = row
  return out


class Collate:
  """A global batch of encoded examples -> this process's rows, padded to one bucket length."""

  def __init__(self, kind: str, buckets: Sequence[int], pad_id: int, process_index: int, process_count: int):
    self.kind, self.buckets, self.pad_id = kind, tuple(buckets), pad_id
    self.process_index, self.process_count = process_index, process_count

  def __call__(self, examples: Sequence[dict]) -> dict[str, np.ndarray]:
    if self.kind == "prompts":
      length = bucket_length(max(len(e["prompt"]) for e in examples), self.buckets)
      rows = _share(examples, self.process_index, self.process_count)
      prompts = [e["prompt"] for e in rows]
      return {"prompt_BxP": _pad(prompts, length, left=True, value=self.pad_id),
              "prompt_mask_BxP": _pad([np.ones(len(p), bool) for p in prompts], length, left=True, value=False),
              "example_id_B": np.stack([e["example_id"] for e in rows])}
    prefixes = ("chosen_", "rejected_") if self.kind == "preference" else ("",)
    length = bucket_length(max(len(e[p + "tokens"]) for e in examples for p in prefixes), self.buckets)
    rows = _share(examples, self.process_index, self.process_count)
    batch = {}
    for p in prefixes:
      tokens = [e[p + "tokens"] for e in rows]
      batch[p + "tokens_BxT"] = _pad(tokens, length, value=self.pad_id)
      batch[p + "mask_BxT"] = _pad([np.ones(len(t), bool) for t in tokens], length, value=False)
      batch[p + "loss_mask_BxT"] = _pad([e[p + "loss_mask"] for e in rows], length, value=False)
    if self.kind == "unpaired":
      batch["label_B"] = np.stack([e["label"] for e in rows])
    batch["example_id_B"] = np.stack([e["example_id"] for e in rows])
    return batch


def _share(items: Sequence, process_index: int, process_count: int) -> Sequence:
  """This process's rows of a global batch: the `process_index`-th of `process_count` equal slices. A short last
  batch (evaluation's, drop_remainder=False) is cut in slices of ceil(n / processes) rows, so that no row is left
  out; a process left without one gets a stand-in, the batch's last row with its example id i written -1 - i,
  which `prepare.full_batches` marks invalid (and turns back into i)."""
  local = -(-len(items) // process_count)
  share = list(items[process_index * local:(process_index + 1) * local])
  return share or [{**items[-1], "example_id": -1 - np.asarray(items[-1]["example_id"], np.int64)}]


def _packed_rows(tokens, loss_mask, segments, positions) -> dict[str, np.ndarray]:
  """The arrays of packed rows ([R, T] each); a sequence's first token is never a target (as in a row of its
  own: nothing before it to predict from), so no prediction crosses a segment boundary."""
  segments, positions = np.asarray(segments, np.int32), np.asarray(positions, np.int32)
  return {"tokens_BxT": np.asarray(tokens, np.int32), "mask_BxT": segments > 0,
          "loss_mask_BxT": np.asarray(loss_mask, bool) & (positions > 0), "segments_BxT": segments,
          "positions_BxT": positions}


class PackedCollate:
  """A global batch of packed rows (Grain's first-fit packing) -> this process's rows: tokens_BxT, mask_BxT,
  loss_mask_BxT, segments_BxT (0 on padding, 1, 2, ... per example) and positions_BxT (from 0 in each)."""

  def __init__(self, process_index: int, process_count: int):
    self.process_index, self.process_count = process_index, process_count

  def __call__(self, rows: Sequence[dict]) -> dict[str, np.ndarray]:
    rows = _share(rows, self.process_index, self.process_count)
    return _packed_rows(*(np.stack([r[k] for r in rows]) for k in ("tokens", "loss_mask", "tokens_segment_ids",
                                                                   "tokens_positions")))


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
  """Bins (lists of indices into `lengths`), each item in the first bin with room, in the given order.
  (Grain's FirstFitPackIterDataset packs a stream across batches; DPO packs within each batch of pairs.)"""
  bins: list[list[int]] = []
  room: list[int] = []
  for i, n in enumerate(lengths):
    j = next((j for j, r in enumerate(room) if r >= n), None)
    if j is None:
      bins.append([]), room.append(capacity)
      j = len(bins) - 1
    bins[j].append(i)
    room[j] -= n
  return bins


class PackedPairsCollate:
  """A global batch of encoded pairs -> this process's pairs, their 2P sequences (chosen i, rejected i) packed
  first-fit into rows of `length` tokens, as many rows as the fullest process needs, rounded up to
  `row_multiple` (so every process's rows split over its devices):

    tokens_BxT, mask_BxT, loss_mask_BxT, segments_BxT, positions_BxT   the packed rows (`_packed_rows`)
    chosen_index_B, rejected_index_B   where each pair's sequences are: global row x length + segment
    example_id_B                       the pairs' ids (for cached reference log-probs)
  """

  def __init__(self, length: int, row_multiple: int, pad_id: int, process_index: int, process_count: int):
    self.length, self.row_multiple, self.pad_id = length, row_multiple, pad_id
    self.process_index, self.process_count = process_index, process_count

  def __call__(self, examples: Sequence[dict]) -> dict[str, np.ndarray]:
    sides = ("chosen", "rejected")
    bins = [first_fit([len(e[f"{side}_tokens"]) for e in _share(examples, i, self.process_count) for side in sides],
                      self.length) for i in range(self.process_count)]  # every process's, for one shape
    rows = -(-max(len(b) for b in bins) // self.row_multiple) * self.row_multiple
    mine = _share(examples, self.process_index, self.process_count)
    tokens = np.full((rows, self.length), self.pad_id, np.int32)
    loss_mask = np.zeros((rows, self.length), bool)
    segments, positions = np.zeros((rows, self.length), np.int32), np.zeros((rows, self.length), np.int32)
    where = np.zeros(2 * len(mine), np.int64)
    for r, sequences in enumerate(bins[self.process_index]):
      offset = 0
      for segment, s in enumerate(sequences, 1):
        example, side = mine[s // 2], sides[s % 2]
        at = slice(offset, offset + len(example[f"{side}_tokens"]))
        tokens[r, at], loss_mask[r, at] = example[f"{side}_tokens"], example[f"{side}_loss_mask"]
        segments[r, at], positions[r, at] = segment, np.arange(at.stop - at.start)
        where[s] = (self.process_index * rows + r) * self.length + segment
        offset = at.stop
    return {**_packed_rows(tokens, loss_mask, segments, positions), "chosen_index_B": where[0::2],
            "rejected_index_B": where[1::2], "example_id_B": np.stack([e["example_id"] for e in mine])}


def make_dataset(source, tokenizer, *, kind: str, global_batch_size: int, buckets: Sequence[int],
                 truncation: Truncation = Truncation(), seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = 1, process_index: int | None = None, process_count: int | None = None,
                 drop_remainder: bool = True, stats: Stats | None = None, read_threads: int = 0,
                 packing: bool = False) -> grain.IterDataset:
  """A Grain IterDataset of padded batches (see the module docstring); `stats` collects its counters.

  `packing`: sft examples are packed first-fit into rows of the largest bucket's length
  (`grain.experimental.FirstFitPackIterDataset`, one bin per row of the global batch), with segment ids
  and per-example positions (`PackedCollate`); preference pairs keep `global_batch_size` pairs per batch
  and pack their chosen and rejected sequences into as few rows as they need (`PackedPairsCollate`, a
  multiple of the local device count). The model keeps attention inside each sequence.

  `read_threads` > 0 reads and tokenizes ahead in Grain threads; 0 does it on the
  calling thread, which is fastest on small CPU machines (threads fight the GIL)
  and still overlaps with the accelerator because steps are dispatched asynchronously.
  """
  if kind not in builders.KINDS:
    raise ValueError(f"kind={kind!r}; expected one of {sorted(builders.KINDS)}")
  if process_index is None or process_count is None:
    import jax

    process_index, process_count = jax.process_index(), jax.process_count()
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by the {process_count} processes")
  buckets = tuple(sorted(buckets))
  limit = truncation.max_prompt_length if kind == "prompts" else truncation.max_length
  if not buckets or buckets[-1] < limit:
    raise ValueError(f"buckets={buckets}: the largest bucket must be >= the truncation limit {limit}")
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  stats = stats if stats is not None else Stats()

  ds = grain.MapDataset.source(source).map_with_index(lambda i, e: {**e, "_index": i})  # ids for caches
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  ds = ds.map(Encode(tokenizer, kind, truncation, stats)).filter(lambda e: e is not None)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=256 if read_threads else 0))
  if packing and kind == "preference":
    import jax

    return ds.batch(global_batch_size, drop_remainder=drop_remainder, batch_fn=PackedPairsCollate(
        buckets[-1], jax.local_device_count(), pad_id, process_index, process_count))
  if packing:
    if kind != "sft":
      raise ValueError(f"packing is implemented for sft and preference data, not {kind}")
    ds = grain.experimental.FirstFitPackIterDataset(
        ds.map(lambda e: {"tokens": e["tokens"], "loss_mask": e["loss_mask"]}),
        length_struct={"tokens": buckets[-1], "loss_mask": buckets[-1]}, num_packing_bins=global_batch_size,
        seed=seed, shuffle_bins=shuffle)
    return ds.batch(global_batch_size, drop_remainder=drop_remainder,
                    batch_fn=PackedCollate(process_index, process_count))
  return ds.batch(global_batch_size, drop_remainder=drop_remainder,
                  batch_fn=Collate(kind, buckets, pad_id, process_index, process_count))

