"""Every config problem found in one pass, before any data is built or model loaded.

  validation.check(config)                                   # fields: kind, allowed values, ranges, combinations
  validation.check_model(config, model_config, data_parallel)  # against the model's shape and the mesh

Both raise `ConfigError` with one line naming every bad field, its value and what is
allowed; `python -m rlhfx.main` prints it and exits with status 2. A field's kind comes
from `base_config` (the defaults), its allowed values from the tables below.
"""

from __future__ import annotations

import importlib.util
import re

from ml_collections import ConfigDict

from rlhfx import reward_functions, sampling_layout
from rlhfx.config import ALGORITHMS, ConfigError, base_config
from rlhfx.data.formats import PARSERS
from rlhfx.losses import policy, preference
from rlhfx.models.config import ATTENTIONS, DTYPES, PRESETS, REMAT_POLICIES
from rlhfx.sampling_layout import SPEC

CHOICES: dict[str, tuple] = {
    "model.dtype": tuple(DTYPES), "model.param_dtype": tuple(DTYPES), "model.remat": REMAT_POLICIES,
    "model.attention": ("auto", *ATTENTIONS),
    "data.input_format": tuple(PARSERS), "data.on_error": ("raise", "skip"),
    "data.prompt_side": ("keep_end", "keep_start"), "data.on_overlong": ("truncate", "skip", "error"),
    "optim.schedule": ("cosine", "constant"), "train.resume": ("check", "new_config"),
    "train.on_divergence": ("stop", "warn"),
    "dpo.loss": tuple(preference.LOSSES), "dpo.reference": ("frozen", "precomputed", "lora_base"),
    "rollout.sampler": ("engine", "static"),
    "ppo.kl_estimator": policy.KL_ESTIMATORS, "ppo.kl_in": ("reward", "loss"), "ppo.kl_penalty": ("token", "sequence"),
    "ppo.aggregation": policy.AGGREGATIONS,
    "ppo.value_model": ("separate", "policy_head"), "logging.wandb.mode": ("online", "offline", "disabled"),
    "grpo.advantage": policy.ADVANTAGES, "grpo.aggregation": policy.AGGREGATIONS,
}
POSITIVE = {  # > 0
    "train.global_batch_size", "train.grad_accum_steps", "train.num_steps", "train.log_every",
    "train.checkpoint_every", "train.keep_checkpoints", "train.eval_batches", "data.max_length",
    "data.max_prompt_length", "data.buckets", "rollout.max_new_tokens", "rollout.group_size", "ppo.epochs",
    "rollout.cache_buckets",
    "ppo.minibatches", "ppo.kl_horizon", "ppo.clip_eps", "grpo.epochs", "grpo.minibatches", "grpo.clip_eps",
    "reward.stats_batches", "dpo.beta", "lora.alpha", "optim.eps", "distributed.num_processes",
    "model.vocab_size", "model.max_seq_len", "model.n_layers", "model.d_model", "train.eval_sample_tokens",
    "train.divergence_factor", "train.vanished_steps", "train.lock_lease_s",
}
UNIT = {  # [low, high) or [low, high]
    "data.eval_fraction": (0, 1, False), "optim.b1": (0, 1, False), "optim.b2": (0, 1, False),
    "optim.min_lr_ratio": (0, 1, True), "dpo.label_smoothing": (0, 0.5, False), "rollout.top_p": (0, 1, True),
    "ppo.gamma": (0, 1, True), "ppo.lam": (0, 1, True),
}
DATA_KINDS = {"sft": ("sft",), "reward": ("preference",), "dpo": ("preference", "unpaired"),
              "ppo": ("prompts",), "grpo": ("prompts",)}

_KIND_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "True or False",
               tuple: "a tuple (a,b,...)"}


def _leaves(config, prefix=""):
  for key, value in config.items():
    if isinstance(value, ConfigDict) and key != "shape":
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _expected_type(base, path: str):
  *parents, key = path.split(".")
  node = base
  for p in parents:
    node = node[p]
  return node.get_type(key), node[key]


def _kind_ok(value, kind, default) -> bool:
  if value is None:
    return default is None  # a placeholder (unset) field
  if kind is bool:
    return isinstance(value, bool)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if kind is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind is tuple:
    return isinstance(value, (tuple, list))
  if kind is ConfigDict:
    return isinstance(value, (ConfigDict, dict))
  return isinstance(value, kind)


def _field_problem(path: str, value) -> str | None:
  """The value's problem beyond its kind (allowed values, sign, range), or None."""
  if path in CHOICES and value not in CHOICES[path]:
    return f"expected one of {', '.join(CHOICES[path])}"
  if path == "mesh.shape":
    bad = {k: v for k, v in dict(value).items() if k not in ("data", "fsdp", "tensor")
           or not isinstance(v, int) or isinstance(v, bool) or not (v >= 1 or v == -1)}
    return f"expected sizes of data, fsdp and tensor, each >= 1 or -1 (got {bad})" if bad else None
  if path == "data.buckets":
    ok = len(value) > 0 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    return None if ok else "expected one or more positive integers"
  if path in ("optim.freeze", "lora.patterns"):
    for pattern in value:
      try:
        re.compile(pattern)
      except (re.error, TypeError) as e:
        return f"{pattern!r} is not a regular expression ({e})"
    return None
  if isinstance(value, (tuple, list, str, bool)) or value is None:
    return None
  if path in POSITIVE and not value > 0:
    return "expected a value > 0"
  if path in UNIT:
    low, high, closed = UNIT[path]
    if not (low <= value <= high if closed else low <= value < high):
      return f"expected a value in [{low}, {high}{']' if closed else ')'}"
    return None
  if path == "init_seed" and value < -1:
    return "expected -1 (the seed) or a value >= 0"
  if value < 0 and path != "init_seed":
    return "expected a value >= 0"
  return None


def problems(config) -> list[str]:
  """Every problem of `config`'s fields and of their combinations, one message each."""
  if config.get("algorithm") not in ALGORITHMS:
    return [f"config.algorithm={config.get('algorithm')!r}: expected one of {', '.join(ALGORITHMS)}"]
  base = base_config(config.algorithm)
  out = []
  for path, value in _leaves(config):
    try:
      kind, default = _expected_type(base, path)
    except (KeyError, AttributeError):
      out.append(f"config.{path} is not a field of a {config.algorithm} config")
      continue
    if not _kind_ok(value, kind, default):
      out.append(f"config.{path}={value!r}: expected {_KIND_WORDS.get(kind, kind.__name__)}")
      continue
    problem = _field_problem(path, value)
    if problem:
      out.append(f"config.{path}={value!r}: {problem}")
  return out or _combination_problems(config)


def _combination_problems(config) -> list[str]:
  t, d, a = config.train, config.data, config.algorithm
  out = []
  if config.logging.wandb.project and importlib.util.find_spec("wandb") is None:  # before any work, not after it
    out.append(f"config.logging.wandb.project={config.logging.wandb.project!r} needs Weights & Biases: "
               f"pip install 'rlhfx[wandb]' (or leave the project empty)")
  if t.global_batch_size % t.grad_accum_steps:
    out.append(f"config.train.global_batch_size={t.global_batch_size} is not divisible by "
               f"config.train.grad_accum_steps={t.grad_accum_steps}")
  if d.max_prompt_length >= d.max_length:
    out.append(f"config.data.max_prompt_length={d.max_prompt_length} must be less than "
               f"config.data.max_length={d.max_length}")
  if d.max_completion_length >= d.max_length:
    out.append(f"config.data.max_completion_length={d.max_completion_length} must be 0 (no limit) or less than "
               f"config.data.max_length={d.max_length}")
  if not config.model.init_from and config.model.preset not in PRESETS:
    out.append(f"config.model.preset={config.model.preset!r} is not a preset; known presets: {sorted(PRESETS)} "
               f"(or set config.model.init_from)")
  kind = PARSERS[d.input_format][0]
  if d.packing and a not in ("sft", "dpo"):
    out.append(f"config.data.packing=True: packing is implemented for sft and dpo, not yet for {a}")
  if d.packing and a == "dpo" and PARSERS[d.input_format][0] != "preference":
    out.append("config.data.packing=True: packing is implemented for paired data, not for unpaired (KTO)")
  if d.packing and a == "dpo" and t.grad_accum_steps > 1:
    out.append(f"config.data.packing=True with config.train.grad_accum_steps={t.grad_accum_steps}: a packed DPO "
               f"batch is not split into micro-batches yet; use 1")
  if kind not in DATA_KINDS[a]:
    formats = [f for f, (k, _) in PARSERS.items() if k in DATA_KINDS[a]]
    out.append(f"config.data.input_format={d.input_format!r} gives {kind} data; {a} takes one of {', '.join(formats)}")
  if a == "dpo":
    loss = preference.LOSSES[config.dpo.loss]
    if loss.unpaired != (kind == "unpaired"):
      out.append(f"config.dpo.loss={config.dpo.loss!r} takes {'unpaired' if loss.unpaired else 'paired'} data but "
                 f"config.data.input_format={d.input_format!r} gives {kind} data")
    if config.dpo.loss == "exo_pair" and not config.dpo.label_smoothing > 0:
      out.append(f"config.dpo.label_smoothing={config.dpo.label_smoothing}: exo_pair's target (1 - eps, eps) needs "
                 "eps > 0 (the EXO paper uses 1e-3)")
    if loss.unpaired and config.dpo.sft_weight:
      out.append(f"config.dpo.sft_weight={config.dpo.sft_weight}: the SFT term needs paired data "
                 f"(not {config.dpo.loss})")
    if config.dpo.reference == "lora_base" and not config.lora.rank:
      out.append("config.dpo.reference='lora_base' needs config.lora.rank > 0")
    if config.dpo.reference == "frozen" and config.lora.rank and not loss.reference_free:
      out.append("config.dpo.reference='frozen' with config.lora.rank > 0 would keep a second copy of the base "
                 "weights; use 'lora_base' (or 'precomputed')")
  if a in ("ppo", "grpo"):
    sc = config.scoring
    if not (sc.model or sc.functions):
      out.append("set config.scoring.model (a reward model) or config.scoring.functions (reward functions), or both")
    if sc.weights and len(sc.weights) != len(sc.functions):
      out.append(f"config.scoring.weights has {len(sc.weights)} entries for {len(sc.functions)} scoring.functions")
    for i, spec in enumerate(sc.functions):
      if not reward_functions.is_spec(spec):
        out.append(f"config.scoring.functions[{i}]={spec!r}: expected {reward_functions.SPECS}")
      missing = reward_functions.missing_extra(spec)
      if missing:  # before any data is built, like every other field
        out.append(f"config.scoring.functions[{i}]={spec!r}: {missing}")

    if not SPEC.fullmatch(str(config.rollout.mesh)):
      out.append(f"config.rollout.mesh={config.rollout.mesh!r}: expected auto, training or tensor=<k>")
    group = config.rollout.group_size
    if a == "grpo" and group < 2:
      out.append(f"config.rollout.group_size={group}: group advantages need >= 2 samples per prompt")
    minibatches = config[a].minibatches
    rows = t.global_batch_size * group
    if rows % (minibatches * t.grad_accum_steps):
      out.append(f"{rows} rollout rows (global_batch_size x rollout.group_size) do not split into "
                 f"config.{a}.minibatches={minibatches} x config.train.grad_accum_steps={t.grad_accum_steps}")
  return out


def check(config) -> None:
  """Raise ConfigError (one line, every problem) unless `config` is a valid experiment config."""
  found = problems(config)
  if found:
    raise ConfigError("; ".join(found))


def check_model(config, model_config, data_parallel_size: int = 1, mesh=None) -> None:
  """Checks against the model's shape and the mesh: raise ConfigError naming the field."""
  if mesh is not None and config.algorithm in ("ppo", "grpo"):
    sampling_layout.check(config.rollout.mesh, mesh, model_config.num_kv_heads)
  t, d = config.train, config.data
  micro = t.global_batch_size // t.grad_accum_steps
  if micro % data_parallel_size:
    raise ConfigError(f"config.train.global_batch_size={t.global_batch_size} gives micro-batches of {micro} rows, "
                      f"not divisible by the data-parallel size {data_parallel_size} (mesh data x fsdp)")
  if d.max_length > model_config.max_seq_len:
    raise ConfigError(f"config.data.max_length={d.max_length} is longer than the model's context "
                      f"max_seq_len={model_config.max_seq_len}")
  if max(d.buckets) > model_config.max_seq_len:
    raise ConfigError(f"config.data.buckets={tuple(d.buckets)}: {max(d.buckets)} exceeds the model's context "
                      f"max_seq_len={model_config.max_seq_len}")
  if config.algorithm in ("ppo", "grpo") and model_config.positions == "learned" and (
      d.max_prompt_length + config.rollout.max_new_tokens > model_config.max_seq_len):
    raise ConfigError(f"config.data.max_prompt_length + config.rollout.max_new_tokens exceeds the model's context "
                      f"max_seq_len={model_config.max_seq_len}")
