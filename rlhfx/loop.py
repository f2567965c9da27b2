"""What every algorithm's train() shares: runtime set-up, data, model loading, sharded state, the step loop.

The loop (`run`) dispatches step n+1 before reading the metrics of step n, so the
host never waits on the device except to save a checkpoint. It saves every
`checkpoint_every` steps, at the end and on SIGTERM; a NaN/Inf in a metric stops
the run with a message naming the step, keeping the last good checkpoint; a
restart resumes from the latest complete checkpoint with the data iterator where
it was.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhfx import sharding
from rlhfx.checkpoint import Checkpointer, abstract
from rlhfx.data import builders, pipeline, synthetic
from rlhfx.data.tokenize import Truncation, load_tokenizer
from rlhfx.metrics import MetricsWriter, peak_flops_per_device, to_host
from rlhfx.config import ConfigError
from rlhfx.models import PRESETS, ModelConfig, Transformer, get_preset


class TrainingDiverged(RuntimeError):
  """A metric became NaN or Inf."""


# ----------------------------------------------------------------------------- runtime


@dataclasses.dataclass
class Runtime:
  mesh: jax.sharding.Mesh
  rules: tuple
  workdir: Path


def setup_runtime(config, workdir: str | os.PathLike) -> Runtime:
  """Fake CPU devices and multi-process set-up (before any JAX computation), then the mesh."""
  if config.mesh.num_cpu_devices:
    jax.config.update("jax_num_cpu_devices", config.mesh.num_cpu_devices)
  if config.distributed.coordinator_address and config.distributed.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  sharding.init_distributed(config.distributed)
  mesh = sharding.make_mesh(dict(config.mesh.shape))
  sharding.log_mesh(mesh)
  workdir = Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  return Runtime(mesh=mesh, rules=sharding.rules_from_config(config.mesh.rules), workdir=workdir)


def sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class Data:
  tokenizer: Any
  train: Any  # random-access source
  eval: Any | None
  counts: dict[str, int]
  truncation: Truncation


def prepare_data(config, workdir: Path, kind: str) -> Data:
  """Build the ArrayRecord dataset once (process 0), then open its splits and the tokenizer."""
  d = config.data
  data_dir = Path(d.dir) if d.dir else workdir / "data"
  files = list(d.train_files)
  if d.builtin:
    files = [data_dir / "raw" / f"{d.builtin}.jsonl"]
  if jax.process_index() == 0 and not any(data_dir.glob("*/*/dataset_info.json")):
    if d.builtin:
      synthetic.write_task(d.builtin, files[0], seed=config.seed)
    if not files:
      raise ConfigError("config.data.train_files is empty (and config.data.builtin is not set)")
    builders.build(kind, files, data_dir=data_dir, input_format=d.input_format, eval_fraction=d.eval_fraction,
                   split_seed=config.seed, on_error=d.on_error)
  sync("data_built")
  counts = builders.counts(data_dir)
  logging.info("data %s: %s", data_dir, counts)
  tokenizer = load_tokenizer(d.tokenizer or config.model.init_from)
  truncation = Truncation(max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                          max_completion_length=d.max_completion_length or None, prompt_side=d.prompt_side,
                          on_overlong=d.on_overlong)
  eval_source = builders.data_source(data_dir, "eval") if counts.get("written/eval") else None
  return Data(tokenizer, builders.data_source(data_dir, "train"), eval_source, counts, truncation)


def batches(config, data: Data, source, kind: str, *, seed: int, shuffle: bool = True, num_epochs=None,
            stats: pipeline.Stats | None = None, drop_remainder: bool = True):
  return pipeline.make_dataset(source, data.tokenizer, kind=kind, global_batch_size=config.train.global_batch_size,
                               buckets=tuple(config.data.buckets), truncation=data.truncation, seed=seed,
                               shuffle=shuffle, num_epochs=num_epochs, stats=stats,
                               read_threads=config.data.read_threads, drop_remainder=drop_remainder)


def full_batches(config, data: Data, source, kind: str, limit: int | None = None, keep_ids: bool = False):
  """Every example of `source` once, in order, in full-size batches: a short last batch is padded by
  repeating its last row, and `valid_B` marks the real rows (so shapes stay divisible over the mesh)."""
  size = config.train.global_batch_size // jax.process_count()
  for i, batch in enumerate(batches(config, data, source, kind, seed=0, shuffle=False, num_epochs=1,
                                    drop_remainder=False)):
    if limit is not None and i >= limit:
      return
    rows = len(next(iter(batch.values())))
    padded = {k: np.concatenate([v, np.repeat(v[-1:], size - rows, axis=0)]) for k, v in batch.items()
              if k != "example_id_B" or keep_ids}
    padded["valid_B"] = np.arange(size) < rows
    yield padded


# ----------------------------------------------------------------------------- model


def model_config_from(config, load_params: bool = True) -> tuple[ModelConfig, Any]:
  """(ModelConfig, numpy params or None for random init) from config.model; without `load_params` a Hugging
  Face model's config.json alone is read and the params are None (the planner)."""
  m = config.model
  overrides = {k: m[k] for k in ("dtype", "param_dtype", "remat", "scan_layers")}
  shape = {k: m[k] for k in ("vocab_size", "n_layers", "d_model") if m[k] is not None}
  if m.max_seq_len is not None:
    overrides["max_seq_len"] = m.max_seq_len
  params = None
  if m.init_from:
    if m.init_from.startswith("llama2c:"):
      from rlhfx.models.convert import from_llama2c

      model_config, params = from_llama2c(m.init_from.removeprefix("llama2c:"))
      model_config = model_config.replace(**overrides)
    elif load_params:
      from rlhfx.models.convert import from_hf

      model_config, params = from_hf(m.init_from, **overrides)
    else:
      from rlhfx.models.convert import hf_model_config

      model_config = hf_model_config(m.init_from, **overrides)
    changed = {k: v for k, v in shape.items() if getattr(model_config, k) != v}
    if changed:  # a pretrained model's shapes come from its checkpoint
      k, v = next(iter(changed.items()))
      raise ConfigError(f"config.model.{k}={v} differs from the pretrained model's {k}={getattr(model_config, k)} "
                        f"(config.model.init_from={m.init_from!r}); leave config.model.{k} unset")
  else:
    overrides.update(shape)
    if m.preset not in PRESETS:
      raise ConfigError(f"config.model.preset={m.preset!r} is not a preset; known presets: {sorted(PRESETS)}")
    model_config = get_preset(m.preset, **overrides)
  return model_config, params


def check_tokenizer(model_config: ModelConfig, tokenizer) -> None:
  """The tokenizer must fit the model's vocabulary; a missing pad token becomes EOS."""
  if len(tokenizer) > model_config.vocab_size:
    raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                      f"{model_config.vocab_size}; set config.model.vocab_size or config.data.tokenizer")
  if tokenizer.pad_token_id is None:
    tokenizer.pad_token = tokenizer.eos_token


def _init_fn(module: nn.Module):
  return lambda rng: module.init(rng, jnp.zeros((1, 4), jnp.int32))["params"]


def param_shardings(module: nn.Module, runtime: Runtime):
  """Shardings of a module's parameters from their logical axis names and the config's rules."""
  boxed = jax.eval_shape(lambda: _init_fn(module)(jax.random.key(0)))  # traced: nothing runs
  return sharding.tree_shardings(boxed, runtime.mesh, runtime.rules)


def abstract_params(module: nn.Module, runtime: Runtime):
  """ShapeDtypeStructs of a module's parameters carrying their shardings (restore targets)."""
  shapes = sharding.unbox(jax.eval_shape(lambda: _init_fn(module)(jax.random.key(0))))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                      param_shardings(module, runtime))


def put(params, shardings):
  """Host (numpy) params -> global arrays with the given shardings (each process builds its shards)."""
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]), params, shardings)


def init_params(model_config: ModelConfig, runtime: Runtime, rng, params=None, module: nn.Module | None = None):
  """Sharded parameters of `module` (default: the LM): random init compiled with out_shardings (never whole on
  one host), or `params` (numpy) placed onto the same shardings."""
  module = module or Transformer(model_config)
  shardings = param_shardings(module, runtime)
  if params is not None:
    return put(params, shardings)
  with sharding.active(runtime.mesh, runtime.rules):
    return jax.jit(lambda k: sharding.unbox(_init_fn(module)(k)), out_shardings=shardings)(rng)


def frozen_dtype(path, dtype, compute_dtype):
  """The dtype a frozen tree (reference, reward model) stores a leaf in: floating leaves in the compute dtype.

  Every use casts weights to the compute dtype first (Dense, Embed, Norm), so the model computes the
  same numbers from it in half the memory under bfloat16; a reward model's score head ("score", float32
  by design) and integer leaves keep their dtype.
  """
  if any(getattr(k, "key", None) == "score" for k in path) or not jnp.issubdtype(dtype, jnp.floating):
    return dtype
  return compute_dtype


def frozen_copy(tree, compute_dtype):
  """A copy of a frozen tree, each leaf in its `frozen_dtype`, on the same shardings."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.array(x, dtype=frozen_dtype(path, x.dtype, compute_dtype), copy=True), tree)


def state_shardings(state):
  return jax.tree.map(lambda x: x.sharding, state)


@dataclasses.dataclass
class Setup:
  runtime: Runtime
  model_config: ModelConfig
  loaded_params: Any  # numpy params from config.model.init_from, or None
  data: Data


def setup(config, workdir, kind: str) -> Setup:
  """Runtime, model config (validated against the config), dataset and tokenizer; the config saved as JSON."""
  from rlhfx.config import validate

  runtime = setup_runtime(config, workdir)
  model_config, loaded = model_config_from(config)
  validate(config, model_config, sharding.data_parallel_size(runtime.mesh))
  data = prepare_data(config, runtime.workdir, kind=kind)
  check_tokenizer(model_config, data.tokenizer)
  save_config(config, runtime.workdir)
  return Setup(runtime, model_config, loaded, data)


def create_state(params, optimizer, runtime: Runtime, init=None):
  """(state, its shardings): `init(params)` (default: a TrainState) built on device from sharded params, every
  leaf sharded like its parameter (rlhfx.train_state.create_state)."""
  from rlhfx import train_state

  init = init or functools.partial(train_state.init_state, optimizer=optimizer)
  with sharding.active(runtime.mesh, runtime.rules):
    return train_state.create_state(init, params, runtime.mesh)


# ----------------------------------------------------------------------------- the loop


class _Preemption:
  """SIGTERM sets a flag; the loop saves and exits at the next step."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint and stopping")
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      try:
        from jax.experimental import multihost_utils

        return multihost_utils.reached_preemption_sync_point(step) or self.requested
      except Exception:  # noqa: BLE001 (no preemption service): fall back to the local flag
        pass
    return self.requested

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def drop_ids(batch: dict) -> dict:
  return {k: v for k, v in batch.items() if k != "example_id_B"}


@dataclasses.dataclass
class LoopResult:
  state: Any
  last_metrics: dict[str, float]
  stopped_early: bool
  start_step: int


def run(*, config, runtime: Runtime, state, step_fn: Callable, train_iter: Iterator, checkpointer: Checkpointer,
        writer: MetricsWriter, tokens_per_step: Callable[[dict], float], flops_per_token: float,
        loss_key: str, evaluate: Callable[[Any, int], dict] | None = None,
        metadata: Callable[[], dict] | None = None, prepare: Callable[[dict], dict] | None = None) -> LoopResult:
  """Run steps from state.step to config.train.num_steps (see the module docstring).

  `prepare` edits each host batch before it becomes a global array (default: drop
  the pipeline's `example_id_B`); `train_iter` is what checkpoints store.
  """
  prepare = prepare or drop_ids
  t = config.train
  start = int(jax.device_get(state.step))
  preemption = _Preemption()
  pending = None  # (step, device metrics, batch tokens)
  last: dict[str, float] = {}
  t_last = time.perf_counter()
  peak = writer.peak_flops

  def finish(step, device_metrics, tokens):
    nonlocal last, t_last
    host = to_host(device_metrics)
    bad = [k for k, v in host.items() if not np.isfinite(v)]
    if bad:
      good = checkpointer.latest_step()
      raise TrainingDiverged(f"step {step}: {', '.join(bad)} = {[host[k] for k in bad]}; stopping. "
                             f"The last good checkpoint is step {good} in {checkpointer.directory}")
    now = time.perf_counter()
    host["perf/step_s"] = now - t_last
    host["perf/tokens_per_s"] = tokens / host["perf/step_s"]
    if peak:
      host["perf/mfu"] = host["perf/tokens_per_s"] * flops_per_token / (peak * jax.device_count())
    t_last = now
    last = host
    if step % t.log_every == 0 or step == t.num_steps:
      writer.write(step, host)
      writer.progress(step, start, host, loss_key)

  def save(step):
    checkpointer.save(step, {"state": state}, metadata={"step": step, **(metadata() if metadata else {})},
                      data_iterator=train_iter)

  stopped = False
  try:
    for step in range(start + 1, t.num_steps + 1):
      local = prepare(next(train_iter))
      batch = sharding.global_batch(local, runtime.mesh)
      state, device_metrics = step_fn(state, batch)
      if pending is not None:
        finish(*pending)
      pending = (step, device_metrics, tokens_per_step(local) * jax.process_count())
      preempted = preemption.reached(step)
      if t.sigterm_at_step and step == t.sigterm_at_step:
        os.kill(os.getpid(), signal.SIGTERM)
        preempted = preemption.reached(step)
      if step % t.checkpoint_every == 0 or step == t.num_steps or preempted:
        finish(*pending)  # a checkpoint only of a state whose step was finite
        pending = None
        save(step)
      if evaluate is not None and ((t.eval_every and step % t.eval_every == 0) or step == t.num_steps):
        if pending is not None:
          finish(*pending)
          pending = None
        eval_metrics = evaluate(state, step)
        writer.write(step, eval_metrics)
        logging.info("step %d eval: %s", step, eval_metrics)
      if preempted:
        stopped = True
        break
    if pending is not None:
      finish(*pending)
  finally:
    preemption.restore()
    checkpointer.wait()
  return LoopResult(state=state, last_metrics=last, stopped_early=stopped, start_step=start)


def restore_or_init(checkpointer: Checkpointer, state, train_iter) -> tuple[Any, int]:
  """Resume from the latest complete checkpoint (onto the current state's shardings), if there is one."""
  step = checkpointer.latest_step()
  if step is None:
    return state, 0
  target = abstract(state, state_shardings(state))
  trees, meta = checkpointer.restore(step, {"state": target}, data_iterator=train_iter)
  if jax.process_index() == 0:
    print(f"resumed from step {step} ({checkpointer.directory})", flush=True)
  return trees["state"], step


def resume(config, workdir: Path, state, train_iter, frozen: dict | None = None) -> tuple[Checkpointer, Any, int]:
  """The run's checkpoint manager, and the state (and iterator) restored from its latest checkpoint if any.

  Where every array of the state and of the `frozen` trees lives is written to <workdir>/placement.json
  (key path -> shape, dtype, PartitionSpec, bytes on one device), after the restore.
  """
  checkpointer = Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints,
                              async_save=config.train.async_checkpoints)
  state, start = restore_or_init(checkpointer, state, train_iter)
  if jax.process_index() == 0:
    trees = {"state": state, **{k: v for k, v in (frozen or {}).items() if v is not None}}
    placement = {"step": start, "mesh": dict(state.step.sharding.mesh.shape),
                 **{name: sharding.describe(tree) for name, tree in trees.items()}}
    (workdir / "placement.json").write_text(json.dumps(placement, indent=1))
  return checkpointer, state, start


@dataclasses.dataclass
class Outcome:
  result: LoopResult
  before: dict[str, float]  # eval metrics before the first step ({} when resumed)
  after: dict[str, float]  # eval metrics after the last step ({} when stopped early)

  @property
  def final(self) -> dict[str, float]:
    return {**self.result.last_metrics, **self.after}


def train_and_evaluate(*, config, runtime: Runtime, state, start: int, step_fn, train_iter, checkpointer,
                       tokens_per_step, flops_per_token: float, evaluate, prepare=None) -> Outcome:
  """Evaluate, run the loop with metrics written to the workdir, evaluate again."""
  writer = MetricsWriter(runtime.workdir, total_steps=config.train.num_steps, peak_flops=peak_flops_per_device())
  before = evaluate(state, start) if start == 0 else {}
  if before:
    writer.write(start, before)
  try:
    with sharding.active(runtime.mesh, runtime.rules):
      result = run(config=config, runtime=runtime, state=state, step_fn=step_fn, train_iter=train_iter,
                   checkpointer=checkpointer, writer=writer, tokens_per_step=tokens_per_step,
                   flops_per_token=flops_per_token, loss_key="train/loss", evaluate=evaluate, prepare=prepare)
  finally:
    checkpointer.close()
    writer.close()
  after = {} if result.stopped_early else evaluate(result.state, config.train.num_steps)
  if result.stopped_early and jax.process_index() == 0:
    print(f"stopped at step {int(jax.device_get(result.state.step))} (SIGTERM); rerun the same command to resume",
          flush=True)
  return Outcome(result, before, after)


def save_config(config, workdir: Path) -> None:
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(json.dumps(json.loads(config.to_json_best_effort()), indent=2))
