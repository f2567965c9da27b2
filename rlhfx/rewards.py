"""Where on-policy RL gets its scores: a trained reward model, or a reward function.

`config.scoring.model`    a reward run's work directory (or its reward_model/ folder): the
                          ScoreModel params, its ModelConfig and the reward mean/std that
                          `rlhfx.algorithms.reward` exported at the end of training; or a
                          Hugging Face `*ForSequenceClassification` reward model with one
                          label (a directory or hub id; rlhfx.models.score_hf), whose scores
                          are used as they are unless a reward_stats.json lies beside it.
`config.scoring.function` a reward function instead:
   "fraction:<chars>"     the share of completion tokens made only of these characters
                          (built in, computed on token ids inside the compiled iteration);
   "module:function"      a Python function. Marked `@on_tokens` it receives
                          (prompt_BxP, prompt_mask_BxP, tokens_BxC, mask_BxC) as JAX arrays
                          and runs inside the compiled iteration; otherwise it receives
                          (prompts: list[str], completions: list[str]) and returns a float
                          per completion, called on the host between the rollout and the
                          update (verifiable rewards: unit tests, exact answers).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rlhfx.config import ConfigError
from rlhfx.models import ModelConfig

EXPORT_DIR = "reward_model"


def on_tokens(fn: Callable) -> Callable:
  """Mark a reward function as traceable: fn(prompt_BxP, prompt_mask_BxP, tokens_BxC, mask_BxC) -> scores_B."""
  fn.on_tokens = True
  return fn


# ----------------------------------------------------------------------------- reward models


def export_reward_model(directory: str | Path, model_config: ModelConfig, params, stats: dict) -> Path:
  """Write a reward model for PPO/GRPO: params (Orbax), model_config.json, reward_stats.json."""
  import orbax.checkpoint as ocp

  directory = Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(directory / "params", params, force=True)
  if jax.process_index() == 0:
    (directory / "model_config.json").write_text(json.dumps(dataclasses.asdict(model_config), indent=2))
    (directory / "reward_stats.json").write_text(json.dumps(stats, indent=2))
  return directory


@dataclasses.dataclass
class RewardModel:
  config: ModelConfig
  params: Any  # ScoreModel params, sharded
  mean: float  # reward statistics over the reward model's training data
  std: float


def _source(path: str | Path) -> tuple[str, Path | str]:
  """("rlhfx", the export folder) or ("hf", a *ForSequenceClassification directory or hub id)."""
  from rlhfx.models.score_hf import is_score_model

  path = Path(path)
  for candidate in (path, path / EXPORT_DIR):
    if (candidate / "model_config.json").exists():
      return "rlhfx", candidate.absolute()
  if is_score_model(path):
    return "hf", path.absolute()
  if not path.exists() and len(path.parts) == 2:  # "org/name": a hub id
    return "hf", str(path)
  raise ConfigError(f"config.scoring.model={str(path)!r}: no reward model there (expected model_config.json in it "
                    f"or in {EXPORT_DIR}/, as a reward run writes <workdir>/{EXPORT_DIR} when it finishes, or a "
                    f"Hugging Face *ForSequenceClassification directory or hub id)")


def reward_model_config(path: str | Path, attention: str | None = None) -> ModelConfig:
  """The reward model's ModelConfig; `attention` (the run's path on this backend) replaces the one it was trained
  with."""
  kind, where = _source(path)
  if kind == "hf":
    from rlhfx.models.score_hf import score_model_config

    config = score_model_config(where)
  else:
    config = ModelConfig(**json.loads((where / "model_config.json").read_text()))
  return config if attention is None else config.replace(attention=attention)


def load_reward_model(path: str | Path, target) -> RewardModel:
  """Load a reward model onto `target` (ShapeDtypeStructs with shardings: load.abstract_params)."""
  kind, where = _source(path)
  config = reward_model_config(path)
  if kind == "hf":
    from rlhfx.models.convert import resolve
    from rlhfx.models.load import put
    from rlhfx.models.score_hf import score_model_from_hf

    directory = resolve(where)
    _, host = score_model_from_hf(directory, param_dtype=config.param_dtype, scan_layers=config.scan_layers)
    params = put(jax.tree.map(lambda x, t: x.astype(t.dtype), host, target), jax.tree.map(lambda t: t.sharding,
                                                                                            target))
    stats_file = directory / "reward_stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {"mean": 0.0, "std": 1.0}
  else:
    stats = json.loads((where / "reward_stats.json").read_text())
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
      params = ckpt.restore(where / "params", target)
  return RewardModel(config=config, params=params, mean=float(stats["mean"]), std=float(stats["std"]))


# ----------------------------------------------------------------------------- reward functions


def character_fraction(chars: str, tokenizer) -> Callable:
  """Reward: the share of completion tokens that decode to a non-empty string of `chars` only."""
  table_V = np.zeros(len(tokenizer), bool)
  allowed = set(chars)
  for token_id in range(len(tokenizer)):
    text = tokenizer.decode([token_id])
    table_V[token_id] = bool(text) and set(text) <= allowed
  table = jnp.asarray(table_V)

  @on_tokens
  def reward(prompt_BxP, prompt_mask_BxP, tokens_BxC, mask_BxC):
    del prompt_BxP, prompt_mask_BxP
    hits_B = jnp.sum(table[tokens_BxC] & mask_BxC, axis=-1)
    return hits_B / jnp.maximum(mask_BxC.sum(-1), 1)

  return reward


def load_reward_function(spec: str, tokenizer) -> Callable:
  """A reward function from its config spec (see the module docstring)."""
  if spec.startswith("fraction:"):
    chars = spec.removeprefix("fraction:")
    if not chars:
      raise ConfigError("config.scoring.function='fraction:' needs characters after the colon")
    return character_fraction(chars, tokenizer)
  module, _, name = spec.partition(":")
  if not name:
    raise ConfigError(f"config.scoring.function={spec!r}: expected 'fraction:<chars>' or 'module:function'")
  try:
    return getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError) as e:
    raise ConfigError(f"config.scoring.function={spec!r}: cannot import it ({e})") from e


def is_traceable(fn: Callable) -> bool:
  return bool(getattr(fn, "on_tokens", False))


def host_scores(fn: Callable, tokenizer, prompt_BxP, prompt_mask_BxP, tokens_BxC, mask_BxC) -> np.ndarray:
  """Decode prompts and completions and call a text reward function; returns scores_B float32."""
  prompt_BxP, prompt_mask_BxP, tokens_BxC, mask_BxC = (np.asarray(x) for x in jax.device_get(
      (prompt_BxP, prompt_mask_BxP, tokens_BxC, mask_BxC)))
  prompts = [tokenizer.decode(p[m], skip_special_tokens=True) for p, m in zip(prompt_BxP, prompt_mask_BxP)]
  completions = [tokenizer.decode(t[m], skip_special_tokens=True) for t, m in zip(tokens_BxC, mask_BxC)]
  scores = np.asarray(fn(prompts, completions), np.float32)
  if scores.shape != (len(completions),):
    raise ValueError(f"reward function {getattr(fn, '__name__', fn)} returned shape {scores.shape}; expected "
                     f"one float per completion ({len(completions)},)")
  return scores


def make_scorer(config, tokenizer, runtime, attention: str = "xla"):
  """(rollout.Scorer, the reward model's params or None) from config.scoring."""
  from rlhfx.models.heads import ScoreModel
  from rlhfx.models.load import abstract_params
  from rlhfx.rollout import Scorer

  sc = config.scoring
  common = dict(missing_eos_penalty=sc.missing_eos_penalty)
  if sc.function:
    fn = load_reward_function(sc.function, tokenizer)
    return (Scorer(fn=fn, **common) if is_traceable(fn) else Scorer(host_fn=fn, **common)), None
  rm_config = reward_model_config(sc.model, attention)
  if rm_config.vocab_size < len(tokenizer):
    raise ConfigError(f"config.scoring.model: the reward model's vocab_size {rm_config.vocab_size} is smaller than "
                      f"the policy tokenizer ({len(tokenizer)} tokens); both must share a tokenizer")
  module = ScoreModel(rm_config)
  rm = load_reward_model(sc.model, abstract_params(module, runtime))
  mean, std = (rm.mean, rm.std) if sc.normalize else (0.0, 1.0)
  return Scorer(module=module, mean=mean, std=max(std, 1e-6), **common), rm.params


def score_on_host(scorer, tokenizer, r, mesh) -> jax.Array:
  """scores_B of a rollout from a host (text) reward function, as a global array split like the batch."""
  from rlhfx import sharding
  from rlhfx.evaluation import gather

  r = gather(r)
  scores_B = host_scores(scorer.host_fn, tokenizer, r.prompt_BxP, r.prompt_mask_BxP, r.tokens_BxC, r.mask_BxC)
  return jax.make_array_from_callback(scores_B.shape, sharding.batch_sharding(mesh, 1), lambda idx: scores_B[idx])
