"""The planner's rows for BENCHMARKS.md: each big config on its slice, before and after the state-sharding fixes.

  python benchmarks/plan_rows.py [--rows dpo_llama3_8b,ppo_llama3_8b,...] [--before]  > plan_rows.jsonl
  python benchmarks/plan_rows.py --rows dpo_llama3_8b --topology v5p-128 --set mesh.shape.fsdp=-1 \
      --set mesh.shape.tensor=1 --set train.grad_accum_steps=1 --set dpo.reference=frozen --before

"after" is `rlhfx.plan` as it is. "--before" also plans each row with the two defects the
planner found put back, to show what they cost: "before", the optimizer state created without
out_shardings (Adam's moments replicated on every chip) and the programs traced under the
legacy `with mesh:` (activation constraints dropped); "legacy mesh only", the second alone. Nothing runs on a TPU: these are the TPU
compiler's per-chip figures for programs built from ShapeDtypeStructs (see rlhfx/plan.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import time

import jax
import flax.linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhfx import plan, sharding, train_state
from rlhfx.config import load as load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROWS = {"dpo_llama3_8b": "v5e-16", "ppo_llama3_8b": "v5p-64", "grpo_llama3_8b": "v5p-64",
        "dpo_llama3_70b": "v5p-128"}


def load(name: str):
  return load_config(ROOT / "configs" / f"{name}.py")


@contextlib.contextmanager
def defects_put_back(replicated_moments: bool = True):
  """The code before the fix: replicated optimizer state (unless not `replicated_moments`), `with mesh:` tracing."""
  state_shardings, active = train_state.state_shardings, sharding.active

  def replicated_opt_state(abstract_state, param_shardings, mesh):
    out = state_shardings(abstract_state, param_shardings, mesh)
    return out.replace(opt_state=jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract_state.opt_state))

  @contextlib.contextmanager
  def legacy(mesh, rules):
    with mesh, nn.logical_axis_rules(rules):
      yield

  train_state.state_shardings = replicated_opt_state if replicated_moments else state_shardings
  sharding.active = legacy
  try:
    yield
  finally:
    train_state.state_shardings, sharding.active = state_shardings, active


def summary(report: dict) -> dict:
  return {"fits": report["fits"], "estimate_s": report["estimate_s"], "programs": [
      {"name": p["name"], "fits": p["fits"], "error": p["error"],
       "gib_per_chip": {k: round(v / 2**30, 3) for k, v in {**p["parts_per_chip"], **p["bytes_per_chip"]}.items()},
       "flops_per_chip": p["flops"], "collectives": p["collectives"], "estimate_s": p["estimate_s"], "collective_bytes": p["collective_bytes"],
       "compile_s": round(p["compile_s"], 1)} for p in report["programs"]]}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--rows", default=",".join(ROWS))
  parser.add_argument("--before", action="store_true", help="also plan with the defects put back")
  parser.add_argument("--topology", default="", help="instead of each row's own slice")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a config field (e.g. mesh.shape.fsdp=-1); repeatable")
  args = parser.parse_args()
  for name in args.rows.split(","):
    config, topology = load(name), args.topology or ROWS[name]
    for item in args.set:
      field, _, value = item.partition("=")
      *parents, leaf = field.split(".")
      node = config
      for key in parents:
        node = node[key]
      node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], str) else value
    variants = [("after", contextlib.nullcontext())]
    if args.before:
      variants += [("before", defects_put_back()), ("legacy mesh only", defects_put_back(replicated_moments=False))]
    for label, context in variants:
      t0 = time.perf_counter()
      with context:
        report = plan.plan(config, topology)
      print(json.dumps({"config": name, "topology": topology, "code": label, "set": args.set, "mesh": report["mesh"],
                        "grad_accum_steps": report["grad_accum_steps"], "hbm_gib": report["hbm_bytes_per_chip"] / 2**30,
                        "seconds": round(time.perf_counter() - t0, 1), **summary(report)}), flush=True)


if __name__ == "__main__":
  main()
