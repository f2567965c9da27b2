"""Packed SFT batches: every example once, attention inside each, the same per-example losses as one per row."""

import jax
import numpy as np
import pytest

from rlhfx.algorithms import sft
from rlhfx.data.pipeline import make_dataset
from rlhfx.data.tokenize import Truncation, load_tokenizer
from rlhfx.models import Transformer, get_preset, init_params

ROW = 128


def _source(n=24, seed=0):
  rng = np.random.default_rng(seed)
  words = ["alpha", "beta", "gamma", "delta", "eps", "zeta"]
  return [{"prompt": " ".join(rng.choice(words, rng.integers(1, 6))).encode() + b" =",
           "completion": (" " + " ".join(rng.choice(words, rng.integers(1, 5)))).encode(), "messages": b""}
          for _ in range(n)]


def _batches(packing, n=24, batch=8):
  tok = load_tokenizer("builtin:bytes")
  ds = make_dataset(_source(n), tok, kind="sft", global_batch_size=batch, buckets=(ROW,), shuffle=False,
                    truncation=Truncation(max_length=ROW, max_prompt_length=64), packing=packing,
                    drop_remainder=False, process_index=0, process_count=1)
  return list(ds)


def _per_example_nll(batch, params, model):
  """[(tokens of the example, its completion NLL sum)] from a batch, packed or not."""
  logps = np.asarray(jax.jit(lambda p, b: sft.token_logps(p, b, model=model))(params, batch))
  segments = batch.get("segments_BxT", batch["mask_BxT"].astype(np.int32))
  out = []
  for row in range(len(segments)):
    for s in range(1, segments[row].max() + 1):
      at = segments[row] == s
      loss = batch["loss_mask_BxT"][row] & at
      loss[np.argmax(at)] = False  # the first token of an example is never a target
      out.append((tuple(batch["tokens_BxT"][row][at]), float(-logps[row][loss].sum())))
  return out


def test_packed_rows_hold_every_example_once_with_positions_from_zero():
  unpacked, packed = _batches(False), _batches(True)
  rows = lambda batches: sum(len(b["tokens_BxT"]) for b in batches)
  assert rows(packed) < rows(unpacked)  # fewer rows: that is the point
  examples = lambda batches, key: sorted(
      tuple(b["tokens_BxT"][r][b[key][r] == s]) if key == "segments_BxT" else tuple(b["tokens_BxT"][r][b[key][r]])
      for b in batches for r in range(len(b["tokens_BxT"]))
      for s in (range(1, b[key][r].max() + 1) if key == "segments_BxT" else [1]))
  assert examples(packed, "segments_BxT") == examples(unpacked, "mask_BxT")
  for b in packed:
    for r in range(len(b["tokens_BxT"])):
      for s in range(1, b["segments_BxT"][r].max() + 1):
        at = b["segments_BxT"][r] == s
        assert list(b["positions_BxT"][r][at]) == list(range(at.sum()))
        assert not b["loss_mask_BxT"][r][np.argmax(at)]
  padding = lambda batches: 1 - sum(b["mask_BxT"].sum() for b in batches) / sum(b["mask_BxT"].size for b in batches)
  assert padding(packed) < 0.5 * padding(unpacked)


@pytest.mark.parametrize("attention", ["xla", "splash"])
def test_packed_per_example_losses_equal_one_example_per_row(attention):
  config = get_preset("tiny").replace(vocab_size=512, max_seq_len=ROW, attention=attention)
  params = init_params(config, jax.random.key(0))
  model = Transformer(config)
  unpacked = sorted(x for b in _batches(False) for x in _per_example_nll(b, params, model))
  packed = sorted(x for b in _batches(True) for x in _per_example_nll(b, params, model))
  assert [t for t, _ in packed] == [t for t, _ in unpacked] and len(packed) == 24
  np.testing.assert_allclose([v for _, v in packed], [v for _, v in unpacked], rtol=2e-5, atol=2e-5)


def _pairs_source(n=16, seed=0):
  rng = np.random.default_rng(seed)
  words = ["alpha", "beta", "gamma", "delta", "eps", "zeta"]
  say = lambda k: " " + " ".join(rng.choice(words, rng.integers(1, k)))
  return [{"prompt": (say(5) + " =").encode(), "chosen": say(6).encode(), "rejected": say(4).encode(), "messages": b""}
          for _ in range(n)]


def _pair_batches(packing, batch=8):
  ds = make_dataset(_pairs_source(), load_tokenizer("builtin:bytes"), kind="preference", global_batch_size=batch,
                    buckets=(ROW,), shuffle=False, truncation=Truncation(max_length=ROW, max_prompt_length=64),
                    packing=packing, process_index=0, process_count=1)
  return list(ds)


@pytest.mark.parametrize("attention", ["xla", "splash"])
def test_packed_dpo_pairs_give_each_pairs_log_probs_and_loss_as_one_pair_per_row(attention):
  from rlhfx.algorithms import dpo
  from rlhfx.config import base_config
  from rlhfx.losses import preference

  config = get_preset("tiny").replace(vocab_size=512, max_seq_len=ROW, attention=attention)
  policy = init_params(config, jax.random.key(0))
  reference = jax.tree.map(lambda x: x * 0.97, policy)
  model = Transformer(config)
  loss = preference.from_config(base_config("dpo").dpo)
  per_pair = jax.jit(lambda p, b, r: dpo.eval_step(p, b, r, s=dpo.Settings(model=model, loss=loss)))
  logps = jax.jit(lambda p, b: dpo.pair_logps(model, p, b))
  results = {}
  for packing in (False, True):
    batches = _pair_batches(packing)
    rows = sum(len(b["tokens_BxT" if packing else "chosen_tokens_BxT"]) * (1 if packing else 2) for b in batches)
    out = {}
    for b in batches:
      step = {k: v for k, v in b.items() if k != "example_id_B"}
      x, metrics = logps(policy, step), per_pair(policy, step, reference)
      for i, example in enumerate(b["example_id_B"]):
        out[int(example)] = (float(x.chosen_B[i]), float(x.rejected_B[i]), int(x.chosen_tokens_B[i]),
                             int(x.rejected_tokens_B[i]), float(metrics["loss"][i]))
    results[packing] = (rows, out)
  (rows, unpacked), (packed_rows, packed) = results[False], results[True]
  assert packed_rows < rows / 2 and sorted(packed) == sorted(unpacked) == list(range(16))
  for example in unpacked:
    np.testing.assert_allclose(packed[example], unpacked[example], rtol=2e-5, atol=2e-5, err_msg=str(example))
