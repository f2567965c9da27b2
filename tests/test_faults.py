"""Faults: damaged checkpoints, a second run of one workdir, changed configs and inputs, full and read-only disks,
SIGKILL at random moments. Each case names the break it guards against (issue "Nothing lost, nothing silent")."""

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from rlhfx import checkpoint, config as config_lib, workdir
from rlhfx.models.hf_config import CheckpointError

ROOT = pathlib.Path(__file__).resolve().parents[1]
TREE = {"w": jnp.arange(20000, dtype=jnp.float32).reshape(100, 200) / 7, "b": jnp.ones(3, jnp.bfloat16),
        "step": jnp.int32(4), "key": jax.random.key(0)}


def _values(tree):
  return [np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
          for x in jax.tree.leaves(tree)]


def _target(tree):
  return {"state": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)}


def _two_checkpoints(directory):
  """Steps 1 and 2 of TREE (step 2's w differs), each with a data iterator at another position."""
  it = iter(grain.MapDataset.range(10).to_iter_dataset())
  with checkpoint.Checkpointer(directory) as c:
    next(it)
    c.save(1, {"state": TREE}, data_iterator=it)
    next(it)
    c.save(2, {"state": {**TREE, "w": TREE["w"] + 1}}, data_iterator=it)
  return it


def _largest(directory):
  return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _xor(path):
  data = bytearray(path.read_bytes())
  for i in range(len(data) // 4, len(data) // 4 + 4096):
    data[i % len(data)] ^= 0xFF
  path.write_bytes(bytes(data))


DAMAGE = {
    "array bytes flipped (size unchanged)": lambda d: _xor(_largest(d / "state")),
    "array file truncated": lambda d: os.truncate(_largest(d / "state"), _largest(d / "state").stat().st_size // 2),
    "metadata/ deleted": lambda d: shutil.rmtree(d / "metadata"),
    "metadata not JSON": lambda d: (d / "metadata" / "metadata").write_text("{not json"),
    "state/ deleted": lambda d: shutil.rmtree(d / "state"),
    "array manifest deleted": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "data iterator state deleted": lambda d: (d / "data_iterator" / "process_0-of-1.json").unlink(),
    "data iterator state not JSON": lambda d: (d / "data_iterator" / "process_0-of-1.json").write_text("{"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_moved_aside_and_the_previous_one_restored(damage, tmp_path):
  _two_checkpoints(tmp_path / "checkpoints")
  DAMAGE[damage](tmp_path / "checkpoints" / "2")
  it = iter(grain.MapDataset.range(10).to_iter_dataset())
  with checkpoint.Checkpointer(tmp_path / "checkpoints") as c:
    trees, step = checkpoint.restore_latest(c, _target(TREE), data_iterator=it)
    assert step == 1 and c.all_steps() == [1]
  for got, want in zip(_values(trees["state"]), _values(TREE)):
    np.testing.assert_array_equal(got, want)
  assert next(it) == 1  # the iterator continues where step 1 left it
  assert (tmp_path / "rejected_checkpoints" / "2").is_dir()  # kept for inspection, never used


def test_every_checkpoint_damaged_stops_with_one_line(tmp_path):
  _two_checkpoints(tmp_path / "checkpoints")
  for step in ("1", "2"):
    _xor(_largest(tmp_path / "checkpoints" / step / "state"))
  with checkpoint.Checkpointer(tmp_path / "checkpoints") as c, pytest.raises(CheckpointError) as e:
    checkpoint.restore_latest(c, _target(TREE))
  assert "no checkpoint" in str(e.value) and "\n" not in str(e.value)
  assert sorted(p.name for p in (tmp_path / "rejected_checkpoints").iterdir()) == ["1", "2"]


def test_a_checkpoint_of_another_state_is_an_error_and_stays(tmp_path):
  _two_checkpoints(tmp_path / "checkpoints")
  other = {**TREE, "w": jnp.zeros((100, 300), jnp.float32)}
  with checkpoint.Checkpointer(tmp_path / "checkpoints") as c, pytest.raises(CheckpointError) as e:
    checkpoint.restore_latest(c, _target(other))
  assert "state/w" in str(e.value) and "[100, 200]" in str(e.value) and "[100, 300]" in str(e.value)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]


def test_fingerprints_change_with_any_one_element():
  x = jnp.arange(64, dtype=jnp.float32).reshape(8, 8)
  base = checkpoint.fingerprints({"t": {"x": x}})["t/x"][2]
  for i, j in ((0, 0), (7, 7), (3, 5)):
    assert checkpoint.fingerprints({"t": {"x": x.at[i, j].add(1e-6 + abs(float(x[i, j])) * 1e-7)}})["t/x"][2] != base
  assert checkpoint.fingerprints({"t": {"x": x.T}})["t/x"][2] != base  # same values, other positions


# ----------------------------------------------------------------------------- the work directory


def _config(**overrides):
  c = config_lib.base_config("sft")
  c.data.builtin = "reverse"
  c.update_from_flattened_dict(overrides)
  return c


def test_a_rerun_with_another_config_stops_naming_the_field_and_the_override(tmp_path):
  workdir.claim(_config(), tmp_path)
  workdir.record(_config(), tmp_path)  # recorded once the run has started
  workdir.claim(_config(**{"train.log_every": 3, "train.checkpoint_every": 7}), tmp_path)  # cadence only: fine
  with pytest.raises(workdir.WorkdirError) as e:
    workdir.claim(_config(**{"optim.learning_rate": 0.5}), tmp_path)
  assert "config.optim.learning_rate 0.001 -> 0.5" in str(e.value) and "train.resume=new_config" in str(e.value)
  accepted = _config(**{"optim.learning_rate": 0.5, "train.resume": "new_config"})
  workdir.claim(accepted, tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["optim"]["learning_rate"] == 0.001  # not started yet
  workdir.record(accepted, tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["optim"]["learning_rate"] == 0.5


def test_changed_input_files_stop_the_rerun_unless_accepted(tmp_path):
  data = tmp_path / "pairs.jsonl"
  data.write_text('{"prompt": "a", "completion": "b"}\n')
  c = _config(**{"data.builtin": "", "data.train_files": (str(data),)})
  run = tmp_path / "run"
  workdir.claim(c, run)
  workdir.record(c, run)
  data.write_text('{"prompt": "a", "completion": "c"}\n')  # same size, other bytes
  with pytest.raises(workdir.WorkdirError, match="pairs.jsonl changed .same size, different SHA-256"):
    workdir.claim(c, run)
  c.train.resume = "new_config"
  workdir.claim(c, run)  # accepted: the dataset of the new inputs is another recipe (rlhfx.data.prepare)


def test_a_second_run_of_a_workdir_stops_until_the_first_process_is_gone(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom rlhfx import config, workdir\n"
                             "c = config.base_config('sft'); c.data.builtin = 'reverse'\n"
                             f"workdir.claim(c, __import__('pathlib').Path({str(tmp_path)!r}))\n"
                             "print('claimed', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "claimed"
    with pytest.raises(workdir.WorkdirError, match=f"in use by pid {holder.pid}"):
      workdir._lock(tmp_path)
  finally:
    holder.kill()
    holder.wait(timeout=30)
  workdir._lock(tmp_path)  # the holder is gone (SIGKILL): its lock went with it
  workdir._held.pop(tmp_path)


def test_other_object_stores_and_file_workdirs_are_refused(tmp_path):
  assert str(workdir.location("gs://bucket/run/")) == "gs://bucket/run"  # Cloud Storage is a workdir (test_storage)
  with pytest.raises(workdir.WorkdirError, match=r"s3:// is not supported; use gs://BUCKET/\.\.\. or a local path"):
    workdir.location("s3://bucket/run")
  (tmp_path / "file").write_text("")
  with pytest.raises(workdir.WorkdirError, match="is a file"):
    workdir.claim(_config(), tmp_path / "file")


# ----------------------------------------------------------------------------- whole runs

QUICK = ["--config=configs/quickstart.py", "--config.train.log_every=1", "--config.train.eval_every=0",
         "--config.data.eval_fraction=0"]


def _main(workdir_, *overrides, timeout=600):
  return subprocess.run([sys.executable, "-m", "rlhfx.main", f"--workdir={workdir_}", *QUICK, *overrides],
                        cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _losses(workdir_) -> dict[int, float]:
  records = [json.loads(line) for line in (pathlib.Path(workdir_) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def test_counts_of_skipped_rows_reach_metrics_and_summary_and_a_small_eval_split_is_evaluated(tmp_path):
  # rows longer than 22 bytes are skipped (not truncated); the eval split (~8 examples) is smaller than a batch
  proc = _main(tmp_path, "--config.train.num_steps=2", "--config.data.max_length=22",
               "--config.data.max_prompt_length=16",
               "--config.data.on_overlong=skip", "--config.data.eval_fraction=0.002", "--config.train.eval_every=2",
               "--config.train.export_hf=False")
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  skipped = records[-1]["data/skipped/overlong"] if "data/skipped/overlong" in records[-1] else [
      r for r in records if "data/skipped/overlong" in r][-1]["data/skipped/overlong"]
  assert skipped > 0
  assert f"{int(skipped)} skipped as over-long" in proc.stdout
  evals = [r for r in records if "eval/loss" in r]
  assert evals and all(r["eval/loss"] > 0.1 and 0 < r["eval/tokens"] for r in evals)


def test_perf_step_time_excludes_saves_and_evals_and_is_never_zero(tmp_path):
  from rlhfx import metrics

  class NoCheckpoints:
    directory = tmp_path

    def latest_step(self):
      return None

  train = _config(**{"train.num_steps": 5, "train.log_every": 1}).train
  log = metrics.StepLog(tmp_path, train, flops_per_token=1.0, checkpointer=NoCheckpoints(), start_step=0)
  with log:
    for step in log.steps(1, 5):
      time.sleep(0.05)  # the step's work
      log.record(step, {"train/loss": jnp.float32(1.0)}, tokens=10)
      if step == 2:  # a save: the pending step read first, then 0.3 s outside any step
        log.flush()
        time.sleep(0.3)
  step_s = [json.loads(line)["perf/step_s"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert len(step_s) == 5 and all(0.04 < s < 0.3 for s in step_s), step_s


def test_the_eta_counts_the_evaluations_left(tmp_path, capsys):
  """10 steps of ~0.05 s with an evaluation of ~0.4 s every 4 steps and at the end: at step 2 the ETA is 8 steps
  plus 3 evaluations (steps 4, 8, 10), timed from the one before training."""
  from rlhfx import metrics

  class NoCheckpoints:
    directory = tmp_path

    def latest_step(self):
      return None

  train = _config(**{"train.num_steps": 10, "train.log_every": 2, "train.eval_every": 4}).train
  log = metrics.StepLog(tmp_path, train, flops_per_token=1.0, checkpointer=NoCheckpoints(), start_step=0)
  with log:
    log.evaluation(0, lambda: time.sleep(0.4) or {"eval/loss": 1.0})
    for step in log.steps(1, 3):
      time.sleep(0.05)
      log.record(step, {"train/loss": jnp.float32(1.0)}, tokens=10)
  out = capsys.readouterr().out
  assert "eval: step 0 ..." in out and "train: compiling step 1" in out and "train: step 1 took" in out
  eta = [line for line in out.splitlines() if line.startswith("step 2/10")][0].split("ETA ")[1]
  minutes, seconds = eta.removesuffix("s").split("m")
  assert 8 * 0.05 + 3 * 0.4 <= 60 * int(minutes) + int(seconds) + 1 <= 8 * 0.3 + 3 * 0.6 + 1


@pytest.mark.slow
def test_sigkill_at_random_moments_and_during_a_save_then_resume_equals_the_unbroken_run(tmp_path):
  overrides = ["--config.train.num_steps=60", "--config.train.checkpoint_every=5"]
  assert _main(tmp_path / "straight", *overrides).returncode == 0
  rng = random.Random(17)
  broken = tmp_path / "broken"
  kills = []
  for during_save in (False, True):
    proc = subprocess.Popen([sys.executable, "-m", "rlhfx.main", f"--workdir={broken}", *QUICK, *overrides],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, delay = time.time() + 300, rng.uniform(0.0, 0.5)
    try:
      while proc.poll() is None and time.time() < deadline:  # training has begun: then wait for the moment
        steps = len(_losses(broken)) if (broken / "metrics.jsonl").exists() else 0
        saving = any((broken / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
        if (saving if during_save else steps >= 8 + 20 * len(kills)):
          time.sleep(0 if during_save else delay)
          break
        time.sleep(0.001)
      proc.send_signal(signal.SIGKILL)
    finally:
      proc.wait(timeout=60)
    kills.append(len(_losses(broken)))
  final = _main(broken, *overrides)
  assert final.returncode == 0 and "resumed from step" in final.stdout, final.stderr[-2000:]
  straight, resumed = _losses(tmp_path / "straight"), _losses(broken)
  assert kills[0] < 60 and sorted(resumed) == list(range(1, 61))
  for step in range(1, 61):  # a step logged twice (before the kill and after the resume) has one value
    assert resumed[step] == straight[step], step
  a, b = (load_file(str(d / "hf" / "model.safetensors")) for d in (tmp_path / "straight", broken))
  assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_resumes_from_the_one_before_and_exports_the_same_weights(tmp_path):
  overrides = ["--config.train.num_steps=4", "--config.train.checkpoint_every=2"]
  assert _main(tmp_path, *overrides).returncode == 0
  before = load_file(str(tmp_path / "hf" / "model.safetensors"))
  _xor(_largest(tmp_path / "checkpoints" / "4" / "state"))
  proc = _main(tmp_path, *overrides)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "checkpoint damaged, not used: step 4" in proc.stdout and "resumed from step 2" in proc.stdout
  after = load_file(str(tmp_path / "hf" / "model.safetensors"))
  assert all(np.array_equal(before[k], after[k]) for k in before)


def _can_mount() -> bool:
  return shutil.which("unshare") is not None and subprocess.run(
      ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
      capture_output=True).returncode == 0


def _in_small_filesystem(script: str, size: str, read_only: bool = False) -> subprocess.CompletedProcess:
  """`script` (sh) in a private mount namespace where /mnt is a fresh tmpfs of `size` (read-only if asked)."""
  mount = f"mount -t tmpfs -o size={size}{',ro' if read_only else ''} tmpfs /mnt"
  return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", f"{mount} && {script}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_complete_checkpoints_and_no_temporary_folders(tmp_path):
  if not _can_mount():
    pytest.skip("needs unshare and a tmpfs mount in a user namespace")
  # every step saved, on 3 MB: the first checkpoints fit (~1.3 MB of state each), a later one does not
  run = (f"{sys.executable} -m rlhfx.main --workdir=/mnt/run {' '.join(QUICK)} --config.train.num_steps=20 "
         f"--config.train.checkpoint_every=1 --config.train.keep_checkpoints=20 --config.data.dir={tmp_path}/data "
         f"--config.train.export_hf=False")
  check = (f"{sys.executable} -c \"import jax; from rlhfx import checkpoint; import pathlib; "
           f"c = checkpoint.Checkpointer('/mnt/run/checkpoints'); print('steps', c.all_steps()); "
           f"[c.metadata(s) for s in c.all_steps()]; print('tmp', list(pathlib.Path('/mnt/run/checkpoints')"
           f".glob('*tmp*')))\"")
  proc = _in_small_filesystem(f"{run}; echo exit=$?; {check}", "3m")
  assert "exit=1" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
  error_lines = [line for line in proc.stderr.splitlines() if line.startswith("rlhfx:")]
  assert len(error_lines) == 1 and "No space left on device" in error_lines[0], proc.stderr[-3000:]
  steps = json.loads(proc.stdout.split("steps ")[1].splitlines()[0])
  assert steps and "tmp []" in proc.stdout
  assert f"complete checkpoints kept: {steps}" in error_lines[0]
  assert not any(noise in proc.stderr for noise in ("Traceback", "Exception ignored", "RESOURCE_EXHAUSTED"))


@pytest.mark.slow
def test_a_read_only_workdir_is_one_line(tmp_path):
  if not _can_mount():
    pytest.skip("needs unshare and a tmpfs mount in a user namespace")
  proc = _in_small_filesystem(f"{sys.executable} -m rlhfx.main --workdir=/mnt/run {' '.join(QUICK)}", "1m",
                              read_only=True)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == ("rlhfx: WorkdirError: --workdir=/mnt/run is not writable: "
                                                  "Read-only file system")


@pytest.mark.parametrize("num_steps, every", [(10, 4), (12, 4), (7, 0), (5, 1), (100, 25), (3, 10)])
def test_evaluations_after_counts_what_evaluation_due_says(num_steps, every):
  from rlhfx import metrics

  train = _config(**{"train.num_steps": num_steps, "train.eval_every": every}).train
  for step in range(0, num_steps + 1):
    walked = sum(metrics.evaluation_due(s, train) for s in range(step + 1, num_steps + 1))
    assert metrics.evaluations_after(step, train) == walked, step
