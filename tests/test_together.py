"""`launch/sweep.py --together` and `python -m rlhfx.together`: members of a DPO sweep trained as one program, each
a run of its own: the same config.json, metrics and final evaluation as the same sweep run apart; a member that
goes NaN stops alone; SIGTERM saves every member and the rerun equals the unbroken program; 8 devices agree with 1,
with the member axis over `data` and the frozen reference once (placement.json).

A byte-level tiny model on 200 HH pairs (128 tokens, 8 pairs a step, 4 steps) keeps each run to seconds.
Tolerance: see tests/test_members.py (float32 round-off of batched against unbatched matmuls).
"""

import gzip
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from rlhfx import members

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENTRIES = [{"dpo.beta": 0.1, "optim.learning_rate": 1e-3}, {"dpo.beta": 0.5, "optim.learning_rate": 1e-3},
           {"dpo.beta": 0.5, "optim.learning_rate": 3e-3}]
NAMES = ["00-beta=0.1-learning_rate=0.001", "01-beta=0.5-learning_rate=0.001", "02-beta=0.5-learning_rate=0.003"]
COMMON = ["--config.data.tokenizer=builtin:bytes", "--config.model.vocab_size=259", "--config.data.max_length=128",
          "--config.data.max_prompt_length=96", "--config.data.buckets=128,", "--config.train.global_batch_size=8",
          "--config.train.num_steps=4", "--config.train.log_every=1", "--config.train.eval_every=0",
          "--config.train.checkpoint_every=100", "--config.data.eval_fraction=0.1", "--config.train.export_hf=False",
          "--config.train.eval_sample_tokens=4", "--config.model.lm_head_chunk=0"]

pytestmark = pytest.mark.slow  # a handful of tiny runs: about 3 minutes together


def _sweep_config(directory: pathlib.Path, entries) -> str:
  path = directory / "dpo_sweep.py"
  path.write_text(members.sweep_file(ROOT / "configs" / "dpo_hh.py", entries))
  return f"{path}:tiny"


def _cli(*args, expect=0):
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == expect, proc.stdout[-4000:] + proc.stderr[-4000:]
  return proc.stdout + proc.stderr


def _rows(workdir) -> dict[int, dict]:
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: r for r in map(json.loads, lines) if "train/loss" in r}


def _eval(workdir) -> dict:
  rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return [r for r in rows if "eval/loss" in r][-1]


def _same_training(a, b, rtol=1e-5):
  ra, rb = _rows(a), _rows(b)
  assert sorted(ra) == sorted(rb) == [1, 2, 3, 4]
  # margins are beta x differences of summed log-probs (~400 nats): their round-off is ~1e-5 absolute, and at
  # step 1 (the policy is the reference) that is all they are
  atol = {"train/loss": 1e-7, "train/grad_norm": 1e-7, "rewards/margins": 2e-5, "train/lr": 0.0}
  for step in ra:
    for k, tol in atol.items():
      np.testing.assert_allclose(ra[step][k], rb[step][k], rtol=rtol, atol=tol, err_msg=f"{a} vs {b}, step {step}: {k}")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, shared_data):
  """The sweep's config and data, and the members trained together through launch/sweep.py --together."""
  tmp = tmp_path_factory.mktemp("together")
  pairs = tmp / "hh200.jsonl"
  with gzip.open(shared_data("hh_rlhf/harmless-base-test.jsonl.gz"), "rt") as f:
    pairs.write_text("".join(line for _, line in zip(range(200), f)))
  config = _sweep_config(tmp, ENTRIES)
  overrides = [*COMMON, f"--config.data.train_files=('{pairs}',)"]
  out = _cli("launch/sweep.py", "--config", config, "--root", str(tmp / "together"), "--together", "--", *overrides)
  return {"tmp": tmp, "config": config, "overrides": overrides, "out": out, "root": tmp / "together"}


def test_members_trained_together_are_the_runs_of_the_same_sweep_apart(sweep):
  assert f"  program 1: {', '.join(NAMES)}" in sweep["out"]
  apart = sweep["tmp"] / "apart"
  _cli("launch/sweep.py", "--config", sweep["config"], "--root", str(apart), "--", *sweep["overrides"])
  for name in NAMES:
    member, alone = sweep["root"] / name, apart / name
    # a member's record of what it was made from is a separate run's: rerunning it alone resumes it
    assert json.loads((member / "config.json").read_text()) == json.loads((alone / "config.json").read_text())
    _same_training(member, alone)
    np.testing.assert_allclose(_eval(member)["eval/loss"], _eval(alone)["eval/loss"], rtol=1e-5)
    for kept in ("sweep_done.json", "checkpoints/4", "samples.jsonl", "tensorboard", "inputs.json", "sweep.log"):
      assert (member / kept).exists(), kept
    placement = json.loads((member / "placement.json").read_text())
    assert placement["members"]["names"] == NAMES and placement["members"]["index"] == NAMES.index(name)
  lrs = {name: _rows(sweep["root"] / name)[4]["train/lr"] for name in NAMES}
  assert lrs[NAMES[2]] == pytest.approx(3 * lrs[NAMES[1]], rel=1e-6)  # each member its own rate
  report = _cli("launch/sweep.py", "report", "--root", str(sweep["root"]))
  assert all(name in report for name in NAMES)
  again = _cli("launch/sweep.py", "--config", sweep["config"], "--root", str(sweep["root"]), "--together", "--",
               *sweep["overrides"])
  assert all(f"{name}: finished before, skipped" in again for name in NAMES) and "0 runs as 0 programs" in again


def test_a_member_that_goes_nan_stops_alone(sweep):
  (sweep["tmp"] / "nan_config").mkdir()
  config = _sweep_config(sweep["tmp"] / "nan_config", [ENTRIES[0], {"dpo.beta": 0.1, "optim.learning_rate": 1e30}])
  root = sweep["tmp"] / "nan"
  out = _cli("launch/sweep.py", "--config", config, "--root", str(root), "--together", "--", *sweep["overrides"],
             expect=1)
  good, bad = root / NAMES[0], root / "01-beta=0.1-learning_rate=1e+30"
  assert (good / "sweep_done.json").exists() and not (bad / "sweep_done.json").exists()
  _same_training(good, sweep["root"] / NAMES[0])  # the other member is untouched by it
  assert "01-beta=0.1-learning_rate=1e+30: failed (exit 1): 01-beta=0.1-learning_rate=1e+30: rlhfx: " \
         "TrainingDiverged: step" in out
  assert max(_rows(bad), default=0) < 4


def test_sigterm_saves_every_member_and_the_rerun_equals_the_unbroken_program(sweep):
  root = sweep["tmp"] / "preempted"
  args = ["--together", f"--config={sweep['config']}", f"--root={root}", *sweep["overrides"]]
  first = _cli(str(ROOT / "tests" / "preempted_run.py"), "2", *args, expect=75)
  assert "stopped at step 2" in first
  assert all((root / name / "checkpoints" / "2").exists() for name in NAMES)
  second = _cli("-m", "rlhfx.together", *args[1:])
  assert second.count("resumed from step 2") == len(NAMES)
  for name in NAMES:
    _same_training(root / name, sweep["root"] / name, rtol=1e-6)


def test_eight_devices_agree_with_one_and_hold_the_frozen_reference_once(sweep):
  root = sweep["tmp"] / "eight"
  _cli("-m", "rlhfx.together", f"--config={sweep['config']}", f"--root={root}", f"--runs={NAMES[1]},{NAMES[2]}",
       *sweep["overrides"], "--config.mesh.num_cpu_devices=8", "--config.mesh.shape.data=2",
       "--config.mesh.shape.fsdp=4")
  for name in NAMES[1:]:
    _same_training(root / name, sweep["root"] / name)
  placement = json.loads((root / NAMES[1] / "placement.json").read_text())
  assert placement["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  assert placement["members"]["mesh_axis"] == "data"
  embed = placement["state"]["params/embed/embedding"]  # each data-parallel group holds its own member
  assert embed["shape"] == [2, 259, 64] and embed["spec"][0] == "data"
  assert embed["device_bytes"] == 259 * 64 * 4 // 4  # one member, its rows over fsdp=4
  reference = placement["reference"]["embed/embedding"]  # the frozen reference: no member axis, one copy
  assert reference["shape"] == [259, 64] and "data" not in json.dumps(reference["spec"])
  assert reference["device_bytes"] == 259 * 64 * 4 // 4
