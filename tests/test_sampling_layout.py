"""The sampling layout (config.rollout.mesh): tensor-parallel groups that decode without gathering weights.

Through the CLI on 8 fake CPU devices (a 2x2x2 training mesh): sampling in a tensor=2 layout gives the tokens
and the metrics of sampling in the training layout, and the sampled policy sits where the rules put it on
that layout (placement.json). Through the TPU compiler: a tiny config's rollout on v5e-16 moves a small
fraction of the training layout's collective bytes per generated token, and a slice where the layout does not
fit is told which one does.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from rlhfx.models import get_preset
from test_placement import _expected_spec, _logical_names

ROOT = pathlib.Path(__file__).resolve().parents[1]
MESH = ["--config.mesh.num_cpu_devices=8", "--config.mesh.shape.data=2", "--config.mesh.shape.fsdp=2",
        "--config.mesh.shape.tensor=2"]
SHORT = ["--config.train.num_steps=2", "--config.train.log_every=1", "--config.train.eval_every=0",
         "--config.train.log_samples_every=1", "--config.train.export_hf=False", "--config.train.checkpoint_every=100"]


def _cli(workdir, *overrides, config="configs/grpo_letters.py:tiny"):
  return subprocess.run([sys.executable, "-m", "rlhfx.main", f"--config={config}", f"--workdir={workdir}",
                         *overrides], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600)


def _rows(workdir, name):
  return [json.loads(line) for line in (pathlib.Path(workdir) / name).read_text().splitlines()]


def test_tensor_layout_samples_the_training_layouts_tokens(tmp_path):
  runs = {}
  for layout in ("training", "tensor=2"):
    proc = _cli(tmp_path / layout, *MESH, *SHORT, f"--config.rollout.mesh={layout}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    runs[layout] = tmp_path / layout
  samples = {k: _rows(w, "samples.jsonl") for k, w in runs.items()}
  assert samples["training"] and samples["training"] == samples["tensor=2"], "the same completions"
  train = {k: [r for r in _rows(w, "metrics.jsonl") if "train/loss" in r] for k, w in runs.items()}
  assert [r["step"] for r in train["training"]] == [r["step"] for r in train["tensor=2"]] == [1, 2]
  for a, b in zip(train["training"], train["tensor=2"]):
    for key in ("train/loss", "objective/scores", "objective/kl", "val/completion_length"):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-7, err_msg=key)
    # the sampler's log-probs and the trainer's recomputed ones: float32 on one CPU, equal up to round-off
    assert 0.0 <= b["rollout/logprob_diff_mean"] <= b["rollout/logprob_diff_max"] < 1e-4

  placement = json.loads((runs["tensor=2"] / "placement.json").read_text())
  assert "sampling" not in json.loads((runs["training"] / "placement.json").read_text())
  mesh = placement["sampling"]["mesh"]
  assert mesh == {"data": 4, "fsdp": 1, "tensor": 2}
  names = _logical_names(get_preset("tiny", vocab_size=259))
  sampled = placement["sampling"]["params"]
  assert set(sampled) == set(names)
  for path, leaf in sampled.items():
    assert leaf["spec"] == _expected_spec(names[path], leaf["shape"], mesh), path
    shards = math.prod(mesh[a] for a in (leaf["spec"] or []) if a)
    assert leaf["device_bytes"] * shards == leaf["bytes"], path
  # split over heads and MLP width only: nothing of the training layout's fsdp=2 remains
  assert sampled["layer_0/mlp/up_proj/kernel"]["spec"] == ["fsdp", "tensor"]
  assert sampled["layer_0/mlp/up_proj/kernel"]["device_bytes"] * 2 == sampled["layer_0/mlp/up_proj/kernel"]["bytes"]


def test_fewer_prompts_than_sampling_groups_go_to_every_group(tmp_path):
  """4 prompts, 8 groups of one device (tensor=1): the prompts cannot split over the groups and are put on every
  device; the completions are the training layout's."""
  few = [*MESH, *SHORT, "--config.train.global_batch_size=4"]
  for layout in ("training", "tensor=1"):
    proc = _cli(tmp_path / layout, *few, f"--config.rollout.mesh={layout}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert json.loads((tmp_path / "tensor=1" / "placement.json").read_text())["sampling"]["mesh"]["data"] == 8
  assert _rows(tmp_path / "training", "samples.jsonl") == _rows(tmp_path / "tensor=1", "samples.jsonl")


@pytest.mark.parametrize("value, says", [
    ("tensor=3", "tensor=3 does not divide the 8 devices"),
    ("tensor=4", "does not divide the model's 2 key/value heads"),
    ("rows", "config.rollout.mesh='rows': expected auto, training or tensor=<k>"),
])
def test_a_layout_that_cannot_be_made_is_one_line(tmp_path, value, says):
  proc = _cli(tmp_path, *MESH, *SHORT, f"--config.rollout.mesh={value}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  error = [line for line in proc.stderr.splitlines() if line.startswith("rlhfx:")]
  assert len(error) == 1 and says in error[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def _plan(*overrides, config="configs/grpo_letters.py:tiny", topology="v5e-16"):
  from test_plan import _config

  from rlhfx import plan

  return plan.plan(_config(config, **dict(overrides)), topology)


def test_tiny_rollout_on_v5e_16_moves_a_tenth_of_the_training_layouts_bytes_per_token():
  pytest.importorskip("libtpu", reason="the planner needs libtpu: pip install -e '.[test,tpu]'")
  fsdp = {"mesh.shape.data": 1, "mesh.shape.fsdp": -1, "mesh.shape.tensor": 1, "train.global_batch_size": 16}
  before = _plan(*fsdp.items(), ("rollout.mesh", "training"))
  after = _plan(*fsdp.items())
  (fused,) = before["programs"]
  assert fused["name"] == "grpo_iteration"
  names = [p["name"] for p in after["programs"]]
  assert names == ["reshard", "rollout", "grpo_update"]
  rollout = after["programs"][1]
  assert fused["decode_collective_bytes_per_token"] > 0, "FSDP: every token gathers the weights again"
  assert rollout["decode_collective_bytes_per_token"] <= 0.1 * fused["decode_collective_bytes_per_token"]
  assert rollout["per_token_s"] < fused["per_token_s"]
  # the reshard moves the policy once per iteration: its gathered bytes are the sampled weights
  reshard = after["programs"][0]
  assert reshard["collective_bytes"] >= 0.9 * reshard["parts_per_chip"]["sampled policy"] * 15 / 16


def test_search_rollout_plans_every_layout_fastest_first():
  pytest.importorskip("libtpu", reason="the planner needs libtpu: pip install -e '.[test,tpu]'")
  from test_plan import _config

  from rlhfx import plan

  config = _config("configs/grpo_letters.py:tiny", **{"mesh.shape.data": 1, "mesh.shape.fsdp": -1})
  found = plan.search_rollout(config, "v5e-4", log=lambda s: None)
  assert sorted(r["rollout.mesh"] for r in found) == ["tensor=1", "tensor=2", "training"]  # 2 key/value heads
  assert all(r["fits"] for r in found)
  assert [r["estimate_s"] for r in found] == sorted(r["estimate_s"] for r in found)
  by = {r["rollout.mesh"]: r for r in found}
  assert by["tensor=1"]["decode_collective_bytes_per_token"] < by["training"]["decode_collective_bytes_per_token"]


@pytest.mark.slow
def test_a_layout_that_does_not_fit_names_one_that_does():
  """Llama-3.2-3B GRPO on v5e-4 as fsdp=4: the rollout replicated per chip (tensor=1) beside the training state
  exceeds 15.75 GiB; a larger tensor degree (the first that fits: 2 or 4) is named."""
  pytest.importorskip("libtpu", reason="the planner needs libtpu: pip install -e '.[test,tpu]'")
  report = _plan(("model.preset", "llama3.2-3b"), ("train.global_batch_size", 4), ("rollout.group_size", 2),
                 ("grpo.minibatches", 1), ("mesh.shape.fsdp", 4), ("mesh.shape.tensor", 1),
                 ("rollout.mesh", "tensor=1"),
                 config="configs/grpo_llama3_8b.py", topology="v5e-4")
  rollout = next(p for p in report["programs"] if p["name"] == "rollout")
  assert not rollout["fits"] and not report["fits"]
  fix = report["rollout_mesh_that_fits"]
  assert fix["rollout.mesh"] in ("tensor=2", "tensor=4") and fix["bytes_per_chip"] <= report["hbm_bytes_per_chip"]
  from rlhfx import plan

  assert f"--config.rollout.mesh={fix['rollout.mesh']} does" in plan.render(report)
