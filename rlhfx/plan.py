"""Will it fit? Compile a config's programs for a TPU slice on any host and report memory, FLOPs and collectives.

  python -m rlhfx.plan --config=configs/dpo_llama3_8b.py --topology=v5e-16 [--config.a.b=v] [--json]
  python -m rlhfx.plan --config=configs/dpo_llama3_8b.py --topology=v5e-16 --search [--search_limit=4]
  python -m rlhfx.plan --config=configs/grpo_llama3_8b.py --topology=v5p-64 --search_rollout
  python -m rlhfx.plan --config=configs/dpo_llama3_8b.py --topology=v5e-16 --members=8 [--members_fit]

The programs are the ones a run executes (`rlhfx.programs`), built from ShapeDtypeStructs
on a mesh over the slice's devices (`rlhfx.topology`) and compiled by the TPU compiler
(libtpu): no parameter is allocated. Per chip, from the compiler: arguments, outputs not
aliased to a donated argument, temporaries, and their total against the chip's HBM; from
the trees themselves: how the arguments split into parameters, optimizer state, frozen
trees and batch (both are printed when they disagree by more than 10%). FLOPs come from
the model's shape (the compiler's cost analysis counts a loop's body once).

With --members=N the program is the step of N members of a sweep trained together (`rlhfx.members`): every
member's parameters and optimizer state, the frozen trees and the LoRA base once; --members_fit also finds the
largest N that fits (from the per-member growth of two compiles, then checked by compiling it and the next).

The time per call is an estimate, not a measurement (`rlhfx.hlo`): the compiled program is
split into its loop bodies, each run as often as its loops' trip counts say (layers,
decode steps, micro-batches, epochs), and each body costs the largest of its FLOPs at the
chip's peak, its HBM bytes at the chip's bandwidth and its collective bytes at the chip's
inter-chip bandwidth. A rollout also gets its time per generated token, tokens/s per chip
and the collective bytes inside its decode loop per token.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from typing import Any

import jax
import numpy as np

from rlhfx import hlo_cost, members as members_lib, programs, sampling_layout, sharding, topology, validation
from rlhfx.config import ConfigError
from rlhfx.errors import USER_ERRORS, run_cli, usage
from rlhfx.models import Transformer, load
from rlhfx.plan_report import render, render_rollout_search, render_search
from rlhfx.topology import GiB


def per_chip_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs (or arrays) with NamedShardings (the largest shard)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


@dataclasses.dataclass
class ProgramPlan:
  name: str
  fits: bool
  bytes_per_chip: dict[str, int]  # compiler: arguments, outputs, temporaries, code, total
  parts_per_chip: dict[str, int]  # our own sums over the argument trees
  flops: float  # per chip, from the model's shape
  compiler_flops: float | None  # per chip, the compiler's cost analysis (a loop's body once)
  collectives: dict[str, dict[str, float]]  # kind -> count and bytes per call, every loop's trip count applied
  estimate_s: float | None  # per call: each loop body at the largest of compute, HBM and interconnect time
  compile_s: float
  error: str = ""  # the compiler's reason when it did not compile (out of memory, ...)
  kernel_calls: int = 0  # Mosaic custom calls in the program text (splash attention), a loop body once
  collective_bytes: float = 0.0  # per chip per call, trip counts applied
  hbm_bytes: float = 0.0  # per chip per call, trip counts applied
  bound: str = ""  # what the estimate is mostly made of: compute, memory or communication
  unknown_loops: int = 0  # loops whose trip count the program does not state (the engine's; see rlhfx.hlo)
  per_token_s: float | None = None  # rollouts: the estimate per decode step (one token for every row)
  tokens_per_s_per_chip: float | None = None  # rollouts: generated tokens per second per chip
  decode_collective_bytes_per_token: float | None = None  # rollouts: collectives inside the decode loop per step
  decode_hbm_bound_s: float | None = None  # rollouts: the weights and the KV cache read once, per decode step


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  for line in text.splitlines():
    if "RESOURCE_EXHAUSTED" in line or "exceeds" in line or "Ran out of memory" in line:
      return line.strip()
  return text.splitlines()[0] if text else type(e).__name__


# FLOPs the chip runs per model FLOP: full rematerialisation runs each layer's forward again in the backward
# pass (2 of the 6 N per token); "dots" saves the matmul outputs and recomputes only elementwise work
RECOMPUTE = {"none": 1.0, "dots": 1.0, "dots_no_batch": 1.0, "full": 8 / 6}


def estimate(p: programs.Program, cost: hlo_cost.ProgramCost, chip: topology.Chip, flops_per_chip: float,
             remat: str) -> tuple[float, str]:
  """(seconds per call, what bounds it). The HLO's dot FLOPs are rescaled to the model's (XLA's windowed
  einsums count some taps more than once); the model's FLOPs at peak stay a floor."""
  model_flops = flops_per_chip * (RECOMPUTE.get(remat, 1.0) if p.trains else 1.0)
  scale = model_flops / cost.flops if cost.flops else 1.0
  seconds = cost.seconds(chip.peak_flops, chip.hbm_bandwidth, chip.ici_bandwidth, flops_scale=scale)
  return max(seconds, model_flops / chip.peak_flops), cost.bound(chip.peak_flops, chip.hbm_bandwidth,
                                                                 chip.ici_bandwidth, flops_scale=scale)


def decode_bound(p: programs.Program, parts: dict[str, int], chip: topology.Chip, compute_itemsize: int) -> float:
  """Seconds per decode step to read the policy's weights (in the compute dtype) and the KV cache once."""
  weights = p.parts.get("sampled policy", p.parts.get("parameters: policy"))
  nbytes = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * min(np.dtype(x.dtype).itemsize, compute_itemsize)
               for x in jax.tree.leaves(weights))
  return (nbytes + parts.get("KV cache (inside temporaries)", 0)) / chip.hbm_bandwidth


def plan_program(p: programs.Program, runtime, chip: topology.Chip, remat: str = "none",
                 compute_itemsize: int = 2) -> ProgramPlan:
  """Compile one program for the slice and read its per-chip memory, FLOPs and collectives."""
  chips = runtime.mesh.size
  mesh, rules = p.mesh or runtime.mesh, p.rules or runtime.rules
  parts = {k: per_chip_bytes(v) for k, v in p.parts.items() if v is not None}
  if p.kv_cache is not None:  # rows split over the batch axes
    parts["KV cache (inside temporaries)"] = sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(
        p.kv_cache)) // sharding.data_parallel_size(mesh)
  resident = sum(per_chip_bytes(v) for v in (p.resident or {}).values() if v is not None)
  flops = p.flops / chips
  print(f"plan: compiling {p.name} for {chips} chips ...", end="", file=sys.stderr, flush=True)  # minutes at scale
  t0 = time.perf_counter()
  cache = jax.config.jax_enable_compilation_cache
  try:  # a persistent compilation cache holds executables to load on a client; these have none to load on
    jax.config.update("jax_enable_compilation_cache", False)
    with sharding.active(mesh, rules):
      compiled = p.fn.lower(*p.args).compile()
  except Exception as e:  # noqa: BLE001 (the compiler's own message is the report)
    print(f" did not compile ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return ProgramPlan(p.name, False, {}, parts, flops, None, {}, None, time.perf_counter() - t0, _first_line(e))
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)
  compile_s = time.perf_counter() - t0
  print(f" {compile_s:.0f} s", file=sys.stderr, flush=True)
  m = compiled.memory_analysis()
  outputs = m.output_size_in_bytes - m.alias_size_in_bytes
  total = m.argument_size_in_bytes + outputs + m.temp_size_in_bytes + m.generated_code_size_in_bytes + resident
  memory = {"arguments": m.argument_size_in_bytes, "outputs": outputs, "temporaries": m.temp_size_in_bytes,
            "code": m.generated_code_size_in_bytes, **({"resident": resident} if resident else {}), "total": total}
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  compiler_flops = float(cost.get("flops", 0.0)) if cost else None
  text = compiled.as_text()
  cost = hlo_cost.program_cost(text, unknown_trips=max(p.decode_steps, 1))
  seconds, bound = estimate(p, cost, chip, flops, remat)
  rollout = {}
  if p.generated_tokens:
    steps = p.decode_steps + 1  # the prefill samples the first token
    rollout = dict(per_token_s=seconds / steps, tokens_per_s_per_chip=p.generated_tokens / seconds / chips,
                   decode_collective_bytes_per_token=cost.decode_collective_bytes(p.decode_steps),
                   decode_hbm_bound_s=decode_bound(p, parts, chip, compute_itemsize))
  return ProgramPlan(p.name, total <= chip.hbm_bytes, memory, parts, flops, compiler_flops, cost.collectives(),
                     seconds, compile_s, kernel_calls=text.count('custom_call_target="tpu_custom_call"'),
                     collective_bytes=cost.collective_bytes, hbm_bytes=cost.hbm_bytes, bound=bound,
                     unknown_loops=cost.unknown_loops, **rollout)


def runtime_for(config, devices) -> sharding.Runtime:
  mesh = sharding.make_mesh(dict(config.mesh.shape), devices)
  return sharding.Runtime(mesh=mesh, rules=sharding.rules_from_config(config.mesh.rules), workdir=None)


@dataclasses.dataclass(frozen=True)
class Target:
  """A config checked and laid out on a slice: what planning any of its programs needs."""

  chip: topology.Chip
  runtime: sharding.Runtime
  model_config: Any

  @classmethod
  def of(cls, config, topology_name: str) -> "Target":
    validation.check(config)
    chip, devices = topology.devices(topology_name)
    runtime = runtime_for(config, devices)
    model_config, _ = load.model_config(config, load_params=False, platform="tpu")
    validation.check_model(config, model_config, sharding.data_parallel_size(runtime.mesh), runtime.mesh)
    return cls(chip, runtime, model_config)

  def plan(self, p: programs.Program) -> ProgramPlan:
    return plan_program(p, self.runtime, self.chip, self.model_config.remat,
                        np.dtype(self.model_config.jnp_dtype).itemsize)

  def plan_rollout(self, config, layout: str) -> ProgramPlan:
    """The rollout of `config` sampled in `config.rollout.mesh = layout`, as a program of its own."""
    trial = copy.deepcopy(config)
    trial.rollout.mesh, trial.train.time_phases = layout, True
    return self.plan(next(p for p in programs.build(trial, self.model_config, self.runtime) if p.name == "rollout"))


def plan(config, topology_name: str, members: int = 0, members_fit: bool = False) -> dict[str, Any]:
  """The planner's report for one config on one slice (the JSON `--json` prints); with `members`, of the step of
  that many members trained together (and, with `members_fit`, the largest count that fits)."""
  target = Target.of(config, topology_name)
  chip, runtime, model_config = target.chip, target.runtime, target.model_config
  devices = list(runtime.mesh.devices.flat)
  if members:
    plans = [target.plan(p) for p in programs.members(config, model_config, runtime, members)]
  else:
    plans = [target.plan(p) for p in programs.build(config, model_config, runtime)]
  fit = largest_members(config, target, {members: plans[0]} if members else {}) if members_fit else None
  layout_fix = _sampling_layout_that_fits(config, target, plans)
  return {
      "topology": topology_name, "compiler_topology": topology.compiler_name(topology_name)[1],
      "rollout_mesh": config.rollout.mesh if config.algorithm in ("ppo", "grpo") else None,
      **({"rollout_mesh_that_fits": layout_fix} if layout_fix is not None else {}),
      "chips": len(devices), "device_kind": chip.device_kind, "hbm_bytes_per_chip": chip.hbm_bytes,
      "peak_flops_per_chip": chip.peak_flops, "hbm_bandwidth_per_chip": chip.hbm_bandwidth,
      "mesh": dict(runtime.mesh.shape), "model": {"params": model_config.num_params(), "dtype": model_config.dtype,
                                                  "param_dtype": model_config.param_dtype,
                                                  "remat": model_config.remat, "scan_layers": model_config.scan_layers,
                                                  "attention": model_config.attention},
      "grad_accum_steps": config.train.grad_accum_steps,
      "programs": [dataclasses.asdict(p) for p in plans],
      "ici_bandwidth_per_chip": chip.ici_bandwidth,
      **({"members": members} if members else {}), **({"members_fit": fit} if fit is not None else {}),
      "fits": all(p.fits for p in plans),
      "estimate_s": sum(p.estimate_s for p in plans) if all(p.estimate_s for p in plans) else None,
  }


def largest_members(config, target: Target, known: dict[int, ProgramPlan], *, limit: int = 4096) -> dict[str, Any]:
  """The largest member count whose step fits ({"largest", "per_member_bytes", "tried": {count: total bytes}}).

  Counts are multiples of the member axis's mesh size (then each data-parallel group holds its share of the
  members); per-chip memory grows by about the same bytes per member, read from two compiles; the predicted
  largest count is compiled, and stepped down until it fits, and the next one up compiled to show it does not."""
  mesh, rules = target.runtime.mesh, target.runtime.rules
  target_axes = dict(rules).get("members")
  axes = () if target_axes is None else (target_axes,) if isinstance(target_axes, str) else tuple(target_axes)
  unit = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1

  def total(n: int) -> ProgramPlan:
    if n not in known:
      known[n] = target.plan(programs.members(config, target.model_config, target.runtime, n)[0])
    return known[n]

  def size(n: int) -> float:
    return total(n).bytes_per_chip.get("total", float("inf"))

  if not total(unit).fits:
    return {"largest": 0, "unit": unit, "tried": {n: size(n) for n in sorted(known)}}
  per = (size(2 * unit) - size(unit)) / unit
  n = limit if per <= 0 else min(limit, unit * max(1, int((target.chip.hbm_bytes - size(unit)) / per // unit)))
  while n > unit and not total(n).fits:
    n -= unit
  if n + unit <= limit:
    total(n + unit)
  largest = max((k for k, p in known.items() if p.fits and k % unit == 0), default=0)
  return {"largest": largest, "unit": unit, "per_member_bytes": per,
          "tried": {k: size(k) for k in sorted(known)}}


def _sampling_layout_that_fits(config, target: Target, plans) -> dict | None:
  """When the rollout does not fit in its sampling layout: the first larger tensor degree whose rollout does
  ({"rollout.mesh", "bytes_per_chip"}; {} when none does); None when nothing needs it."""
  rollout = next((p for p in plans if p.name == "rollout"), None)
  if rollout is None or rollout.fits or config.rollout.mesh == "training":
    return None

  mesh, model_config = target.runtime.mesh, target.model_config
  k = sampling_layout.tensor_size(config.rollout.mesh, mesh, model_config.num_kv_heads,
                                  sampling_layout.weight_bytes(Transformer(model_config)))
  for larger in (t for t in range(k + 1, mesh.size + 1) if mesh.size % t == 0 and model_config.num_kv_heads % t == 0):
    planned = target.plan_rollout(config, f"tensor={larger}")
    if planned.fits:
      return {"rollout.mesh": f"tensor={larger}", "bytes_per_chip": planned.bytes_per_chip["total"]}
  return {}


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def candidates(chips: int, model_config) -> list[dict[str, Any]]:
  """Overrides the search tries: mesh shapes (data x fsdp x tensor), remat policies, accumulation steps."""
  tensors = [t for t in (1, 2, 4, 8) if chips % t == 0 and model_config.num_kv_heads % t == 0]
  meshes = [{"data": d, "fsdp": chips // (d * t), "tensor": t} for t in tensors for d in _divisors(chips // t)
            if d in (1, 2, 4) or d == chips // t]
  remats = sorted({model_config.remat, "full", "dots"}, key=("none", "dots_no_batch", "dots", "full").index)
  out = []
  for mesh in meshes:
    for remat in remats:
      out.append({"mesh": mesh, "remat": remat})
  return out


def search(config, topology_name: str, *, max_accum: int = 16, limit: int = 0, log=print) -> list[dict[str, Any]]:
  """Try mesh shapes x remat policies (the first `limit` of them; 0: all), each with the fewest accumulation steps
  that fit; fastest estimate first."""
  chip, devices = topology.devices(topology_name)
  validation.check(config)
  model_config, _ = load.model_config(config, load_params=False, platform="tpu")
  found = []
  rows = config.train.global_batch_size
  settings = candidates(len(devices), model_config)
  tried = settings[:limit] if limit else settings
  log(f"search: {len(tried)} of {len(settings)} mesh x remat settings (--search_limit), each compiled with 1, 2, "
      f"4, ... accumulation steps until one fits")
  for i, c in enumerate(tried, 1):
    log(f"[{i}/{len(tried)}] mesh {c['mesh']}, remat {c['remat']}")
    dp = c["mesh"]["data"] * c["mesh"]["fsdp"]
    for accum in [k for k in _divisors(rows) if k <= max_accum and (rows // k) % dp == 0]:
      trial = copy.deepcopy(config)
      trial.mesh.shape.data, trial.mesh.shape.fsdp, trial.mesh.shape.tensor = (
          c["mesh"]["data"], c["mesh"]["fsdp"], c["mesh"]["tensor"])
      trial.model.remat = c["remat"]
      trial.train.grad_accum_steps = accum
      setting = {**c, "grad_accum_steps": accum}
      try:
        report = plan(trial, topology_name)
      except ConfigError as e:
        log(f"  skip {setting}: {e}")
        break
      totals = [p["bytes_per_chip"].get("total", 0) for p in report["programs"]]
      log(f"  {json.dumps(setting)}: " + ("fits" if report["fits"] else "does not fit")
          + (f", {max(totals) / GiB:.2f} GiB per chip" if all(totals) else ""))
      if report["fits"]:
        found.append({**setting, "estimate_s": report["estimate_s"], "bytes_per_chip": max(totals),
                      "headroom": 1 - max(totals) / chip.hbm_bytes})
        break  # more accumulation steps only slow the same work down
  return sorted(found, key=lambda f: (f["estimate_s"], f["grad_accum_steps"], f["bytes_per_chip"]))


def search_rollout(config, topology_name: str, *, log=print) -> list[dict[str, Any]]:
  """PPO/GRPO: the rollout planned in each sampling layout (the training layout and every tensor degree that
  divides the chips and key/value heads); fitting ones first, fastest first."""
  if config.algorithm not in ("ppo", "grpo"):
    raise ConfigError(f"--search_rollout plans PPO and GRPO rollouts; config.algorithm is {config.algorithm!r}")
  target = Target.of(config, topology_name)
  chips, kv_heads = target.runtime.mesh.size, target.model_config.num_kv_heads
  layouts = ["training"] + [f"tensor={k}" for k in _divisors(chips) if kv_heads % k == 0]
  found = []
  for layout in layouts:
    planned = target.plan_rollout(config, layout)
    row = {"rollout.mesh": layout, "fits": planned.fits, "bytes_per_chip": planned.bytes_per_chip.get("total"),
           "estimate_s": planned.estimate_s, "per_token_s": planned.per_token_s,
           "decode_collective_bytes_per_token": planned.decode_collective_bytes_per_token, "error": planned.error}
    log(f"  {layout}: " + (f"{row['bytes_per_chip'] / GiB:.2f} GiB per chip, " if row["bytes_per_chip"] else "")
        + ("fits" if row["fits"] else f"does not fit{': ' + planned.error if planned.error else ''}")
        + (f", {row['per_token_s'] * 1e3:.3f} ms per token" if row["per_token_s"] else ""))
    found.append(row)
  return sorted(found, key=lambda r: (not r["fits"], r["estimate_s"] or float("inf")))


def main(argv):
  from absl import flags

  FLAGS = flags.FLAGS
  if len(argv) > 1:
    raise SystemExit(f"rlhfx-plan: unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  try:
    searches = {"search_rollout": (search_rollout, "rollout_layouts", render_rollout_search),
                "search": (search, "fitting", render_search)}
    for flag, (find, key, show) in searches.items():
      if FLAGS[flag].value:
        limit = {"limit": FLAGS.search_limit} if flag == "search" else {}
        found = find(config, FLAGS.topology, log=(lambda s: None) if FLAGS.json else print, **limit)
        print(json.dumps({"topology": FLAGS.topology, key: found}, indent=2) if FLAGS.json
              else show(found, FLAGS.topology))
        return
    if FLAGS.members < 0 or (FLAGS.members_fit and config.algorithm not in members_lib.ALGORITHMS):
      raise ConfigError(f"--members={FLAGS.members}: expected a count >= 1 of members of an "
                        f"{'/'.join(members_lib.ALGORITHMS)} config" if FLAGS.members < 0 else
                        f"--members_fit: config.algorithm={config.algorithm!r} has no members")
    report = plan(config, FLAGS.topology, FLAGS.members or (1 if FLAGS.members_fit else 0), FLAGS.members_fit)
  except (*USER_ERRORS, topology.TopologyError) as e:  # bad config, topology or model files: one line
    sys.exit(f"rlhfx-plan: {e}")
  print(json.dumps(report, indent=2) if FLAGS.json else render(report))
  if not report["fits"]:
    sys.exit(1)


def run():
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py[:variant])",
                                  lock_config=True)
  flags.DEFINE_string("topology", None, "TPU slice: v5e-16, v5p-128, v6e-64, v4-32 or a compiler name (v5e:4x4)")
  flags.DEFINE_bool("json", False, "print one JSON object instead of tables")
  flags.DEFINE_bool("search", False, "try mesh shapes, remat policies and accumulation steps; print those that fit")
  flags.DEFINE_integer("search_limit", 0, "--search: try at most this many mesh x remat settings (0: all)")
  flags.DEFINE_bool("search_rollout", False, "PPO/GRPO: plan the rollout in every sampling layout "
                    "(config.rollout.mesh); fitting and fastest first")
  flags.DEFINE_integer("members", 0, "plan the step of N members of a sweep trained together (rlhfx.members)")
  flags.DEFINE_bool("members_fit", False, "with --members: also find the largest member count that fits")
  flags.mark_flags_as_required(["config", "topology"])
  run_cli(main, "rlhfx-plan", usage("rlhfx-plan", __doc__, ("config", "topology", "json", "search", "search_limit",
                                                             "search_rollout", "members", "members_fit")))


if __name__ == "__main__":
  run()
