"""Tokenizers: every kind rlhfx reads becomes a `transformers.PreTrainedTokenizerFast`.

  tok = llama2c_tokenizer("stories260k/tok512.bin")   # llama2.c .bin tokenizer
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

SPACE = "\u2581"  # SentencePiece's visible space


class TokenizerError(ValueError):
  """A tokenizer file that cannot be read; the message names the file."""


def _read_llama2c_vocab(path: Path) -> list[tuple[str, float]]:
  """(piece, score) pairs of a llama2.c tokenizer .bin: int32 max_len, then (f32 score, i32 len, bytes)*."""
  data = path.read_bytes()
  pieces, offset = [], 4
  if len(data) < 4:
    raise TokenizerError(f"{path}: too short for a llama2.c tokenizer")
  while offset < len(data):
    if offset + 8 > len(data):
      raise TokenizerError(f"{path}: truncated inside the header of token {len(pieces)}")
    score, length = struct.unpack_from("fi", data, offset)
    offset += 8
    if length < 0 or offset + length > len(data):
      raise TokenizerError(f"{path}: truncated inside token {len(pieces)} (length {length})")
    pieces.append((data[offset:offset + length].decode("utf-8", errors="replace"), score))
    offset += length
  return pieces


def llama2c_tokenizer(path: str | os.PathLike):
  """A fast SentencePiece-style BPE tokenizer from a llama2.c `tokenizer.bin` / `tok512.bin`.

  llama2.c merges the adjacent pair whose concatenation has the highest score,
  prepends one space, and falls back to byte tokens <0x00>..<0xFF> (ids 3..258).
  The same model expressed as HF `tokenizers` BPE: merges ranked by score.
  """
  from tokenizers import Tokenizer, decoders, models, normalizers
  from transformers import PreTrainedTokenizerFast

  path = Path(path)
  pieces = _read_llama2c_vocab(path)
  if len(pieces) < 259:
    raise TokenizerError(f"{path}: {len(pieces)} tokens; a llama2.c tokenizer has <unk>, <s>, </s> and 256 bytes")
  specials = ["<unk>", "<s>", "</s>"]
  vocab, scores = {}, {}
  for i, (piece, score) in enumerate(pieces):
    piece = specials[i] if i < 3 else piece.replace(" ", SPACE)
    vocab.setdefault(piece, i)
    scores[piece] = score
  merges = []
  for piece, piece_id in vocab.items():
    if piece_id < 259:
      continue
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in vocab and right in vocab:
        merges.append((-scores[piece], piece_id, vocab[left], (left, right)))
  merges = [pair for *_, pair in sorted(merges)]

  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
  tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
  tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
  tok.add_special_tokens(specials)
  return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
