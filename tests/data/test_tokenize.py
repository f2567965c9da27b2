"""llama2.c tokenizer: same ids as llama2.c's own encode algorithm, lossless decode."""

import struct

import pytest

from rlhfx.data.tokenize import Overlong, TokenizerError, Truncation, fit, llama2c_tokenizer

TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "Tom and  Sue   went\tto the park!\nThey played.",
    "naïve café — 中文 🙂",
    "",
    " leading space",
]


def _llama2c_encode(vocab: list[str], scores: list[float], text: str) -> list[int]:
  """A transcription of llama2.c's `encode` (run.c): dummy prefix, byte fallback, best-score merges."""
  index = {piece: i for i, piece in reversed(list(enumerate(vocab)))}
  if not text:
    return []
  ids = []
  for ch in " " + text:
    if ch in index:
      ids.append(index[ch])
    else:
      ids += [b + 3 for b in ch.encode("utf-8")]
  while True:
    best, best_id, best_at = -1e10, -1, -1
    for i in range(len(ids) - 1):
      merged = vocab[ids[i]] + vocab[ids[i + 1]]
      if merged in index and scores[index[merged]] > best:
        best, best_id, best_at = scores[index[merged]], index[merged], i
    if best_at == -1:
      return ids
    ids[best_at:best_at + 2] = [best_id]


def _read(path):
  data = path.read_bytes()
  vocab, scores, offset = [], [], 4
  while offset < len(data):
    score, length = struct.unpack_from("fi", data, offset)
    vocab.append(data[offset + 8:offset + 8 + length].decode("utf-8", errors="replace"))
    scores.append(score)
    offset += 8 + length
  return vocab, scores


@pytest.fixture(scope="module")
def tok512(shared_data):
  return shared_data("stories260k/tok512.bin")


@pytest.mark.parametrize("text", TEXTS)
def test_llama2c_tokenizer_matches_reference_encode(tok512, text):
  vocab, scores = _read(tok512)
  tokenizer = llama2c_tokenizer(tok512)
  assert tokenizer.encode(text, add_special_tokens=False) == _llama2c_encode(vocab, scores, text)


@pytest.mark.parametrize("text", TEXTS)
def test_llama2c_tokenizer_decodes_losslessly(tok512, text):
  tokenizer = llama2c_tokenizer(tok512)
  assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_llama2c_special_tokens(tok512):
  tokenizer = llama2c_tokenizer(tok512)
  assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
  assert len(tokenizer) == 512


def test_truncated_tokenizer_names_the_file(tok512, tmp_path):
  bad = tmp_path / "tok_cut.bin"
  bad.write_bytes(tok512.read_bytes()[:3001])
  with pytest.raises(TokenizerError, match=r"tok_cut\.bin: truncated inside (the header of )?token \d+"):
    llama2c_tokenizer(bad)


def test_max_completion_length_cuts_completions_at_their_end():
  limits = Truncation(max_length=12, max_prompt_length=6, max_completion_length=4)
  assert limits.completion_limit == 4 and Truncation(12, 6).completion_limit == 12
  prompt, completion, cut = fit([1, 2, 3], [10, 11, 12, 13, 14, 15], limits)
  assert (prompt, completion, cut) == ([1, 2, 3], [10, 11, 12, 13], True)
  assert fit([1, 2], [10, 11, 12, 13], limits) == ([1, 2], [10, 11, 12, 13], False)
  # without the limit the same completion fits in max_length
  assert fit([1, 2, 3], [10, 11, 12, 13, 14, 15], Truncation(12, 6))[2] is False
  with pytest.raises(Overlong, match="max_completion_length=4"):
    fit([1], [10, 11, 12, 13, 14], Truncation(12, 6, max_completion_length=4, on_overlong="error"))
  with pytest.raises(ValueError, match="max_completion_length"):
    Truncation(12, 6, max_completion_length=12)
