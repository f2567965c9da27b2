"""Tokenizers, chat templates and prompt/completion token layout.

Every tokenizer rlhfx reads becomes a `transformers.PreTrainedTokenizerFast`-like object:

  tok = load_tokenizer("gpt2_tokenizer/")        # a directory with encoder.json + vocab.bpe (GPT-2 BPE)
  tok = load_tokenizer("llama2/tokenizer.model") # a SentencePiece model
  tok = load_tokenizer("tok512.bin")             # a llama2.c tokenizer
  tok = load_tokenizer("Qwen/Qwen3-0.6B")        # a Hugging Face directory or hub id
  tok = load_tokenizer("builtin:bytes")          # bytes + <pad>, <s>, </s> (rlhfx.data.synthetic)

`encode_example` turns a prompt (text or chat messages) and a completion into
token ids and a loss mask that is True on completion tokens only.

Chat: when the tokenizer has a chat template it is applied; otherwise rlhfx uses
`DEFAULT_CHAT_TEMPLATE`, the Anthropic HH transcript form — each turn is
"\\n\\n{Human|Assistant|System}: {content}" and the generation prompt is
"\\n\\nAssistant:" — so chat data and HH transcripts tokenize alike on base models.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from rlhfx import hub
from rlhfx.data.synthetic import byte_tokenizer

SPACE = "\u2581"  # SentencePiece's visible space

DEFAULT_CHAT_TEMPLATE = (  # newlines as Jinja string escapes: transformers renders with trim_blocks=True
    r"{% for m in messages %}"
    r"{% if m['role'] == 'user' %}{{ '\n\nHuman: ' + m['content'] }}"
    r"{% elif m['role'] == 'assistant' %}{{ '\n\nAssistant: ' + m['content'] }}"
    r"{% else %}{{ '\n\nSystem: ' + m['content'] }}{% endif %}"
    r"{% endfor %}"
    r"{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}"
)


class TokenizerError(ValueError):
  """A tokenizer that cannot be loaded; the message names the file."""


# ----------------------------------------------------------------------------- loading


def load_tokenizer(spec: str | os.PathLike):
  """A fast tokenizer from a path (directory or file), a hub repository id or hf:// file (`rlhfx.hub`: through the
  Hugging Face cache), or "builtin:bytes"."""
  if str(spec) == "builtin:bytes":
    return byte_tokenizer()
  if hub.is_repo_id(spec):
    spec = hub.local_repo(str(spec), hub.TOKENIZER_FILES)
  path = hub.local_file(spec)
  if path.is_file():
    if path.suffix == ".bin":
      return llama2c_tokenizer(path)
    if path.suffix == ".model":
      return sentencepiece_tokenizer(path)
    raise TokenizerError(f"{path}: unknown tokenizer file (expected a llama2.c .bin or a SentencePiece .model)")
  if path.is_dir() and (path / "encoder.json").exists() and (path / "vocab.bpe").exists():
    return gpt2_tokenizer(path)
  if path.is_dir() and not (path / "tokenizer.json").exists() and (path / "tokenizer.model").exists() and not (
      path / "tokenizer_config.json").exists():
    return sentencepiece_tokenizer(path / "tokenizer.model")
  from transformers import AutoTokenizer

  try:
    return AutoTokenizer.from_pretrained(str(spec))
  except Exception as e:  # noqa: BLE001 (offline hub, missing files: one message naming the spec)
    raise TokenizerError(f"{spec}: cannot load a tokenizer ({type(e).__name__}: {e})") from e


def gpt2_tokenizer(directory: str | os.PathLike):
  """GPT-2's byte-level BPE from OpenAI's encoder.json + vocab.bpe (same as vocab.json + merges.txt)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  directory = Path(directory)
  for name in ("encoder.json", "vocab.bpe"):
    if not (directory / name).exists():
      raise TokenizerError(f"{directory / name}: missing (GPT-2 BPE needs encoder.json and vocab.bpe)")
  tok = Tokenizer(models.BPE.from_file(str(directory / "encoder.json"), str(directory / "vocab.bpe")))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(["<|endoftext|>"])
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                 unk_token="<|endoftext|>")


def sentencepiece_tokenizer(model_file: str | os.PathLike):
  """A SentencePiece `tokenizer.model` (Llama 2 style), converted by transformers to a fast tokenizer."""
  from transformers import LlamaTokenizer

  model_file = Path(model_file)
  if not model_file.exists():
    raise TokenizerError(f"{model_file}: not found")
  with tempfile.TemporaryDirectory() as tmp:  # transformers wants a directory holding tokenizer.model
    os.symlink(model_file.resolve(), Path(tmp) / "tokenizer.model")
    try:
      return LlamaTokenizer.from_pretrained(tmp)
    except Exception as e:  # noqa: BLE001
      raise TokenizerError(f"{model_file}: not a SentencePiece model ({e})") from e


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

  path = hub.local_file(path)  # an hf:// file: its cached copy
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


# ----------------------------------------------------------------------------- prompts and completions


def render_prompt(tokenizer, messages: Sequence[dict]) -> str:
  """Chat messages -> prompt text ending where the assistant's reply starts."""
  template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
  return tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                       add_generation_prompt=True)


def render_reply(tokenizer, messages: Sequence[dict], reply: str) -> str:
  """The text the template adds for `reply` after `render_prompt(messages)` (end-of-turn marks included)."""
  template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
  if template == DEFAULT_CHAT_TEMPLATE:
    return " " + reply
  prompt = render_prompt(tokenizer, messages)
  full = tokenizer.apply_chat_template(list(messages) + [{"role": "assistant", "content": reply}],
                                       chat_template=template, tokenize=False)
  if not full.startswith(prompt):
    raise TokenizerError("the chat template renders the conversation differently with and without the reply; "
                         "cannot locate the completion")
  return full[len(prompt):]


@dataclasses.dataclass(frozen=True)
class Truncation:
  """How to fit an example into `max_length` tokens.

  The prompt keeps its end (the most recent turns) and is cut to at most
  `max_prompt_length`; the completion is cut at its end, to at most
  `max_completion_length` when that is set (DPO then runs the LM head over that
  many positions per row instead of the whole row). `on_overlong`:
  "truncate" (default), "skip" (dropped and counted) or "error".
  """

  max_length: int = 512
  max_prompt_length: int = 256
  max_completion_length: int | None = None  # None: whatever max_length leaves after the prompt
  prompt_side: str = "keep_end"  # keep_end | keep_start
  on_overlong: str = "truncate"  # truncate | skip | error

  def __post_init__(self):
    if self.prompt_side not in ("keep_end", "keep_start"):
      raise ValueError(f"Truncation.prompt_side={self.prompt_side!r}; expected keep_end or keep_start")
    if self.on_overlong not in ("truncate", "skip", "error"):
      raise ValueError(f"Truncation.on_overlong={self.on_overlong!r}; expected truncate, skip or error")
    if not 0 < self.max_prompt_length < self.max_length:
      raise ValueError(f"Truncation: need 0 < max_prompt_length ({self.max_prompt_length}) < max_length "
                       f"({self.max_length})")
    if self.max_completion_length is not None and not 0 < self.max_completion_length < self.max_length:
      raise ValueError(f"Truncation: need 0 < max_completion_length ({self.max_completion_length}) < max_length "
                       f"({self.max_length})")

  @property
  def completion_limit(self) -> int:
    """Most completion tokens a row can hold."""
    return self.max_completion_length or self.max_length


class Overlong(ValueError):
  """An example longer than the truncation limits, with on_overlong="skip" or "error"."""


def encode_text(tokenizer, text: str) -> list[int]:
  """Token ids of `text` without special tokens (through the Rust tokenizer directly when there is one)."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:
    return backend.encode(text, add_special_tokens=False).ids
  return tokenizer.encode(text, add_special_tokens=False)


def encode_prompt(tokenizer, prompt: str, messages: Sequence[dict], *, add_bos: bool | None = None) -> list[int]:
  """Prompt ids: the chat template over `messages` when given, else the `prompt` text.

  BOS is prepended (once) when `add_bos`, which by default is true for tokenizers
  whose BOS differs from EOS (Llama, llama2.c) and false otherwise (GPT-2).
  """
  text = render_prompt(tokenizer, messages) if messages else prompt
  ids = encode_text(tokenizer, text) if text else []
  bos = tokenizer.bos_token_id
  if add_bos is None:
    add_bos = bos is not None and bos != tokenizer.eos_token_id
  if add_bos and bos is not None and ids[:1] != [bos]:
    ids = [bos] + ids
  return ids


def encode_completion(tokenizer, completion: str, messages: Sequence[dict]) -> list[int]:
  """Completion ids, ending with EOS (added unless the chat template already ends the turn with it)."""
  text = render_reply(tokenizer, messages, completion) if messages else completion
  ids = encode_text(tokenizer, text)
  eos = tokenizer.eos_token_id
  if eos is not None and (not ids or ids[-1] != eos):
    ids.append(eos)
  return ids


def fit(prompt_ids: list[int], completion_ids: list[int], truncation: Truncation):
  """Apply the truncation policy -> (prompt_ids, completion_ids, was_truncated)."""
  t = truncation
  if (len(prompt_ids) + len(completion_ids) <= t.max_length and len(prompt_ids) <= t.max_prompt_length
      and len(completion_ids) <= t.completion_limit):
    return prompt_ids, completion_ids, False
  if t.on_overlong != "truncate":
    limits = f"max_prompt_length={t.max_prompt_length} / max_length={t.max_length}"
    if t.max_completion_length is not None:
      limits += f" / max_completion_length={t.max_completion_length}"
    raise Overlong(f"{len(prompt_ids)} prompt + {len(completion_ids)} completion tokens exceed {limits}")
  if len(prompt_ids) > t.max_prompt_length:
    keep = t.max_prompt_length
    prompt_ids = prompt_ids[-keep:] if t.prompt_side == "keep_end" else prompt_ids[:keep]
  completion_ids = completion_ids[:min(t.max_length - len(prompt_ids), t.completion_limit)]
  return prompt_ids, completion_ids, True


def layout(prompt_ids: Sequence[int], completion_ids: Sequence[int]):
  """(tokens_T int32, loss_mask_T bool): prompt then completion; the loss covers completion tokens only."""
  tokens = np.asarray(list(prompt_ids) + list(completion_ids), np.int32)
  loss_mask = np.zeros(len(tokens), bool)
  loss_mask[len(prompt_ids):] = True
  return tokens, loss_mask
