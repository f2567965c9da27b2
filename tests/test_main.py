"""The training spine end to end through `python -m rlhfx.main`: invariances, resume, reshard, export, errors.

Each run is a subprocess (fake CPU devices must be set before JAX starts). The
baseline is 20 SFT steps of the quickstart model on one device.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from rlhfx.checkpoint import Checkpointer, abstract
from rlhfx.config import base_config
from rlhfx.metrics import first_evaluation
from rlhfx.models import get_preset, init_params
from rlhfx.models.convert import from_hf
from rlhfx.optim import make_optimizer
from rlhfx.train_state import init_state

from conftest import forward, run_processes

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK = ["--config=configs/quickstart.py", "--config.train.num_steps=20", "--config.train.log_every=1",
         "--config.data.eval_fraction=0", "--config.train.checkpoint_every=10", "--config.train.export_hf=False"]
TIMEOUT = 300


def _run(workdir, *overrides, check=True, extra_env=None, timeout=TIMEOUT, sigterm_at=None):
  env = {**os.environ, **(extra_env or {})}
  program = ["-m", "rlhfx.main"] if sigterm_at is None else [str(ROOT / "tests" / "preempted_run.py"), str(sigterm_at)]
  proc = subprocess.run([sys.executable, *program, *QUICK, f"--workdir={workdir}", *overrides],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != (0 if sigterm_at is None else 75):  # 75: stopped by SIGTERM, resume me
    raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc


def _losses(workdir) -> dict[int, float]:
  out = {}
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "train/loss" in record:
      out[record["step"]] = record["train/loss"]
  return out


def _assert_same_losses(got: dict, want: dict, rtol=1e-5):
  assert sorted(got) == sorted(want) == list(range(1, 21))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=rtol)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("baseline")
  _run(workdir, "--config.train.export_hf=True")
  return workdir


def test_baseline_learns_and_checkpoints(baseline):
  losses = _losses(baseline)
  assert losses[20] < losses[1] - 1.0
  assert sorted(int(p.name) for p in (baseline / "checkpoints").iterdir() if p.name.isdigit()) == [10, 20]
  assert (baseline / "config.json").exists() and any((baseline / "tensorboard").iterdir())


def test_eight_fake_devices_as_2x2x2_give_the_same_losses(baseline, tmp_path):
  _run(tmp_path, "--config.mesh.num_cpu_devices=8", "--config.mesh.shape.data=2", "--config.mesh.shape.fsdp=2",
       "--config.mesh.shape.tensor=2")
  _assert_same_losses(_losses(tmp_path), _losses(baseline))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_on_loopback_give_the_same_losses(baseline, tmp_path):
  port = _free_port()
  common = [sys.executable, "-m", "rlhfx.main", *QUICK, f"--workdir={tmp_path}",
            f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
            "--config.mesh.num_cpu_devices=2", "--config.mesh.shape.data=2", "--config.mesh.shape.fsdp=2"]
  run_processes([common + [f"--config.distributed.process_id={i}"] for i in range(2)], ROOT, timeout=TIMEOUT)
  _assert_same_losses(_losses(tmp_path), _losses(baseline))
  # the checkpoint the two processes wrote together restores in this one process, equal to the 1-process run's
  (two_procs, _), (one_proc, _) = _restore_state(tmp_path), _restore_state(baseline)
  assert int(two_procs.step) == int(one_proc.step) == 20
  for a, b in zip(jax.tree.leaves(two_procs.params), jax.tree.leaves(one_proc.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_sigterm_then_restart_equals_the_uninterrupted_run(baseline, tmp_path):
  first = _run(tmp_path, "--config.train.export_hf=True", sigterm_at=10)
  assert first.returncode == 75 and "stopped at step 10 (SIGTERM)" in first.stdout
  assert (tmp_path / "checkpoints" / "10").exists()
  assert max(_losses(tmp_path)) == 10 and not (tmp_path / "hf").exists()
  second = _run(tmp_path, "--config.train.export_hf=True")
  assert "resumed from step 10" in second.stdout
  _assert_same_losses(_losses(tmp_path), _losses(baseline), rtol=1e-6)
  _, resumed = from_hf(tmp_path / "hf")
  _, straight = from_hf(baseline / "hf")
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_a_resumed_runs_summary_keeps_the_first_evaluation(tmp_path):
  """The before/after lines of a run stopped by SIGTERM and resumed: "before" is the evaluation made before the
  first step (metrics.jsonl's step-0 rows), not evaluated again and not dropped."""
  held_out = ("--config.data.eval_fraction=0.05", "--config.train.eval_every=0")
  _run(tmp_path, *held_out, sigterm_at=10)
  first = first_evaluation(tmp_path)
  assert {"eval/loss", "eval/exact_match"} <= set(first)
  second = _run(tmp_path, *held_out)
  assert "eval: step 0" not in second.stdout and "eval: step 20" in second.stdout
  summary = second.stdout.split("== summary ==")[1]
  assert f"eval loss {first['eval/loss']:.3f} -> " in summary
  assert f"exact-match accuracy on held-out prompts {first['eval/exact_match']:.0%} -> " in summary


def test_checkpoint_from_one_mesh_restores_on_another(baseline, tmp_path):
  _run(tmp_path, "--config.mesh.num_cpu_devices=8", "--config.mesh.shape.data=2", "--config.mesh.shape.fsdp=2",
       "--config.mesh.shape.tensor=2", sigterm_at=10)
  second = _run(tmp_path, "--config.mesh.num_cpu_devices=4", "--config.mesh.shape.data=1",
                "--config.mesh.shape.fsdp=1", "--config.mesh.shape.tensor=4")
  assert "resumed from step 10" in second.stdout
  _assert_same_losses(_losses(tmp_path), _losses(baseline))


def _restore_state(workdir, step=20):
  """The SFT state of a quickstart run's checkpoint, restored on this process's first device."""
  model_config = get_preset("tiny", vocab_size=259)
  params = jax.eval_shape(lambda: init_params(model_config, jax.random.key(0)))
  optimizer = make_optimizer(base_config("sft").optim, 20, params)
  target = jax.eval_shape(lambda p: init_state(p, optimizer), params)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  ckpt = Checkpointer(pathlib.Path(workdir) / "checkpoints")
  restored, meta = ckpt.restore(step, {"state": abstract(target, jax.tree.map(lambda _: device, target))})
  ckpt.close()
  return restored["state"], meta


def test_exported_policy_has_the_checkpoint_logits(baseline):
  model_config, exported = from_hf(baseline / "hf")
  state, meta = _restore_state(baseline)
  assert meta["step"] == 20 and int(state.step) == 20
  tokens = np.array([[1, 117, 104, 121, 104, 117, 118, 104, 61]], np.int32)
  np.testing.assert_allclose(forward(model_config, exported, tokens), forward(model_config, state.params, tokens),
                             atol=1e-6)
  assert model_config.vocab_size == 259 and model_config.n_layers == get_preset("tiny").n_layers


@pytest.mark.parametrize("overrides,message", [
    (["--config.train.global_batch_size=6", "--config.mesh.num_cpu_devices=4"],
     "config.train.global_batch_size=6 gives micro-batches of 6 rows, not divisible by the data-parallel size 4"),
    (["--config.data.max_length=1000"], "config.data.max_length=1000 is longer than the model's context"),
    (["--config.model.preset=gpt5"], "config.model.preset='gpt5' is not a preset"),
    (["--config.train.batch_sz=3"], "unknown config field config.train.batch_sz"),
    (["--config.mesh.shape.data=3"], "config.mesh.shape={'data': 3, 'fsdp': 1, 'tensor': 1} needs 3 devices"),
])
def test_bad_config_one_clear_message(tmp_path, overrides, message):
  proc = _run(tmp_path, *overrides, check=False)
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  assert message in proc.stderr.strip().splitlines()[-1]


def test_lora_sft_exports_adapters_and_the_merged_model(tmp_path):
  """--config.lora.rank for SFT: the base stays the seed's initialisation, the adapters are written in PEFT's
  format, and the exported Hugging Face model is exactly base + scale * A @ B of the saved adapters; a second
  run continues from them (lora.init_from) and, at learning rate 0, exports the same model."""
  from rlhfx.models import lora
  from rlhfx.models.peft_io import load_peft

  proc = _run(tmp_path / "a", "--config.lora.rank=4", "--config.train.export_hf=True",
              "--config.optim.learning_rate=1e-2")
  assert "LoRA adapters (PEFT format" in proc.stdout
  losses = _losses(tmp_path / "a")
  assert losses[20] < losses[1]
  adapters, settings = load_peft(tmp_path / "a" / "adapters")
  assert settings["rank"] == 4 and len(adapters) == 4 * get_preset("tiny").n_layers
  base = init_params(get_preset("tiny", vocab_size=259), jax.random.key(0))
  want = lora.merge(base, adapters, scale=settings["alpha"] / 4)
  _, exported = from_hf(tmp_path / "a" / "hf")
  for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(base)))
  _run(tmp_path / "b", "--config.lora.rank=4", "--config.train.export_hf=True", "--config.optim.learning_rate=0",
       "--config.train.num_steps=2", f"--config.lora.init_from={tmp_path / 'a' / 'adapters'}")
  _, continued = from_hf(tmp_path / "b" / "hf")
  for a, b in zip(jax.tree.leaves(continued), jax.tree.leaves(exported)):
    np.testing.assert_array_equal(a, b)
  proc = _run(tmp_path / "c", "--config.lora.rank=8", f"--config.lora.init_from={tmp_path / 'a' / 'adapters'}",
              check=False)
  assert proc.returncode == 1 and "its adapters have r=4, lora_alpha=16; set config.lora.rank=4" in proc.stderr
