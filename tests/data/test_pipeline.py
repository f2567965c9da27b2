"""Tokenizers and Grain pipelines: GPT-2 ids, completion masks, determinism, resume, sharding, buckets."""

import functools
import json

import numpy as np
import pytest
import regex

from rlhfx.data import builders, pipeline
from rlhfx.data.tokenize import Overlong, Truncation, encode_prompt, load_tokenizer, render_prompt

STRINGS = ["hello world", "Hello, World!", "naïve café — 東京 🙂", "tabs\tand   spaces  \n\n  end ",
           "It's 2026; they'll've 12,345.67 items...", "  leading", "trailing   "]


def _gpt2_reference_encode(encoder: dict, merges: list, text: str) -> list[int]:
  """A transcription of OpenAI's gpt-2 `src/encoder.py` (byte-level BPE with its regex)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  byte_encoder = dict(zip(bs, map(chr, cs)))
  ranks = {pair: i for i, pair in enumerate(merges)}

  @functools.cache
  def bpe(token):
    word = tuple(token)
    while len(word) > 1:
      pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
      best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
      if best not in ranks:
        break
      out, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          out.append(word[i] + word[i + 1])
          i += 2
        else:
          out.append(word[i])
          i += 1
      word = tuple(out)
    return word

  pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
  ids = []
  for token in regex.findall(pattern, text):
    token = "".join(byte_encoder[b] for b in token.encode("utf-8"))
    ids += [encoder[piece] for piece in bpe(token)]
  return ids


@pytest.fixture(scope="module")
def gpt2(shared_data):
  directory = shared_data("gpt2_tokenizer/encoder.json").parent
  shared_data("gpt2_tokenizer/vocab.bpe")
  return load_tokenizer(directory)


def test_gpt2_bpe_known_ids(gpt2):
  assert gpt2.encode("hello world", add_special_tokens=False) == [31373, 995]
  assert gpt2.eos_token_id == 50256 and len(gpt2) == 50257


@pytest.mark.parametrize("text", STRINGS)
def test_gpt2_bpe_matches_openai_reference(gpt2, shared_data, text):
  encoder = json.loads(shared_data("gpt2_tokenizer/encoder.json").read_text())
  merges = [tuple(line.split()) for line in
            shared_data("gpt2_tokenizer/vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if line]
  ids = gpt2.encode(text, add_special_tokens=False)
  assert ids == _gpt2_reference_encode(encoder, merges, text)
  assert gpt2.decode(ids) == text


def test_sentencepiece_llama2(shared_data):
  tok = load_tokenizer(shared_data("llama2_tokenizer/tokenizer.model"))
  assert len(tok) == 32000
  assert tok.encode("Hello world", add_special_tokens=False) == [15043, 3186]
  assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)


# ----------------------------------------------------------------------------- pipelines


def _pairs_dataset(tmp_path, n=64):
  path = tmp_path / "pairs.jsonl"
  path.write_text("\n".join(json.dumps({"prompt": f"Question {i}: " + "more " * (i % 7 * 9),
                                        "chosen": f" yes {i}" + " indeed" * (i % 5 * 11),
                                        "rejected": f" no {i}"}) for i in range(n)))
  builders.build("preference", [path], data_dir=tmp_path / "data", input_format="pairs")
  return builders.data_source(tmp_path / "data")


def _make(source, tok, **kw):
  args = dict(kind="preference", global_batch_size=8, buckets=(32, 64, 128),
              truncation=Truncation(max_length=128, max_prompt_length=64), seed=0, process_index=0, process_count=1)
  args.update(kw)
  return pipeline.make_dataset(source, tok, **args)


def _ids(batch, tok):
  """The question number of each row (from the prompt text)."""
  out = []
  for row, mask in zip(batch["chosen_tokens_BxT"], batch["chosen_mask_BxT"]):
    text = tok.decode(row[mask])
    out.append(int(text.split("Question ")[1].split(":")[0]))
  return out


def test_same_seed_same_batches_and_epochs_reshuffle(tmp_path, gpt2):
  source = _pairs_dataset(tmp_path)
  a = [b["chosen_tokens_BxT"] for b in _make(source, gpt2, num_epochs=2)]
  b = [b["chosen_tokens_BxT"] for b in _make(source, gpt2, num_epochs=2)]
  c = [b["chosen_tokens_BxT"] for b in _make(source, gpt2, num_epochs=2, seed=1)]
  assert len(a) == 16
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, c))
  first, second = a[:8], a[8:]
  assert not all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(first, second))


def test_restored_iterator_yields_the_next_batch(tmp_path, gpt2):
  source = _pairs_dataset(tmp_path)
  it = iter(_make(source, gpt2))
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = next(it)
  fresh = iter(_make(source, gpt2))
  fresh.set_state(json.loads(json.dumps(state)) if isinstance(state, dict) else state)
  got = next(fresh)
  assert got.keys() == expected.keys()
  for key in got:
    np.testing.assert_array_equal(got[key], expected[key])


def test_processes_see_disjoint_shards_that_cover_the_data(tmp_path, gpt2):
  source = _pairs_dataset(tmp_path)
  whole = [_ids(b, gpt2) for b in _make(source, gpt2)]
  shards = [[_ids(b, gpt2) for b in _make(source, gpt2, process_index=p, process_count=4)] for p in range(4)]
  for step, global_rows in enumerate(whole):
    parts = [shards[p][step] for p in range(4)]
    assert all(len(part) == 2 for part in parts)
    assert sum(parts, []) == global_rows
  everything = [i for shard in shards for batch in shard for i in batch]
  assert sorted(everything) == list(range(64))


def test_shapes_never_exceed_bucket_count(shared_data, tmp_path, gpt2):
  builders.build("preference", [shared_data("hh_rlhf/harmless-base-test.jsonl.gz")], data_dir=tmp_path,
                 input_format="hh", on_error="skip")
  stats = pipeline.Stats()
  buckets = (64, 128, 256, 512)
  ds = pipeline.make_dataset(builders.data_source(tmp_path), gpt2, kind="preference", global_batch_size=2,
                             buckets=buckets, truncation=Truncation(512, 256), stats=stats, process_index=0,
                             process_count=1)
  shapes = set()
  for batch in ds:
    shapes.add(batch["chosen_tokens_BxT"].shape)
    assert batch["chosen_tokens_BxT"].shape == batch["rejected_tokens_BxT"].shape
  assert 1 < len(shapes) <= len(buckets)
  counts = stats.snapshot()
  assert counts["encoded"] == len(builders.data_source(tmp_path)) and counts["truncated"] > 0


def test_completion_mask_is_exactly_the_final_reply_default_template(shared_data, tmp_path, gpt2):
  builders.build("preference", [shared_data("sharegpt_dpo/dpo_en_demo.json")], data_dir=tmp_path,
                 input_format="sharegpt")
  source = builders.data_source(tmp_path)
  ds = pipeline.make_dataset(source, gpt2, kind="preference", global_batch_size=4, buckets=(4096,),
                             truncation=Truncation(4096, 3000), shuffle=False, process_index=0, process_count=1)
  batch = next(iter(ds))
  for i in range(4):
    example = source[i]
    for side in ("chosen", "rejected"):
      tokens = batch[f"{side}_tokens_BxT"][i]
      completion = tokens[batch[f"{side}_loss_mask_BxT"][i]]
      prompt = tokens[batch[f"{side}_mask_BxT"][i] & ~batch[f"{side}_loss_mask_BxT"][i]]
      assert gpt2.decode(completion) == " " + example[side].decode() + "<|endoftext|>"
      messages = json.loads(example["messages"])
      rendered = gpt2.decode(prompt)
      assert rendered.endswith("\n\nAssistant:") and messages[-1]["content"] in rendered
      if messages[0]["role"] == "system":
        assert rendered.startswith("\n\nSystem: ")  # GPT-2: BOS == EOS, so no BOS is added


def test_default_template_is_the_hh_transcript_form(gpt2, shared_data):
  messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
              {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
  assert render_prompt(gpt2, messages) == "\n\nSystem: S\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:"
  # BOS: added once for tokenizers whose BOS is not EOS (llama2.c), never for GPT-2
  stories = load_tokenizer(shared_data("stories260k/tok512.bin"))
  assert encode_prompt(stories, "Once", [])[0] == 1
  assert encode_prompt(gpt2, "Once", []) == gpt2.encode("Once", add_special_tokens=False)


def test_completion_mask_with_a_real_chat_template(tmp_path, gpt2):
  chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  tok = gpt2
  tok.chat_template = chatml
  try:
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"conversations": [{"from": "system", "value": "Be kind."},
                                                  {"from": "human", "value": "Hi"},
                                                  {"from": "gpt", "value": "Hello!"},
                                                  {"from": "human", "value": "Bye"}],
                                "chosen": {"from": "gpt", "value": "Goodbye."},
                                "rejected": {"from": "gpt", "value": "Whatever."}}))
    builders.build("preference", [path], data_dir=tmp_path / "d", input_format="sharegpt")
    ds = pipeline.make_dataset(builders.data_source(tmp_path / "d"), tok, kind="preference", global_batch_size=1,
                               buckets=(128,), truncation=Truncation(128, 96), process_index=0, process_count=1)
    batch = next(iter(ds))
    tokens, loss = batch["chosen_tokens_BxT"][0], batch["chosen_loss_mask_BxT"][0]
    assert tok.decode(tokens[loss]) == "Goodbye.<|im_end|>\n<|endoftext|>"
    assert tok.decode(tokens[batch["chosen_mask_BxT"][0] & ~loss]).endswith("Bye<|im_end|>\n<|im_start|>assistant\n")
  finally:
    tok.chat_template = None


def test_overlong_truncate_skip_error(tmp_path, gpt2):
  source = _pairs_dataset(tmp_path, n=16)
  limits = dict(max_length=40, max_prompt_length=20)
  stats = pipeline.Stats()
  batches = list(_make(source, gpt2, buckets=(40,), truncation=Truncation(**limits), stats=stats,
                       global_batch_size=4, drop_remainder=False))
  assert sum(len(b["chosen_tokens_BxT"]) for b in batches) == 16
  assert all(b["chosen_tokens_BxT"].shape[1] == 40 for b in batches)
  assert stats.snapshot()["truncated"] > 0
  # keep_end: the truncated prompt ends exactly like the full prompt
  full_prompt = gpt2.encode("Question 6: " + "more " * 54, add_special_tokens=False)
  row = next(r for b in batches for r in zip(b["chosen_tokens_BxT"], b["chosen_loss_mask_BxT"])
             if gpt2.decode(r[0][~r[1]][:3]).startswith(" more"))
  assert list(row[0][~row[1]][:20][-5:]) == full_prompt[-5:]

  stats = pipeline.Stats()
  kept = list(_make(source, gpt2, buckets=(40,), truncation=Truncation(**limits, on_overlong="skip"),
                    stats=stats, global_batch_size=1))
  counts = stats.snapshot()
  assert counts["skipped/overlong"] > 0 and counts["encoded"] + counts["skipped/overlong"] == 16
  assert len(kept) == counts["encoded"]

  with pytest.raises(Overlong, match=r"exceed max_prompt_length=20 / max_length=40.*on_overlong"):
    list(_make(source, gpt2, buckets=(40,), truncation=Truncation(**limits, on_overlong="error"),
               global_batch_size=1))


def test_prompt_and_sft_and_unpaired_batches(tmp_path, gpt2):
  (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": "Once upon a time" + " x" * i})
                                              for i in range(6)))
  builders.build("prompts", [tmp_path / "p.jsonl"], data_dir=tmp_path / "p", input_format="prompts")
  batch = next(iter(pipeline.make_dataset(builders.data_source(tmp_path / "p"), gpt2, kind="prompts",
                                          global_batch_size=6, buckets=(8, 16), truncation=Truncation(32, 16),
                                          shuffle=False, process_index=0, process_count=1)))
  assert batch["prompt_BxP"].shape == (6, 16)
  assert batch["prompt_mask_BxP"][:, -1].all()  # left padded: every row ends with a real token
  assert (batch["prompt_mask_BxP"].sum(1) > 0).all()

  (tmp_path / "k.jsonl").write_text("\n".join(json.dumps({"prompt": "q", "completion": f"a{i}", "label": i % 2})
                                              for i in range(4)))
  builders.build("unpaired", [tmp_path / "k.jsonl"], data_dir=tmp_path / "k", input_format="unpaired")
  batch = next(iter(pipeline.make_dataset(builders.data_source(tmp_path / "k"), gpt2, kind="unpaired",
                                          global_batch_size=4, buckets=(16,), truncation=Truncation(16, 8),
                                          process_index=0, process_count=1)))
  assert batch["label_B"].dtype == bool and batch["label_B"].sum() == 2
  assert batch["tokens_BxT"].shape == batch["loss_mask_BxT"].shape == (4, 16)

  (tmp_path / "s.jsonl").write_text("\n".join(json.dumps({"prompt": "Question: what is 2+2?",
                                                          "completion": f" It is {i}."}) for i in range(4)))
  builders.build("sft", [tmp_path / "s.jsonl"], data_dir=tmp_path / "s", input_format="sft")
  batch = next(iter(pipeline.make_dataset(builders.data_source(tmp_path / "s"), gpt2, kind="sft",
                                          global_batch_size=4, buckets=(16,), truncation=Truncation(16, 12),
                                          shuffle=False, process_index=0, process_count=1)))
  assert batch["tokens_BxT"].shape == batch["mask_BxT"].shape == batch["loss_mask_BxT"].shape == (4, 16)
  completions = set()
  for row, mask, loss_mask in zip(batch["tokens_BxT"], batch["mask_BxT"], batch["loss_mask_BxT"]):
    text, completion = gpt2.decode(row[mask]), gpt2.decode(row[loss_mask])
    assert text.startswith("Question: what is 2+2? It is ") and text.endswith(".<|endoftext|>")
    assert completion == text.removeprefix("Question: what is 2+2?")  # the loss covers the reply and EOS only
    assert mask[:mask.sum()].all()  # right padding
    completions.add(completion)
  assert completions == {f" It is {i}.<|endoftext|>" for i in range(4)}


def test_bad_pipeline_config(tmp_path, gpt2):
  source = _pairs_dataset(tmp_path, n=8)
  with pytest.raises(ValueError, match="global_batch_size=6 is not divisible by the 4 processes"):
    _make(source, gpt2, global_batch_size=6, process_count=4)
  with pytest.raises(ValueError, match=r"largest bucket must be >= the truncation limit 128"):
    _make(source, gpt2, buckets=(64,))


@pytest.mark.parametrize("rows", [1, 3, 33])
def test_a_short_last_batch_is_shared_by_processes_without_leaving_a_row_out(rows):
  """Evaluation's last global batch is short (drop_remainder=False): over 2 processes every row is in exactly one
  share, and a process left with none gets one stand-in row whose example id i is written -1 - i (full_batches
  marks it invalid). Equal slices of floor(n / 2) rows lost the odd row and gave a 1-row batch's second process
  nothing (an IndexError in every two-process evaluation of the quickstart)."""
  examples = [{"tokens": np.arange(3) + i, "loss_mask": np.ones(3, bool), "example_id": np.asarray(i, np.int64)}
              for i in range(rows)]
  shares = [pipeline.Collate("sft", (8,), 0, i, 2)(examples) for i in range(2)]
  ids = np.concatenate([s["example_id_B"] for s in shares])
  assert sorted(ids[ids >= 0].tolist()) == list(range(rows))
  assert all(len(s["example_id_B"]) >= 1 for s in shares)
  assert all(-1 - i == rows - 1 for i in ids[ids < 0])  # a stand-in is the batch's last row
