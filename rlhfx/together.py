"""Train a sweep's members together, each still a run of its own: python -m rlhfx.together.

  python -m rlhfx.together --config=configs/dpo_hh.py:tiny --root=/tmp/sweeps/dpo [--runs=00-...,02-...] \\
      [--config.train.num_steps=50]

The config file's `sweep()` entries are named as `launch/sweep.py` names them (<root>/<name>); those that differ
only in numbers (`rlhfx.members.NUMBERS`) are trained as one program (`rlhfx.members`), one program after
another for entries that differ in anything else (the command says how it grouped them). `--runs` picks entries
by name (launch/sweep.py --together passes one program's). Entries finished before (<root>/<name>/sweep_done.json)
are left out.

Each member writes <root>/<name>/ as a separate run would: config.json and inputs.json (the same as a separate
run's: rerunning that member alone resumes it), metrics.jsonl, TensorBoard, samples.jsonl, its own checkpoints
(its state alone: `python -m rlhfx.main` restores it as well), placement.json (the stacked state with its member
axis, the frozen trees once), its exports and summary, and sweep_done.json when it reaches train.num_steps. The
dataset is built once, in the first member's data/. A member whose metrics go NaN (or diverge:
config.train.on_divergence) stops alone, with its checkpoints kept; the others go on. SIGTERM saves every member
(exit 75); the rerun resumes them all. Exit status 0: every member finished; 1: one failed; 75: stopped by
SIGTERM after saving.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from rlhfx import (checkpoint, config as config_lib, errors, evaluation, export, members, metrics, scoring, sharding,
                   storage, validation, workdir as workdirs)
from rlhfx.data import prepare
from rlhfx.data.formats import PARSERS
from rlhfx.errors import run_cli, usage
from rlhfx.metrics import TrainingDiverged
from rlhfx.models import load, lora

MAIN_METRIC = {"sft": "eval/loss", "reward": "eval/accuracy", "dpo": "eval/rewards/accuracies"}  # the summary's


def _heldout(config, data, program, tables):
  """(host eval batches, outputs -> metrics) of the algorithm (its own `heldout_metrics` / `accuracy`)."""
  module = members.algorithm_module(config.algorithm)
  if config.algorithm == "sft":
    return (lambda: prepare.full_batches(config, data, data.eval, limit=config.train.eval_batches),
            module.heldout_metrics)
  if config.algorithm == "reward":
    return lambda: prepare.full_batches(config, data, data.eval), module.accuracy
  return (lambda: (module.with_reference(b, tables.get("eval"))
                   for b in prepare.full_batches(config, data, data.eval, keep_ids=True)),
          lambda outs: module.heldout_metrics(outs, program.settings, config.train.global_batch_size))


def _member_outputs(outputs: list, i: int) -> list:
  """Member i's (outputs, valid_B, batch) from every member's ([M, ...] leaves)."""
  return [(jax.tree.map(lambda x: x[i], out), valid_B, local) for out, valid_B, local in outputs]


class _Member:
  """One member's run: its work directory, checkpointer and log; `failed` once it stopped alone."""

  def __init__(self, name, config, workdir):
    self.name, self.config, self.workdir = name, config, workdir
    self.checkpointer = self.log = None
    self.failed: str | None = None
    self.before: dict = {}
    self.after: dict = {}


def train(configs: dict, workdirs_by_name: dict, *, loss=None, spec: str = "") -> dict[str, str]:
  """Train `configs` ({name: config}, members of one program: `members.check`) into their work directories;
  returns {name: "finished" | "failed: ..."}. Raises `checkpoint.Preempted` after SIGTERM saved every member."""
  began = time.time()
  for c in configs.values():
    validation.check(c)
  members.check(configs)
  names = list(configs)
  config = configs[names[0]]
  t = config.train
  runtime = sharding.setup(config, workdirs.location(workdirs_by_name[names[0]]))
  mesh = runtime.mesh
  runs = [_Member(n, configs[n], workdirs.location(workdirs_by_name[n])) for n in names]
  for r in runs:
    workdirs.claim(r.config, r.workdir)
  model_config = load.model_config(config, load_params=False)[0]
  validation.check_model(config, model_config, sharding.data_parallel_size(mesh), mesh)
  data = prepare.prepare(config, runs[0].workdir, kind=PARSERS[config.data.input_format][0])
  load.check_tokenizer(model_config, data.tokenizer)
  print(f"together: {len(runs)} members in one program ({', '.join(names)}); numbers per member: "
        f"{', '.join(sorted(members.numbers(configs)))}", flush=True)
  module = members.algorithm_module(config.algorithm)
  with sharding.active(mesh, runtime.rules):
    program = members.init(configs, model_config, load.Trees.of_run(config, runtime), loss=loss)
    tables = {}
    if config.algorithm == "dpo" and program.settings.reference == "precomputed":  # the same for every member
      fn, policy = module.jit_reference_logps(program.settings), module.initial_policy(program.initial[0].state.params)
      tables = {split: module.precompute_reference(config, data, source, policy, fn, mesh)
                for split, source in (("train", data.train), ("eval", data.eval)) if source is not None}
    train_iter = iter(prepare.batches(config, data, data.train, seed=config.seed))
    starts = {}
    states = []
    for r, initial in zip(runs, program.initial):
      r.checkpointer, state, starts[r.name] = checkpoint.resume(r.config, r.workdir, initial.state, train_iter,
                                                                frozen=program.frozen)
      states.append(state)
    if len(set(starts.values())) > 1:
      raise checkpoint.CheckpointError(f"members resume from different steps ({starts}): members of one program "
                                       f"go step by step together; run these members apart (launch/sweep.py "
                                       f"without --together) or remove the later checkpoints")
    start = starts[names[0]]
    state_M = members.stack(states, program.axes, program.shardings)
    del states
    program.initial = [_drop_arrays(i) for i in program.initial]
    for i, r in enumerate(runs):
      if jax.process_index() == 0:
        storage.write_text(r.workdir / "placement.json", json.dumps(
            {"step": start, "mesh": dict(mesh.shape), **members.placement(program, state_M, i)}, indent=1))
      r.log = metrics.StepLog.of_run(r.config, r.workdir, data, r.checkpointer, start, program.flops_per_token)
      r.log.writer.label, r.log.announces = r.name, i == 0
    batches, heldout_metrics = _heldout(config, data, program, tables)
    prepare_batch = ((lambda b: module.with_reference(b, tables.get("train"))) if config.algorithm == "dpo"
                     else prepare.drop_ids)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(program.axis))  # like the members

    def live() -> list[_Member]:
      return [r for r in runs if r.failed is None]

    def alive_array():  # placed once, again only when a member stops
      return jax.device_put(np.asarray([r.failed is None for r in runs]), replicated)

    alive = alive_array()

    def stop(r: _Member, e: Exception) -> None:
      nonlocal alive
      r.failed = f"failed: {e}"
      alive = alive_array()
      print(f"{r.name}: rlhfx: {type(e).__name__}: {e} (this member stopped; the others go on)", flush=True)
      r.log.writer.close()

    def guarded(r: _Member, fn, *args):
      try:
        return fn(*args)
      except TrainingDiverged as e:
        stop(r, e)

    def evaluate(step: int) -> None:
      if data.eval is None:
        return
      for r in live():
        guarded(r, r.log.flush)
      if step == start and step > 0:  # resumed: the first evaluation is the step-0 row
        for r in live():
          r.before = metrics.first_evaluation(r.workdir)
        return
      t0 = time.perf_counter()
      outs = list(evaluation.outputs(lambda b: program.evaluate(state_M.params, b), batches(), mesh))
      seconds = time.perf_counter() - t0
      print(f"eval: step {step}: {len(live())} members in {seconds:.1f} s", flush=True)
      for i, r in enumerate(runs):
        if r.failed is None:
          result = r.log.evaluated(step, heldout_metrics(_member_outputs(outs, i)), seconds)
          if step == start:
            r.before = result
          r.after = result
          if config.algorithm in ("sft", "dpo"):
            evaluation.log_heldout_samples(r.log, step, r.config, lora.effective(
                program.member_params(state_M.params, i), lora.scale(config.lora)), model_config, data,
                reference="completion" if config.algorithm == "sft" or program.settings.unpaired else "chosen")

    evaluate(start)
    with contextlib.ExitStack() as stack:
      preemption = stack.enter_context(checkpoint.Preemption(runs[0].checkpointer.directory))
      for r in runs:
        stack.enter_context(r.checkpointer)
      for step in runs[0].log.steps(start + 1, t.num_steps):
        for r in runs[1:]:
          r.log._began = runs[0].log._began
        batch = next(train_iter)
        state_M, metrics_M = program.step(state_M, sharding.global_batch(prepare_batch(batch), mesh),
                                          *program.frozen_args, program.numbers, alive)
        tokens = prepare.tokens(batch)
        for r in live():
          i = runs.index(r)
          guarded(r, lambda r=r, i=i: r.log.record(step, jax.tree.map(lambda x: x[i], metrics_M), tokens=tokens))
        preempted = preemption.reached(step)
        if checkpoint.due(step, t, preempted):
          for r in live():
            guarded(r, r.log.flush)
          for r in live():
            r.log.writer.publish()
            r.checkpointer.save(step, {"state": program.member_state(state_M, runs.index(r))},
                                data_iterator=train_iter)
        if preempted:
          break
        if not live():
          print("together: every member stopped", flush=True)
          break
        if metrics.evaluation_due(step, t):
          evaluate(step)
      for r in live():
        guarded(r, r.log.close)
  statuses = {}
  for i, r in enumerate(runs):
    if r.failed:
      statuses[r.name] = r.failed
      continue
    _finish(r, i, program, state_M, model_config, data)
    statuses[r.name] = "finished"
    if jax.process_index() == 0:
      storage.write_text(r.workdir / members.DONE, json.dumps(
          {"config": spec, "together": names, "seconds": time.time() - began}))
  return statuses


def _drop_arrays(initial):
  """A member's Initial without its arrays (its state's shapes and shardings are all the program needs now)."""
  initial.state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), initial.state)
  return initial


def _heldout_lines(algorithm: str, before: dict, after: dict) -> list[str]:
  """The summary's held-out line, as the algorithm's own run says it."""
  key = MAIN_METRIC[algorithm]
  if key not in before or key not in after:
    return []
  if algorithm == "sft":
    return [f"eval loss {before[key]:.3f} -> {after[key]:.3f} (perplexity {before['eval/perplexity']:.2f} -> "
            f"{after['eval/perplexity']:.2f})"]
  if algorithm == "reward":
    return [f"held-out accuracy {before[key]:.1%} -> {after[key]:.1%} (95% interval "
            f"{after['eval/accuracy_low95']:.1%}-{after['eval/accuracy_high95']:.1%}, {after['eval/pairs']} pairs)"]
  margins = "eval/rewards/margins"
  tied = abs(before.get(margins, 1.0)) < 1e-4
  return [f"held-out rewards/accuracies {before[key]:.1%} -> {after[key]:.1%}; rewards/margins "
          f"{before.get(margins, float('nan')):.3f} -> {after.get(margins, float('nan')):.3f}"
          + (" (at step 0 the policy is the reference: its margins are float32 round-off of the batched members' "
             "pass, and the accuracy counts their signs)" if tied else "")]


def _finish(r: _Member, i: int, program, state_M, model_config, data) -> None:
  """A finished member's exports and summary, as its algorithm's `train` writes them."""
  config, mesh = r.config, program.mesh
  params = program.member_params(state_M.params, i)
  lines = _heldout_lines(config.algorithm, r.before, r.after)
  if config.algorithm == "reward":
    module = members.algorithm_module("reward")
    with sharding.active(mesh, program.rules):
      outs = list(evaluation.outputs(lambda b: program.evaluate(state_M.params, b), prepare.full_batches(
          config, data, data.train, limit=config.reward.stats_batches), mesh))
    stats = module.reward_stats(_member_outputs(outs, i))
    scorer_params = lora.effective(params, lora.scale(config.lora))
    exported = scoring.export_reward_model(r.workdir / scoring.EXPORT_DIR, model_config, scorer_params, stats)
    if jax.process_index() == 0:
      storage.write_text(r.workdir / "checkpoints" / "reward_stats.json", json.dumps(stats, indent=2))
    lines += [f"reward mean {stats['mean']:.3f}, std {stats['std']:.3f} over {stats['count']} train completions",
              f"reward model for PPO/GRPO (config.scoring.model): {exported}"]
    lines += export.export_reward_model_hf(config, model_config, scorer_params, data.tokenizer, stats,
                                           exported / "hf")
  else:
    lines += export.export_policy(config, model_config, params, data.tokenizer, r.workdir)
  export.print_summary(f"{r.name}: {config.algorithm} member of a program of {len(program.names)} for "
                       f"{config.train.num_steps} steps", lines, r.workdir, data)


# ----------------------------------------------------------------------------- the command


_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file with a sweep() function",
                                          lock_config=True)
_ROOT = flags.DEFINE_string("root", None, "the sweep's directory: one work directory per member under it")
_RUNS = flags.DEFINE_list("runs", [], "the sweep entries to train, by name (default: every entry not finished)")


def plan_groups(config, spec: str, root: str, only: list[str]) -> list[dict]:
  """[{name: (entry, config, workdir)}] per program: the sweep's entries (those named by `only`, those not
  finished), grouped by `members.group`."""
  entries = members_entries(spec)
  named = {members.run_name(i, e): e for i, e in enumerate(entries)}
  unknown = [n for n in only if n not in named]
  if unknown:
    raise config_lib.ConfigError(f"--runs: no sweep entry named {unknown[0]!r} (entries: {', '.join(named)})")
  chosen = {n: e for n, e in named.items() if (not only or n in only)
            and not (storage.path(f"{root.rstrip('/')}/{n}") / members.DONE).exists()}
  names = list(chosen)
  groups = members.group(config.algorithm, list(chosen.values())) if chosen else []
  return [{names[i]: (chosen[names[i]], members.apply(config, chosen[names[i]]), f"{root.rstrip('/')}/{names[i]}")
           for i in g} for g in groups]


def members_entries(spec: str) -> list[dict]:
  module = config_lib.load_module(spec.partition(":")[0])
  if not hasattr(module, "sweep"):
    raise config_lib.ConfigError(f"{spec.partition(':')[0]} has no sweep() function")
  return module.sweep()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if not _ROOT.value:
    errors.report("rlhfx.together", config_lib.ConfigError("--root is required: the sweep's directory"))
  spec = flags.FLAGS["config"].config_filename
  checkpoint.raise_on_sigterm()
  try:
    groups = plan_groups(_CONFIG.value, spec, _ROOT.value, _RUNS.value)
    for k, g in enumerate(groups):
      shared = members.shared_overrides([entry for entry, _, _ in g.values()])
      print(f"together: program {k + 1} of {len(groups)}: {', '.join(g)}"
            + (f" ({', '.join(f'{a}={b}' for a, b in shared.items())})" if shared else ""), flush=True)
    failed = []
    for g in groups:
      statuses = train({n: c for n, (_, c, _) in g.items()}, {n: w for n, (_, _, w) in g.items()}, spec=spec)
      failed += [f"{n}: {s}" for n, s in statuses.items() if s != "finished"]
  except errors.USER_ERRORS as e:
    errors.report("rlhfx.together", e)
  except checkpoint.Preempted as e:
    print(f"rlhfx.together: {e}", flush=True)
    sys.exit(checkpoint.Preempted.RESUME_EXIT)
  if failed:
    print("rlhfx.together: members that stopped:\n  " + "\n  ".join(failed), flush=True)
    sys.exit(1)


def run():
  run_cli(main, "rlhfx.together", usage("rlhfx.together", __doc__, ("config", "root", "runs")))


if __name__ == "__main__":
  run()
