"""Tasks generated in code, for the quickstart and tests: no downloaded files needed.

reverse:    prompt "reverse: abcd =" -> completion " dcba" (3-6 lowercase letters).
arithmetic: prompt "What is 12 + 7? Think inside <think></think>, then answer inside
            <answer></answer>." with the gold `answer` "19" (sums and differences of numbers
            below 100): prompts for verifiable rewards (configs/grpo_math.py).
A byte-level tokenizer ("builtin:bytes") reads them: <pad>=0, <s>=1, </s>=2, bytes 3..258.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path


def reverse_examples(n: int, seed: int = 0) -> list[dict]:
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
    out.append({"prompt": f"reverse: {word} =", "completion": " " + word[::-1]})
  return out


ARITHMETIC_FORMAT = "Think inside <think></think>, then answer inside <answer></answer>."


def arithmetic_examples(n: int, seed: int = 0) -> list[dict]:
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    a, b, op = rng.randrange(100), rng.randrange(100), rng.choice("+-")
    out.append({"prompt": f"What is {a} {op} {b}? {ARITHMETIC_FORMAT}", "answer": str(a + b if op == "+" else a - b)})
  return out


TASKS = {"reverse": reverse_examples, "arithmetic": arithmetic_examples}


def write_task(name: str, path: str | Path, n: int = 4000, seed: int = 0) -> Path:
  """Write `n` examples of a built-in task as JSONL."""
  if name not in TASKS:
    raise ValueError(f"config.data.builtin={name!r}; built-in tasks: {tuple(TASKS)}")
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join(json.dumps(e) for e in TASKS[name](n, seed)) + "\n")
  return path


def byte_tokenizer():
  """Byte-level tokenizer without merges: 3 special tokens + 256 bytes."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  # the 256 printable stand-ins of GPT-2's byte encoder, in byte order
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)
  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{ch: i + 3 for i, ch in enumerate(alphabet)}}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(["<pad>", "<s>", "</s>"])
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _byte_of(ch: str) -> int:
  """Inverse of GPT-2's bytes_to_unicode."""
  code = ord(ch)
  printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
  if code in printable:
    return code
  others = [b for b in range(256) if b not in printable]
  return others[code - 256]
