"""Reward functions for PPO and GRPO, as researchers write them for verifiable rewards (RLVR).

  config.scoring.functions = ("math_answer", "think_format")   # specs, below
  config.scoring.weights = (1.0, 0.2)                           # () = 1 each

A completion's score is the weighted sum of the functions' scores; a function may return
None for a completion it does not apply to, which then adds nothing (TRL's nansum). Each
function's mean over the completions it applies to is logged as `rewards/<name>/mean`
(with `/std` and `/applicable`, the share it applied to).

Specs:
  "math_answer"       1 if the completion's final answer (inside <answer>...</answer> when
                      present, else the last number or LaTeX expression) equals the prompt
                      row's `answer` column, compared by math-verify; 0 if not; None when the
                      gold answer does not parse (needs the `math` extra)
  "think_format"      1 if the completion is <think>...</think> followed by <answer>...</answer>
  "regex:<pattern>"   1 if the whole completion matches the pattern (re.DOTALL), else 0
  "fraction:<chars>"  the share of completion tokens made only of these characters
                      (on token ids, inside the compiled iteration)
  "module:function"   your function (the module importable from the working directory)

A text function runs on the host between the rollout and the update, called like TRL's:

  def my_reward(prompts, completions, completion_ids, answer, **kwargs) -> list[float | None]

with keyword arguments: `prompts` and `completions` (strings; for prompts given as chat
messages, the message lists and [{"role": "assistant", "content": text}] each),
`completion_ids` (lists of token ids), and every other column of the prompt data
(`answer` above), one value per completion: a prompt's row repeats for each of its
`rollout.group_size` samples. A function without **kwargs receives only the arguments it
names; a column it needs that the data lacks is a config error before training. A function
marked `@on_tokens` instead receives (prompt_BxP, prompt_mask_BxP, tokens_BxC, mask_BxC) as
JAX arrays and returns scores_B inside the compiled iteration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import re
import signal
import threading
import traceback
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np

from rlhfx import preemption
from rlhfx.config import ConfigError

STANDARD_ARGS = ("prompts", "completions", "completion_ids")  # what every text function may take
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
THINK_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)


def on_tokens(fn: Callable) -> Callable:
  """Mark a reward function as traceable: fn(prompt_BxP, prompt_mask_BxP, tokens_BxC, mask_BxC) -> scores_B."""
  fn.on_tokens = True
  return fn


@dataclasses.dataclass(frozen=True)
class RewardFunction:
  name: str  # its metrics: rewards/<name>/mean
  fn: Callable
  weight: float = 1.0

  @property
  def on_tokens(self) -> bool:
    return bool(getattr(self.fn, "on_tokens", False))


# ----------------------------------------------------------------------------- the built-in functions


def _text(completion) -> str:
  """A completion's text: a string, or the content of a conversational completion's messages."""
  if isinstance(completion, str):
    return completion
  return "".join(m.get("content", "") for m in completion)


def math_answer(completions: Sequence, answer: Sequence, **kwargs) -> list[float | None]:
  """1.0 when a completion's final answer equals the gold `answer` (math-verify), 0.0 when not, None when the
  gold answer does not parse."""
  del kwargs
  from math_verify import parse, verify

  scores = []
  for completion, gold in zip(completions, answer):
    gold_parsed = parse(str(gold) if "$" in str(gold) or "\\" in str(gold) else f"${gold}$")
    if not gold_parsed:
      scores.append(None)
      continue
    text = _text(completion)
    tagged = ANSWER_TAG.findall(text)
    predicted = parse(tagged[-1] if tagged else text)
    scores.append(float(bool(predicted) and verify(gold_parsed, predicted)))
  return scores


def think_format(completions: Sequence, **kwargs) -> list[float]:
  """1.0 when a completion is <think>...</think> followed by <answer>...</answer> (whitespace around allowed)."""
  del kwargs
  return [float(THINK_FORMAT.fullmatch(_text(c)) is not None) for c in completions]


def regex_match(pattern: str) -> Callable:
  """Reward: 1.0 when the whole completion matches `pattern` (re.DOTALL), else 0.0."""
  compiled = re.compile(pattern, re.DOTALL)

  def regex(completions: Sequence, **kwargs) -> list[float]:
    del kwargs
    return [float(compiled.fullmatch(_text(c)) is not None) for c in completions]

  return regex


def character_fraction(chars: str, tokenizer) -> Callable:
  """Reward: the share of completion tokens that decode to a non-empty string of `chars` only."""
  table_V = np.zeros(len(tokenizer), bool)
  allowed = set(chars)
  for token_id in range(len(tokenizer)):
    text = tokenizer.decode([token_id])
    table_V[token_id] = bool(text) and set(text) <= allowed
  table = jnp.asarray(table_V)

  @on_tokens
  def fraction(prompt_BxP, prompt_mask_BxP, tokens_BxC, mask_BxC):
    del prompt_BxP, prompt_mask_BxP
    hits_B = jnp.sum(table[tokens_BxC] & mask_BxC, axis=-1)
    return hits_B / jnp.maximum(mask_BxC.sum(-1), 1)

  return fraction


BUILTIN = {"math_answer": math_answer, "think_format": think_format}
SPECS = f"one of {sorted(BUILTIN)}, 'regex:<pattern>', 'fraction:<chars>' or 'module:function'"


def is_spec(spec: str) -> bool:
  """Whether `spec` has the form of a reward function spec (what it names is checked when it is loaded)."""
  return spec in BUILTIN or ":" in spec


def missing_extra(spec: str) -> str | None:
  """What a built-in function lacks to run (an optional package), or None."""
  if spec == "math_answer" and importlib.util.find_spec("math_verify") is None:
    return "'math_answer' needs math-verify: pip install 'rlhfx[math]'"
  return None


# ----------------------------------------------------------------------------- loading and calling


def load_function(spec: str, tokenizer, field: str = "config.scoring.functions") -> Callable:
  """The function a spec names (see the module docstring); `tokenizer` is needed only by fraction:."""
  if spec in BUILTIN:
    if missing := missing_extra(spec):
      raise ConfigError(f"{field}: {missing}")
    return BUILTIN[spec]
  kind, _, rest = spec.partition(":")
  if kind == "fraction":
    if not rest:
      raise ConfigError(f"{field}: 'fraction:' needs characters after the colon")
    if tokenizer is None:  # the planner: the same shapes and cost without a tokenizer
      return on_tokens(lambda p, pm, t, m: m.sum(-1).astype(jnp.float32))
    return character_fraction(rest, tokenizer)
  if kind == "regex":
    try:
      return regex_match(rest)
    except re.error as e:
      raise ConfigError(f"{field}: {spec!r} is not a valid regular expression ({e})") from None
  if not is_spec(spec):
    raise ConfigError(f"{field}: {spec!r} is not a reward function; expected {SPECS}")
  try:
    return getattr(importlib.import_module(kind), rest)
  except (ImportError, AttributeError) as e:
    raise ConfigError(f"{field}: {spec!r}: cannot import it ({e})") from e


def load(specs: Sequence[str], weights: Sequence[float], tokenizer) -> tuple[RewardFunction, ...]:
  """RewardFunctions from config.scoring.functions / .weights, named after their spec (unique names)."""
  if weights and len(weights) != len(specs):
    raise ConfigError(f"config.scoring.weights has {len(weights)} entries for {len(specs)} functions")
  out, names = [], set()
  for i, spec in enumerate(specs):
    fn = load_function(spec, tokenizer, f"config.scoring.functions[{i}]={spec!r}")
    name = spec.split(":")[0] if spec.split(":")[0] in ("fraction", "regex") else getattr(fn, "__name__", spec)
    name = name if name not in names else f"{name}_{i}"
    names.add(name)
    out.append(RewardFunction(name=name, fn=fn, weight=float(weights[i]) if weights else 1.0))
  return tuple(out)


def required_columns(fn: Callable) -> list[str]:
  """The keyword arguments a text function needs beyond STANDARD_ARGS (parameters without defaults)."""
  return [p.name for p in inspect.signature(fn).parameters.values()
          if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty
          and p.name not in STANDARD_ARGS]


def check_columns(functions: Sequence[RewardFunction], columns: Sequence[str], where: str) -> None:
  """A ConfigError naming the first text function that needs a column the prompt data lacks."""
  for f in functions:
    if f.on_tokens:
      continue
    missing = [c for c in required_columns(f.fn) if c not in columns]
    if missing:
      raise ConfigError(f"config.scoring.functions: {f.name} needs the column {missing[0]!r}, which the prompt data "
                        f"({where}) does not have; its columns: {sorted({'prompt', *columns})}")


class RewardFunctionError(ValueError):
  """A reward function raised, returned something that is not one score per completion, or did not return in
  time; the message names it and what it did."""


class _Timeout(Exception):
  pass


@contextlib.contextmanager
def _deadline(seconds: float):
  """Raise _Timeout in the main thread after `seconds` (0: no limit); SIGTERM meanwhile stops the run at once
  (`preemption.interruptible`: the user code may never return)."""
  if not seconds or threading.current_thread() is not threading.main_thread():
    with preemption.interruptible():
      yield
    return

  def expire(signum, frame):
    raise _Timeout()

  previous = signal.signal(signal.SIGALRM, expire)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    with preemption.interruptible():
      yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def call(f: RewardFunction, *, prompts: list, completions: list, completion_ids: list[list[int]],
         columns: dict[str, list], timeout_s: float = 0.0) -> np.ndarray:
  """scores_B float32 of a text function (NaN where it returned None), called with the keyword arguments it takes,
  within `timeout_s` (config.scoring.timeout_s; 0: no limit). Whatever goes wrong in it is one
  RewardFunctionError naming the function."""
  arguments: dict[str, Any] = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids,
                               **columns}
  parameters = inspect.signature(f.fn).parameters.values()
  if not any(p.kind == p.VAR_KEYWORD for p in parameters):
    names = {p.name for p in parameters}
    arguments = {k: v for k, v in arguments.items() if k in names}
  try:
    with _deadline(timeout_s):
      result = f.fn(**arguments)
  except _Timeout:
    raise RewardFunctionError(f"reward function {f.name} did not return within config.scoring.timeout_s="
                              f"{timeout_s:g} s (for {len(completions)} completions)") from None
  except preemption.Preempted:
    raise
  except Exception as e:  # noqa: BLE001 (user code: any failure is reported as its own)
    where = "".join(f" ({frame.filename.rsplit('/', 1)[-1]}:{frame.lineno})"
                    for frame in traceback.extract_tb(e.__traceback__)[-1:])
    raise RewardFunctionError(f"reward function {f.name} raised {type(e).__name__}: {str(e)[:200]}{where}") from None
  return _scores(f.name, result, len(completions))


def _scores(name: str, result, n: int) -> np.ndarray:
  """A text function's result as scores_B float32 (None -> NaN), or one line saying what is wrong with it."""
  if isinstance(result, (str, bytes, dict)) or not hasattr(result, "__len__"):
    raise RewardFunctionError(f"reward function {name} returned {type(result).__name__} "
                              f"{_short(result)}; expected a list of {n} floats (or None), one per completion")
  if len(result) != n:
    raise RewardFunctionError(f"reward function {name} returned {len(result)} scores for {n} completions; expected "
                              f"one float (or None) per completion")
  scores = []
  for i, v in enumerate(result):
    try:
      scores.append(np.nan if v is None else float(v))
    except (TypeError, ValueError):
      raise RewardFunctionError(f"reward function {name} returned {type(v).__name__} {_short(v)} for completion "
                                f"{i}; expected a float or None") from None
  return np.asarray(scores, np.float32)


def _short(value) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def weighted_sum(parts: dict[str, Any], functions: Sequence[RewardFunction]):
  """sum_f weight_f x scores_f, a function's NaN (None) adding nothing (0 when there are no parts)."""
  weights = {f.name: f.weight for f in functions}
  return sum(jnp.where(jnp.isnan(v), 0.0, weights[k] * v) for k, v in parts.items())


def metrics(parts: dict[str, Any], prefix: str = "rewards") -> dict[str, Any]:
  """<prefix>/<name>/mean and /std over the completions a function applied to, and /applicable (their share;
  mean and std are 0 when it applied to none)."""
  out = {}
  for name, scores_B in parts.items():
    applies_B = ~jnp.isnan(scores_B)
    count = applies_B.sum()
    mean = jnp.where(applies_B, scores_B, 0.0).sum() / jnp.maximum(count, 1)
    var = jnp.where(applies_B, (scores_B - mean) ** 2, 0.0).sum() / jnp.maximum(count, 1)
    out.update({f"{prefix}/{name}/mean": mean, f"{prefix}/{name}/std": jnp.sqrt(var),
                f"{prefix}/{name}/applicable": count / scores_B.shape[0]})
  return out
