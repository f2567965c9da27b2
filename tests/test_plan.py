"""The planner: real TPU compiles (libtpu) of a config's programs on this CPU, per-chip memory and FLOPs.

Values on CPU prove numerics; only the TPU compiler proves placement and memory at scale. These
compile the tiny DPO config for v5e slices (a few seconds each) and check what FSDP must do: the
state per chip shrinks with the chip count, the FLOPs too, and a model too large for a slice is
reported as not fitting with the compiler's figures, not as a traceback.
"""

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from rlhfx import plan, topology
from rlhfx.config import load
from rlhfx.models.load import model_config

pytest.importorskip("libtpu", reason="the planner needs libtpu: pip install -e '.[test,tpu]'")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(path="configs/dpo_hh.py:tiny", **overrides):
  config = load(ROOT / path)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


FSDP = {"mesh.shape.data": 1, "mesh.shape.fsdp": -1, "mesh.shape.tensor": 1}


def test_topology_names_as_users_write_them():
  assert topology.compiler_name("v5e-64")[1] == "v5e:8x8"
  assert topology.compiler_name("v5e-16")[1] == "v5e:4x4"
  assert topology.compiler_name("v5p-128")[1] == "v5p:4x4x4"  # v5p counts TensorCores: 64 chips
  assert topology.compiler_name("v6e-256")[1] == "v6e:16x16"
  assert topology.compiler_name("v4-32")[1] == "v4:2x2x4"
  assert topology.compiler_name("v5e:2x4")[1] == "v5e:2x4"
  chip, devices = topology.devices("v5p-64")
  assert len(devices) == 32 and devices[0].device_kind == chip.device_kind == "TPU v5"
  for bad in ("v5e", "v7-8", "v5p-3", "v5e-12"):
    with pytest.raises(topology.TopologyError, match="topology"):
      topology.compiler_name(bad)


@pytest.fixture(scope="module")
def v5e_4():
  return plan.plan(_config(**FSDP), "v5e-4")


def test_cli_json_report(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "rlhfx.plan", "--config=configs/dpo_hh.py:tiny", "--topology=v5e-4",
                         "--config.mesh.shape.data=1", "--config.mesh.shape.fsdp=-1", "--json"],
                        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout)
  assert report["topology"] == "v5e-4" and report["chips"] == 4 and report["fits"] is True
  assert report["hbm_bytes_per_chip"] == topology.CHIPS["v5e"].hbm_bytes
  (step,) = report["programs"]
  assert step["name"] == "dpo_step" and step["fits"] is True
  b = step["bytes_per_chip"]
  assert b["total"] == b["arguments"] + b["outputs"] + b["temporaries"] + b["code"] > 0
  assert step["collectives"]["all-gather"]["count"] > 0, "FSDP gathers weights"
  assert step["collective_bytes"] > 0 and step["hbm_bytes"] > 0 and step["estimate_s"] > 0
  assert report["estimate_s"] == step["estimate_s"]
  # stderr: the compile said while it runs, and none of libtpu's start-up errors off a TPU VM
  assert re.fullmatch(r"plan: compiling dpo_step for 4 chips \.\.\. \d+ s", proc.stderr.strip()), proc.stderr


def test_search_limit_tries_that_many_settings():
  proc = subprocess.run([sys.executable, "-m", "rlhfx.plan", "--config=configs/dpo_hh.py:tiny", "--topology=v5e-4",
                         "--search", "--search_limit=1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout.splitlines()
  settings = len(plan.candidates(4, model_config(_config(), load_params=False, platform="tpu")[0]))
  assert out[0] == (f"search: 1 of {settings} mesh x remat settings (--search_limit), each compiled with 1, 2, 4, "
                    "... accumulation steps until one fits")
  assert [line for line in out if line.startswith("[")] == [out[1]] and out[1].startswith("[1/1] mesh ")


def test_fsdp_state_per_chip_shrinks_4x_from_4_to_16_chips(v5e_4):
  v5e_16 = plan.plan(_config(**FSDP), "v5e-16")
  (small,), (large,) = v5e_4["programs"], v5e_16["programs"]
  for part in ("parameters", "optimizer state", "frozen: reference"):
    ratio = small["parts_per_chip"][part] / large["parts_per_chip"][part]
    assert 3.5 < ratio <= 4.0, (part, ratio)  # 4x where every dimension divides (the 50257 rows replicate)
  # the compiler's own argument bytes shrink the same way, and it agrees with the trees within 10%
  assert 3.5 < small["bytes_per_chip"]["arguments"] / large["bytes_per_chip"]["arguments"] <= 4.0
  ours = sum(small["parts_per_chip"].values())
  assert abs(ours - small["bytes_per_chip"]["arguments"]) < 0.1 * small["bytes_per_chip"]["arguments"]
  assert small["flops"] == pytest.approx(4 * large["flops"])
  assert large["compiler_flops"] < small["compiler_flops"], "the compiler sees each chip do less work"
  assert large["fits"] and small["fits"]


def test_flops_follow_the_model_not_the_loop_body(v5e_4):
  """The compiler counts a scan's body once: with 4 accumulated micro-batches it reports about a quarter of the
  work; the planner's FLOPs stay those of the whole batch, 6 N per token plus attention (N: the matmul params)."""
  accumulated = plan.plan(_config(**FSDP, **{"train.grad_accum_steps": 4}), "v5e-4")
  (one,), (four,) = v5e_4["programs"], accumulated["programs"]
  assert four["flops"] == one["flops"]
  assert four["compiler_flops"] < 0.5 * one["compiler_flops"]
  config = _config()
  model = topology_free_model(config)
  rows, length = 2 * config.train.global_batch_size, max(config.data.buckets)
  n_matmul = model.num_params() - model.vocab_size * model.d_model  # the embedding is a lookup, no matmul
  six_n = 6 * n_matmul * rows * length * (1 + 1 / 3)  # policy forward + backward, the reference's forward
  assert one["flops"] * 4 == pytest.approx(six_n, rel=0.1)


def topology_free_model(config):
  from rlhfx.models import load

  return load.model_config(config, load_params=False)[0]


def test_a_model_too_large_is_reported_as_not_fitting():
  """A 16k-wide model, replicated (data parallelism only) over 4 v5e chips: its parameters and Adam moments
  alone are about 20 GiB per chip."""
  report = plan.plan(_config(**{"mesh.shape.data": -1, "model.d_model": 16384}), "v5e-4")
  (step,) = report["programs"]
  assert report["fits"] is False and step["fits"] is False
  if step["bytes_per_chip"]:  # compiled: its own figures exceed HBM
    assert step["bytes_per_chip"]["total"] > report["hbm_bytes_per_chip"]
  else:  # the compiler refused: its reason is kept
    assert "RESOURCE_EXHAUSTED" in step["error"] or "memory" in step["error"].lower()
  assert "DOES NOT FIT" in plan.render(report)


def test_splash_attention_compiles_as_mosaic_kernels_and_shrinks_long_sequence_temporaries():
  """At 4,096 tokens the XLA path holds every head's [T, T] scores; the splash kernel (compiled by Mosaic for the
  TPU slice, not interpreted: custom calls in the program text) does not."""
  long = {"model.max_seq_len": 4096, "data.max_length": 4096, "data.buckets": (4096,),
          "data.max_prompt_length": 2048, "train.global_batch_size": 4}
  reports = {kind: plan.plan(_config(**long, **{"model.attention": kind}), "v5e-4") for kind in ("xla", "auto")}
  assert reports["auto"]["model"]["attention"] == "splash"  # auto on a TPU slice
  (xla,), (splash,) = reports["xla"]["programs"], reports["auto"]["programs"]
  assert xla["kernel_calls"] == 0 and splash["kernel_calls"] > 0
  assert splash["bytes_per_chip"]["temporaries"] < 0.25 * xla["bytes_per_chip"]["temporaries"]


@pytest.mark.slow  # four compiles: about a minute
def test_members_are_planned_with_the_frozen_trees_once_and_the_largest_count_that_fits():
  """Members of the tiny DPO config on v5e-4 (data=4: members in steps of 4, each data-parallel group its share):
  the reference is counted once whatever the member count, every member's parameters and moments once each, and
  the search stops at the largest count that fits (here its limit, 16: the tiny model's members are small)."""
  config = _config(**{"mesh.shape.data": 4, "mesh.shape.fsdp": 1, "mesh.shape.tensor": 1})
  target = plan.Target.of(config, "v5e-4")
  known = {}
  fit = plan.largest_members(config, target, known, limit=16)
  assert fit["unit"] == 4 and fit["largest"] == 16 and sorted(fit["tried"]) == [4, 8, 16]
  p4, p8 = (dataclasses.asdict(known[n]) for n in (4, 8))
  assert p8["name"] == "members_step (8 members)" and known[16].fits
  assert p8["parts_per_chip"]["frozen: reference (once)"] == p4["parts_per_chip"]["frozen: reference (once)"]
  assert p8["parts_per_chip"]["parameters: every member"] == 2 * p4["parts_per_chip"]["parameters: every member"]
  single = plan.plan(config, "v5e-4")["programs"][0]
  # a data-parallel group of one chip holds its members whole: 2 of the 8
  assert p8["parts_per_chip"]["parameters: every member"] == 2 * single["parts_per_chip"]["parameters"]
  # each member's policy pass, the reference's forward (a quarter of a member's step) once
  assert p8["flops"] == pytest.approx(single["flops"] * (8 * 0.75 + 0.25))
  assert fit["tried"][16] < fit["tried"][8] + 2.5 * (fit["tried"][8] - fit["tried"][4])
