"""Where the state lives, through the real CLI: every leaf of every tree has the spec its logical axes and the
rules give, optimizer-state leaves are sharded like their parameters, per-device bytes are total / shards, and
a checkpoint restored on another mesh keeps all of it.

Losses cannot show any of this (a replicated tree computes the same numbers): these tests read the
run's <workdir>/placement.json, which lists every array's PartitionSpec and its bytes on one device as
the run placed it (after a restore, as restored).
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from rlhfx.models import Transformer, get_preset
from rlhfx.sharding import DEFAULT_RULES

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 600
TINY_GPT2_VOCAB = 50257


def _run(workdir, config, *overrides):
  proc = subprocess.run([sys.executable, "-m", "rlhfx.main", f"--config={config}", f"--workdir={workdir}",
                         "--config.data.eval_fraction=0", "--config.train.export_hf=False",
                         "--config.train.log_every=1", *overrides],
                        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=TIMEOUT)
  assert proc.returncode == 0, f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  return json.loads((pathlib.Path(workdir) / "placement.json").read_text())


def _logical_names(model_config) -> dict[str, tuple]:
  """Parameter path -> logical axis names, as the model declares them."""
  boxed = jax.eval_shape(lambda: Transformer(model_config).init(jax.random.key(0), np.zeros((1, 4), np.int32)))
  names = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(boxed["params"], is_leaf=lambda x: hasattr(x, "names")):
    names[jax.tree_util.keystr(path, simple=True, separator="/")] = tuple(leaf.names)
  return names


def _expected_spec(names, shape, mesh: dict[str, int]) -> list:
  """The rule, written out independently of rlhfx.sharding: each logical name's mesh axes from the rules, in order,
  keeping an axis only if it is unused so far in this array and the dimension stays divisible."""
  table = dict(DEFAULT_RULES)
  used, spec = set(), []
  for name, dim in zip(names, shape):
    target = table.get(name)
    axes = [target] if isinstance(target, str) else list(target or [])
    kept, size = [], 1
    for axis in axes:
      if axis not in used and dim % (size * mesh[axis]) == 0:
        kept.append(axis)
        size *= mesh[axis]
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else kept)
  return spec


def _shards(spec, mesh) -> int:
  axes = [a for entry in spec if entry is not None for a in ([entry] if isinstance(entry, str) else entry)]
  return math.prod(mesh[a] for a in axes)


def _check(placement, model_config, *, lora: bool = False):
  mesh = placement["mesh"]
  names = _logical_names(model_config)
  state = placement["state"]
  prefix = "params/base/" if lora else "params/"
  params = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
  assert set(params) == set(names), "the state's parameters are the model's"
  for path, leaf in params.items():
    assert leaf["spec"] == _expected_spec(names[path], leaf["shape"], mesh), path
  # every optimizer-state leaf that mirrors a parameter has that parameter's spec and shape
  mirrored = 0
  for path, leaf in state.items():
    if not path.startswith("opt_state/"):
      continue
    owner = next((p for p in params if path.endswith("/" + p)), None)
    if owner is not None and leaf["shape"] == params[owner]["shape"] and not lora:
      assert leaf["spec"] == params[owner]["spec"], path
      mirrored += 1
    elif leaf["shape"] == [] or lora:
      pass
    else:
      raise AssertionError(f"{path}: an optimizer-state leaf that mirrors no parameter")
  if not lora:
    assert mirrored == 2 * len(params), "Adam's mu and nu for every parameter"
  for name in ("reference",):
    if name in placement:
      for path, leaf in placement[name].items():
        assert leaf["spec"] == params[path]["spec"], f"{name}/{path}"
  # bytes on one device: the tree's bytes over its shard count (uneven splits would differ; none here)
  for tree in [state] + [placement[k] for k in ("reference",) if k in placement]:
    per_device = sum(leaf["device_bytes"] for leaf in tree.values())
    expected = sum(leaf["bytes"] / _shards(leaf["spec"] or [], mesh) for leaf in tree.values())
    assert abs(per_device - expected) <= 0.1 * expected, (per_device, expected)
  return params


@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory):
  """2 DPO steps on 8 fake devices as fsdp=8, then resumed to step 4 on a 2x2x2 mesh (a longer run: the new
  num_steps accepted with train.resume=new_config; the mesh may differ freely)."""
  workdir = tmp_path_factory.mktemp("dpo_placement")
  common = ["--config.mesh.num_cpu_devices=8", "--config.train.checkpoint_every=2"]
  first = _run(workdir, "configs/dpo_hh.py:tiny", *common, "--config.train.num_steps=2",
               "--config.mesh.shape.data=1", "--config.mesh.shape.fsdp=8", "--config.mesh.shape.tensor=1")
  second = _run(workdir, "configs/dpo_hh.py:tiny", *common, "--config.train.num_steps=4",
                "--config.train.resume=new_config", "--config.mesh.shape.data=2", "--config.mesh.shape.fsdp=2",
                "--config.mesh.shape.tensor=2")
  return first, second


def test_fsdp_shards_parameters_adam_moments_and_the_reference(dpo_runs):
  first, _ = dpo_runs
  assert first["step"] == 0 and first["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  params = _check(first, get_preset("tiny", vocab_size=TINY_GPT2_VOCAB))
  # anchors, by hand: the width (64) is split 8 ways, the vocabulary over tensor (size 1 here)
  assert params["layer_0/attn/q_proj/kernel"]["spec"] == ["fsdp", "tensor", None]
  assert params["embed/embedding"]["spec"] == ["tensor", "fsdp"]
  mu = first["state"]["opt_state/1/0/mu/layer_0/mlp/up_proj/kernel"]
  assert mu["spec"] == ["fsdp", "tensor"] and mu["device_bytes"] * 8 == mu["bytes"]
  total = sum(leaf["bytes"] for leaf in first["state"].values())
  on_one = sum(leaf["device_bytes"] for leaf in first["state"].values())
  assert on_one < 0.13 * total, "an eighth of the state per device, not all of it"


def test_a_checkpoint_restored_on_a_2x2x2_mesh_keeps_the_placement(dpo_runs):
  _, second = dpo_runs
  assert second["step"] == 2 and second["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  params = _check(second, get_preset("tiny", vocab_size=TINY_GPT2_VOCAB))
  assert params["layer_0/attn/q_proj/kernel"]["spec"] == ["fsdp", "tensor", None]
  assert params["embed/embedding"]["spec"] == [None, "fsdp"], "50257 rows do not split in two: replicated"
  assert second["state"]["opt_state/1/0/nu/layer_0/attn/o_proj/kernel"]["spec"] == ["tensor", None, "fsdp"]


def test_lora_adapters_and_frozen_base_are_sharded(tmp_path):
  placement = _run(tmp_path, "configs/dpo_lora.py:tiny", "--config.mesh.num_cpu_devices=8",
                   "--config.train.num_steps=1", "--config.mesh.shape.data=1", "--config.mesh.shape.fsdp=8",
                   "--config.mesh.shape.tensor=1")
  _check(placement, get_preset("tiny", vocab_size=TINY_GPT2_VOCAB), lora=True)
  state = placement["state"]
  a = state["params/lora/layer_0/attn/q_proj/kernel/a"]
  b = state["params/lora/layer_0/attn/q_proj/kernel/b"]
  assert a["spec"] == ["fsdp", None] and b["spec"] == [None, "tensor"]
  # the adapters' Adam moments follow the adapters; the frozen base has none
  assert state["opt_state/inner_states/trainable/inner_state/1/0/mu/lora/layer_0/attn/q_proj/kernel/a"]["spec"] == [
      "fsdp", None]
  assert not any("mu/base/" in k for k in state)


def _assert_optimizer_state_like_parameters(state: dict) -> int:
  """Every optimizer-state leaf whose path ends with a parameter's path has that parameter's shape and spec."""
  params = {k.removeprefix("params/"): v for k, v in state.items() if k.startswith("params/")}
  checked = 0
  for path, leaf in state.items():
    if not path.startswith("opt_state/") or leaf["shape"] == []:
      continue
    owner = max((p for p in params if path.endswith("/" + p)), key=len, default=None)
    assert owner is not None, f"{path}: an optimizer-state leaf that mirrors no parameter"
    assert leaf["shape"] == params[owner]["shape"] and leaf["spec"] == params[owner]["spec"], path
    checked += 1
  return checked


def test_ppo_policy_critic_and_reference_are_sharded(tmp_path):
  """PPO on the letters task: the policy and its critic (a copy of the policy's backbone with a value head) are
  trained, the reference is frozen; on fsdp=8 every tree is split like the policy."""
  placement = _run(tmp_path, "configs/ppo_letters.py:tiny", "--config.mesh.num_cpu_devices=8",
                   "--config.train.num_steps=1", "--config.mesh.shape.data=1", "--config.mesh.shape.fsdp=8",
                   "--config.mesh.shape.tensor=1", "--config.train.log_samples_every=0")
  state, mesh = placement["state"], placement["mesh"]
  names = _logical_names(get_preset("tiny", vocab_size=259))
  for path, axes in names.items():
    policy = state[f"params/policy/{path}"]
    assert policy["spec"] == _expected_spec(axes, policy["shape"], mesh), path
    assert placement["reference"][path]["spec"] == policy["spec"], path
    if path != "lm_head/kernel":  # the critic is the backbone without the LM head
      assert state[f"params/value/backbone/{path}"]["spec"] == policy["spec"], path
  assert _assert_optimizer_state_like_parameters(state) == 2 * sum(1 for k in state if k.startswith("params/"))
  assert placement["reference"]["layer_0/mlp/up_proj/kernel"]["spec"] == ["fsdp", "tensor"]


def test_reward_model_backbone_head_and_adam_moments_are_sharded(tmp_path, shared_data):
  """The reward model's tree (a backbone without the LM head, and the score head): every backbone leaf has its
  logical axes' spec on fsdp=8, the head's kernel [d_model, 1] is split over fsdp by its "embed" axis, and Adam's
  moments follow; per-device bytes are an eighth of the state's."""
  shared_data("hh_rlhf/harmless-base-test.jsonl.gz")
  placement = _run(tmp_path, "configs/reward_hh.py:tiny", "--config.mesh.num_cpu_devices=8",
                   "--config.train.num_steps=1", "--config.mesh.shape.data=1", "--config.mesh.shape.fsdp=8",
                   "--config.mesh.shape.tensor=1", "--config.data.max_length=128", "--config.data.max_prompt_length=96",
                   "--config.data.buckets=128,", "--config.train.global_batch_size=8",
                   "--config.reward.stats_batches=1")
  state, mesh = placement["state"], placement["mesh"]
  names = _logical_names(get_preset("tiny", vocab_size=TINY_GPT2_VOCAB))
  backbone = {k.removeprefix("params/backbone/"): v for k, v in state.items() if k.startswith("params/backbone/")}
  assert set(backbone) == set(names) - {"lm_head/kernel"}
  for path, leaf in backbone.items():
    assert leaf["spec"] == _expected_spec(names[path], leaf["shape"], mesh), path
  assert state["params/score/kernel"]["spec"] == ["fsdp", None] and state["params/score/kernel"]["shape"] == [64, 1]
  assert _assert_optimizer_state_like_parameters(state) == 2 * sum(1 for k in state if k.startswith("params/"))
  total = sum(leaf["bytes"] for leaf in state.values())
  assert sum(leaf["device_bytes"] for leaf in state.values()) < 0.13 * total


@pytest.mark.slow  # about a minute: a reward run, then PPO scoring with its export, both on 8 fake devices
def test_ppo_frozen_reward_model_and_its_critic_copy_are_sharded(tmp_path, shared_data):
  """PPO scored by a trained reward model on a 2x2x2 mesh: the frozen reward tree and the critic (a copy of it)
  have every leaf's spec from its logical axes, Adam follows the critic, and each holds 1/shards of its bytes."""
  shared_data("hh_rlhf/harmless-base-test.jsonl.gz")
  small = ["--config.mesh.num_cpu_devices=8", "--config.data.max_length=128", "--config.data.max_prompt_length=96",
           "--config.data.buckets=128,", "--config.train.global_batch_size=8", "--config.train.num_steps=1"]
  _run(tmp_path / "rm", "configs/reward_hh.py:tiny", *small, "--config.reward.stats_batches=1",
       "--config.mesh.shape.data=1", "--config.mesh.shape.fsdp=8", "--config.mesh.shape.tensor=1")
  placement = _run(tmp_path / "ppo", "configs/ppo_hh.py:tiny", *small, f"--config.scoring.model={tmp_path / 'rm'}",
                   "--config.mesh.shape.data=2", "--config.mesh.shape.fsdp=2", "--config.mesh.shape.tensor=2",
                   "--config.rollout.max_new_tokens=8", "--config.train.log_samples_every=0")
  mesh, state, reward = placement["mesh"], placement["state"], placement["reward"]
  names = _logical_names(get_preset("tiny", vocab_size=TINY_GPT2_VOCAB))
  for path, axes in names.items():
    if path == "lm_head/kernel":  # a score model has no LM head
      continue
    want = _expected_spec(axes, reward[f"backbone/{path}"]["shape"], mesh)
    assert reward[f"backbone/{path}"]["spec"] == want, path
    assert state[f"params/value/backbone/{path}"]["spec"] == want, path
  assert reward["score/kernel"]["spec"] == state["params/value/score/kernel"]["spec"] == ["fsdp", None]
  assert _assert_optimizer_state_like_parameters(state) == 2 * sum(1 for k in state if k.startswith("params/"))
  for tree in (reward, {k: v for k, v in state.items() if k.startswith("params/value/")}):
    per_device = sum(leaf["device_bytes"] for leaf in tree.values())
    expected = sum(leaf["bytes"] / _shards(leaf["spec"] or [], mesh) for leaf in tree.values())
    assert abs(per_device - expected) <= 0.1 * expected, (per_device, expected)
