"""Where on-policy RL gets its scores: a trained reward model, or a reward function.

`config.scoring.model`    a reward run's work directory (or its reward_model/ folder): the
                          ScoreModel params, its ModelConfig and the reward mean/std that
                          `rlhfx.algorithms.reward` exported at the end of training; or a
                          Hugging Face `*ForSequenceClassification` reward model with one
                          label (a directory or hub id; rlhfx.models.score_hf), whose scores
                          are used as they are unless a reward_stats.json lies beside it.
`config.scoring.functions` reward functions with `config.scoring.weights` instead (or as
                          well: their weighted sum is added to the model's score): built-in
                          ones (math answers, formats) or yours, in the graph or on the host
                          with the prompt data's columns (rlhfx.reward_functions).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from rlhfx import reward_functions, sharding, storage
from rlhfx.config import ConfigError
from rlhfx.models import ModelConfig, load
from rlhfx.models.convert import resolve
from rlhfx.models.heads import ScoreModel
from rlhfx.models.score_hf import is_score_model, score_model_config, score_model_from_hf
from rlhfx.reward_functions import RewardFunction

Array = jax.Array

EXPORT_DIR = "reward_model"


# ----------------------------------------------------------------------------- reward models


def export_reward_model(directory: str | Path, model_config: ModelConfig, params, stats: dict) -> Path:
  """Write a reward model for PPO/GRPO: params (Orbax), model_config.json, reward_stats.json (local or gs://)."""
  directory = storage.path(directory)
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
  """("rlhfx", the export folder) or ("hf", a *ForSequenceClassification directory or hub id); a gs:// folder is
  read from its local copy (`storage.local`)."""
  path = storage.local(path)
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
    config = score_model_config(where)
  else:
    config = ModelConfig(**json.loads((where / "model_config.json").read_text()))
  return config if attention is None else config.replace(attention=attention)


def load_reward_model(path: str | Path, target) -> RewardModel:
  """Load a reward model onto `target` (ShapeDtypeStructs with shardings: load.abstract_params)."""
  kind, where = _source(path)
  config = reward_model_config(path)
  if kind == "hf":
    directory = resolve(where)
    _, host = score_model_from_hf(directory, param_dtype=config.param_dtype, scan_layers=config.scan_layers)
    params = load.put(jax.tree.map(lambda x, t: x.astype(t.dtype), host, target), jax.tree.map(lambda t: t.sharding,
                                                                                            target))
    stats_file = directory / "reward_stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {"mean": 0.0, "std": 1.0}
  else:
    stats = json.loads((where / "reward_stats.json").read_text())
    with ocp.StandardCheckpointer() as ckpt:
      params = ckpt.restore(where / "params", target)
  return RewardModel(config=config, params=params, mean=float(stats["mean"]), std=float(stats["std"]))


# ----------------------------------------------------------------------------- scorers


@dataclasses.dataclass(frozen=True)
class Scorer:
  """How completions are scored (static): a reward model (its params travel as a frozen argument) and/or reward
  functions (rlhfx.reward_functions), whose weighted sum is added. Text functions run on the host between rollout
  and update (`score_on_host`); the rest runs in the graph."""

  module: ScoreModel | None = None
  mean: float = 0.0  # reward-model score normalisation
  std: float = 1.0
  functions: tuple[RewardFunction, ...] = ()
  missing_eos_penalty: float = 0.0
  timeout_s: float = 0.0  # a text function's call may take this long (0: no limit)

  @property
  def in_graph(self) -> bool:
    """Whether all of the scoring runs in the graph (no text function)."""
    return all(f.on_tokens for f in self.functions)

  @property
  def has_graph_part(self) -> bool:
    """Whether any of it does (a reward model or a traceable function)."""
    return self.module is not None or any(f.on_tokens for f in self.functions)


def scores(r, reward_params, scorer: Scorer) -> tuple[Array, dict[str, Array]]:
  """(scores_B, {name: scores_B} of each traceable reward function) computed in the graph: the reward model's
  normalised score at the last real token plus the traceable functions' weighted scores (text functions are
  added on the host)."""
  total_B = jnp.zeros(r.tokens_BxC.shape[:1], jnp.float32)
  if scorer.module is not None:
    raw_B = scorer.module.apply({"params": reward_params}, r.sequence_BxT, r.sequence_mask_BxT)
    total_B = (raw_B - scorer.mean) / scorer.std
  parts = {f.name: f.fn(r.prompt_BxP, r.prompt_mask_BxP, r.tokens_BxC, r.mask_BxC).astype(jnp.float32)
           for f in scorer.functions if f.on_tokens}
  return total_B + reward_functions.weighted_sum(parts, scorer.functions), parts


def finish_scores(scores_B: Array, r, eos_id: int | None, missing_eos_penalty: float) -> tuple[Array, Array]:
  """(scores_B after the missing-EOS penalty, has_eos_B): a completion cut at max_new_tokens loses the penalty."""
  if eos_id is None:
    return scores_B, jnp.zeros(scores_B.shape, bool)
  has_eos_B = jnp.any((r.tokens_BxC == eos_id) & r.mask_BxC, axis=-1)
  return jnp.where(has_eos_B, scores_B, scores_B - missing_eos_penalty), has_eos_B


def make_scorer(config, tokenizer, trees: load.Trees, policy_config: ModelConfig,
                columns: Sequence[str] | None = None) -> tuple[Scorer, Any]:
  """(Scorer, the reward model's params or None) from config.scoring, the reward model on the policy's attention
  path; `columns` (the prompt data's extra columns) are checked against what the text functions need. With
  abstract `trees` (the planner: no tokenizer, maybe no reward run yet) the params are ShapeDtypeStructs, of a
  reward model of the policy's shape when `config.scoring.model` holds none."""
  sc = config.scoring
  functions = reward_functions.load(sc.functions, sc.weights, tokenizer)
  if columns is not None:
    reward_functions.check_columns(functions, columns, ", ".join(map(str, config.data.train_files))
                                   or f"data.builtin={config.data.builtin}")
  common = dict(functions=functions, missing_eos_penalty=sc.missing_eos_penalty, timeout_s=sc.timeout_s)
  if not sc.model:
    return Scorer(**common), None
  try:
    rm_config = reward_model_config(sc.model, policy_config.attention)
  except ConfigError:
    if not trees.abstract:
      raise
    logging.warning("config.scoring.model=%r holds no reward model yet: planned with one of the policy's shape",
                    sc.model)
    rm_config = policy_config
  if tokenizer is not None and rm_config.vocab_size < len(tokenizer):
    raise ConfigError(f"config.scoring.model: the reward model's vocab_size {rm_config.vocab_size} is smaller than "
                      f"the policy tokenizer ({len(tokenizer)} tokens); both must share a tokenizer")
  module = ScoreModel(rm_config)
  target = load.abstract_params(module, trees.runtime)
  if trees.abstract:
    return Scorer(module=module, **common), target
  rm = load_reward_model(sc.model, target)
  mean, std = (rm.mean, rm.std) if sc.normalize else (0.0, 1.0)
  return Scorer(module=module, mean=mean, std=max(std, 1e-6), **common), rm.params


_SILENT: set[str] = set()  # text functions that scored none of a batch (said once each)


def _text_inputs(tokenizer, r, rows: list[dict] | None) -> tuple[list, list, list[list[int]], dict[str, list]]:
  """(prompts, completions, completion_ids, columns) of a host rollout, as text functions receive them: from each
  completion's prompt row (`prompt_row`: its text or messages, and its extra columns) when given, else from the
  decoded prompt tokens."""
  completion_ids = [t[m].tolist() for t, m in zip(np.asarray(r.tokens_BxC), np.asarray(r.mask_BxC))]
  texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completion_ids]
  if rows is None:
    prompts = [tokenizer.decode(p[m], skip_special_tokens=True)
               for p, m in zip(np.asarray(r.prompt_BxP), np.asarray(r.prompt_mask_BxP))]
    return prompts, texts, completion_ids, {}
  prompts = [row["messages"] or row["prompt"] for row in rows]
  completions = [[{"role": "assistant", "content": text}] if row["messages"] else text
                 for row, text in zip(rows, texts)]
  names = sorted({name for row in rows for name in row["columns"]})
  columns = {name: [row["columns"].get(name) for row in rows] for name in names}
  return prompts, completions, completion_ids, columns


def prompt_row(source, index: int) -> dict:
  """{"prompt": text, "messages": list (empty when the prompt is text), "columns": the record's other fields}."""
  record = source[index]
  text = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731
  extra = text(record.get("extra", b""))
  return {"prompt": text(record["prompt"]), "messages": json.loads(text(record["messages"]) or "[]"),
          "columns": json.loads(extra) if extra else {}}


def prompt_columns(source) -> list[str]:
  """The extra columns of a prompt dataset (those of its first record)."""
  return sorted(prompt_row(source, 0)["columns"]) if source is not None and len(source) else []


def score_on_host(scorer, tokenizer, r, mesh, *, in_graph: tuple | None = None, prompt_ids=None, source=None):
  """(scores_B, {name: scores_B}), global arrays split like the batch, as the in-graph scoring returns them: the
  in-graph part (`in_graph` = (scores_B, parts) of the reward model and traceable functions; None when the scorer
  has neither) plus each text function's weighted scores on the decoded rollout. `prompt_ids` are this process's
  prompts' rows of `source`, one per prompt of the batch (each read once, then repeated for its group)."""
  r = sharding.gather(r)
  rows = None
  if prompt_ids is not None:
    ids_P = sharding.gather(np.asarray(prompt_ids))
    rows = [row for i in ids_P for row in [prompt_row(source, int(i))] * (r.tokens_BxC.shape[0] // len(ids_P))]
  prompts, completions, completion_ids, columns = _text_inputs(tokenizer, r, rows)
  text_parts = {f.name: reward_functions.call(f, prompts=prompts, completions=completions,
                                              completion_ids=completion_ids, columns=columns,
                                              timeout_s=scorer.timeout_s)
                for f in scorer.functions if not f.on_tokens}
  for name, scores_B in text_parts.items():
    if np.isnan(scores_B).all() and name not in _SILENT:  # said once per function, counted every time
      _SILENT.add(name)
      print(f"WARNING: reward function {name} scored none of a batch's {len(scores_B)} completions (None for "
            f"each): it adds nothing to their rewards; rewards/{name}/applicable counts it", flush=True)
  scores_B = np.asarray(reward_functions.weighted_sum(text_parts, scorer.functions), np.float32)
  scores_B = scores_B + (np.asarray(sharding.gather(in_graph[0]), np.float32) if in_graph is not None else 0.0)

  def put(x_B):
    x_B = np.broadcast_to(x_B, r.tokens_BxC.shape[:1])
    return jax.make_array_from_callback(x_B.shape, sharding.batch_sharding(mesh, 1), lambda idx: x_B[idx])

  return put(scores_B), {**(in_graph[1] if in_graph is not None else {}),
                         **{k: put(v) for k, v in text_parts.items()}}
