"""Nothing silent, round two: a workdir's records are checked, every user error is one line, user code is
guarded, a degenerating run says so, and a signal at any moment leaves a resumable state (and says so)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from rlhfx import checkpoint, config as config_lib, metrics, reward_functions, workdir
from rlhfx.data import prepare
from rlhfx.models.hf_config import CheckpointError
from test_faults import _config as _sft  # a built-in SFT task's config with overrides

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
QUICK = ["--config=configs/quickstart.py", "--config.train.log_every=1", "--config.train.eval_every=0",
         "--config.data.eval_fraction=0", "--config.train.export_hf=False"]


def _cli(*args, module="rlhfx.main", timeout=600):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                        timeout=timeout)


def _one_line(proc, code: int, *words: str):
  lines = [line for line in proc.stderr.splitlines() if ": " in line and not line.startswith((" ", "W", "I"))]
  assert proc.returncode == code, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert any(all(w in line for w in words) for line in lines), lines




# ----------------------------------------------------------------------------- 1. records are checked


def test_a_workdir_of_another_algorithm_is_refused_even_with_new_config(tmp_path):
  workdir.claim(_sft(), tmp_path)
  workdir.record(_sft(), tmp_path)
  dpo = config_lib.base_config("dpo")
  dpo.train.resume = "new_config"
  with pytest.raises(workdir.WorkdirError, match="holds a 'sft' run .config.algorithm 'sft' -> 'dpo'"):
    workdir.claim(dpo, tmp_path)


@pytest.mark.parametrize("text", ['{"optim": {"learning_rat', "[1, 2]", "\xff\xfe"])
def test_a_damaged_config_record_stops_the_rerun(tmp_path, text):
  workdir.claim(_sft(), tmp_path)
  workdir.record(_sft(), tmp_path)
  (tmp_path / "config.json").write_bytes(text.encode("latin-1"))
  with pytest.raises(workdir.WorkdirError, match="config.json"):
    workdir.claim(_sft(**{"optim.learning_rate": 0.5}), tmp_path)


def test_nothing_is_recorded_until_the_run_starts(tmp_path):
  """A start that fails on its data or config leaves the workdir's records as they were."""
  workdir.claim(_sft(), tmp_path)
  assert not (tmp_path / "config.json").exists() and not (tmp_path / "inputs.json").exists()


def test_a_dangling_symlink_and_a_directory_lock_file_are_one_line(tmp_path):
  (tmp_path / "link").symlink_to(tmp_path / "gone")
  with pytest.raises(workdir.WorkdirError, match="symbolic link to .*gone, which does not exist"):
    workdir.claim(_sft(), tmp_path / "link")
  (tmp_path / "run" / ".lock").mkdir(parents=True)
  with pytest.raises(workdir.WorkdirError, match="cannot be opened as the run's lock file"):
    workdir.claim(_sft(), tmp_path / "run")


def _files_config(data_dir, path):
  return _sft(**{"data.builtin": "", "data.train_files": (str(path),), "data.dir": str(data_dir),
                 "data.input_format": "sft", "data.eval_fraction": 0.3})


def _write(path, n, tag):
  path.write_text("".join(json.dumps({"prompt": f"{tag} {i}", "completion": f"answer {i}"}) + "\n"
                          for i in range(n)))


def test_a_shared_data_dir_holds_a_dataset_per_recipe_and_rebuilds_a_damaged_one(tmp_path, capsys):
  a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
  _write(a, 40, "a")
  _write(b, 30, "b")
  shared = tmp_path / "shared"
  dir_a = prepare.dataset_dir(_files_config(shared, a), tmp_path / "run_a", "sft")
  dir_b = prepare.dataset_dir(_files_config(shared, b), tmp_path / "run_b", "sft")
  assert dir_a != dir_b and dir_a.parent == dir_b.parent == shared  # other inputs: another dataset, both kept
  assert prepare.check(dir_a, prepare.recipe(_files_config(shared, a), "sft")) is None
  capsys.readouterr()
  # a split file cut short, then one deleted: each said in one line and rebuilt from the inputs
  records = [p for p in dir_a.rglob("*") if p.is_file() and "array_record" in p.name]
  largest = max(records, key=lambda p: p.stat().st_size)
  largest.write_bytes(largest.read_bytes()[:100])
  assert prepare.dataset_dir(_files_config(shared, a), tmp_path / "run_a", "sft") == dir_a
  out = capsys.readouterr().out
  assert f"{largest} has 100 bytes" in out and "rebuilding the dataset from its inputs" in out
  eval_file = next(p for p in dir_a.rglob("*eval*") if p.is_file())
  eval_file.unlink()
  prepare.dataset_dir(_files_config(shared, a), tmp_path / "run_a", "sft")
  assert f"{eval_file} is missing" in capsys.readouterr().out and eval_file.exists()
  # the same file with other contents is another recipe: another folder, the old one untouched
  _write(a, 41, "a")
  assert prepare.dataset_dir(_files_config(shared, a), tmp_path / "run_a", "sft") not in (dir_a, dir_b)
  assert dir_a.exists()


def test_a_renamed_checkpoint_folder_and_another_algorithms_checkpoint_are_caught(tmp_path):
  from flax import struct

  @struct.dataclass
  class State:
    step: jnp.ndarray
    w: jnp.ndarray

  ckpt = checkpoint.Checkpointer(tmp_path / "c", async_save=False, identity={"algorithm": "sft"})
  for step in (1, 2):
    ckpt.save(step, {"state": State(step=jnp.int32(step), w=jnp.ones(3) * step)}, wait=True)
  ckpt.close()
  os.rename(tmp_path / "c" / "2", tmp_path / "c" / "7")  # the folder says 7, the checkpoint holds step 2
  target = {"state": State(step=jnp.int32(0), w=jnp.zeros(3))}
  ckpt = checkpoint.Checkpointer(tmp_path / "c", async_save=False, identity={"algorithm": "sft"})
  trees, step = checkpoint.restore_latest(ckpt, target)
  assert step == 1 and float(trees["state"].w[0]) == 1.0  # 7 rejected, kept aside
  assert (tmp_path / "rejected_checkpoints" / "7").exists()
  ckpt.close()
  other = checkpoint.Checkpointer(tmp_path / "c", async_save=False, identity={"algorithm": "dpo"})
  with pytest.raises(CheckpointError, match="is a algorithm 'sft' run's, this run's algorithm is 'dpo'"):
    checkpoint.restore_latest(other, target)
  other.close()


# ----------------------------------------------------------------------------- 2. every user error is one line


def test_config_files_that_are_missing_or_raise_are_one_line(tmp_path):
  _one_line(_cli("--config=configs/nope.py", f"--workdir={tmp_path}"), 2, "no such config file", "quickstart.py")
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config(arg=None):\n  raise ValueError(f'unknown variant {arg!r}')\n")
  _one_line(_cli(f"--config={bad}:huge", f"--workdir={tmp_path}"), 2, "ValueError: unknown variant 'huge'")
  _one_line(_cli("--config=configs/nope.py", "--topology=v5e-4", module="rlhfx.plan"), 2, "no such config file")


def test_damaged_model_directories_are_one_line_in_a_run_and_in_the_demo(tmp_path):
  gold = ROOT / "tests" / "goldens" / "llama"
  cases = {}
  for name, files in {"cut": {"config.json": (gold / "config.json").read_bytes(),
                              "model.safetensors": (gold / "model.safetensors").read_bytes()[:3000]},
                      "json": {"config.json": b'{"model_type": "llama", "hid',
                               "model.safetensors": (gold / "model.safetensors").read_bytes()},
                      "no_config": {"model.safetensors": (gold / "model.safetensors").read_bytes()}}.items():
    (tmp_path / name).mkdir()
    for file, data in files.items():
      (tmp_path / name / file).write_bytes(data)
    cases[name] = tmp_path / name
  words = {"cut": "not a readable safetensors file", "json": "not valid JSON", "no_config": "config.json: missing"}
  for name, path in cases.items():
    _one_line(_cli(f"--hf={path}", module="rlhfx.demo"), 1, words[name])
  _one_line(_cli(f"--hf={tmp_path / 'gone'}", module="rlhfx.demo"), 1, "no such directory")
  config = tmp_path / "from_hf.py"  # a run whose model comes from the directory (no shapes of its own)
  config.write_text("from rlhfx.config import base_config\n\ndef get_config(arg=None):\n"
                    "  c = base_config('sft')\n  c.data.builtin = 'reverse'\n  c.data.tokenizer = 'builtin:bytes'\n"
                    "  return c\n")
  for name, path in [("json", cases["json"]), ("no_config", cases["no_config"]), ("gone", tmp_path / "gone")]:
    _one_line(_cli(f"--config={config}", f"--workdir={tmp_path / ('w_' + name)}", f"--config.model.init_from={path}"),
              1, words.get(name, "no such directory"))


def test_the_tpu_launcher_checks_its_arguments_before_anything_runs(tmp_path):
  def launch(*args):
    return subprocess.run([sys.executable, "launch/tpu.py", "--name=x", "--zone=z", "--project=p", "--workdir=/w",
                           "--dry-run", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)

  _one_line(launch("--config=configs/nope.py"), 2, "no such config file")
  _one_line(launch("--config=configs/quickstart.py", "--accelerator-type=v9-8"), 2, "--accelerator-type=v9-8")


# ----------------------------------------------------------------------------- 3. user code is guarded


def _call(fn, timeout_s=0.0):
  f = reward_functions.RewardFunction("mine", fn)
  return reward_functions.call(f, prompts=["p", "q"], completions=["a", "b"], completion_ids=[[1], [2]], columns={},
                               timeout_s=timeout_s)


@pytest.mark.parametrize("fn, words", [
    (lambda completions, **_: 1 / 0, "mine raised ZeroDivisionError: division by zero"),
    (lambda completions, **_: [1.0], "mine returned 1 scores for 2 completions"),
    (lambda completions, **_: 0.5, "mine returned float 0.5; expected a list of 2 floats"),
    (lambda completions, **_: "ab", "mine returned str 'ab'"),
    (lambda completions, **_: [1.0, "high"], "mine returned str 'high' for completion 1"),
    (lambda completions, **_: [1.0, [2]], "mine returned list [2] for completion 1"),
])
def test_a_reward_function_that_fails_is_one_error_naming_it(fn, words):
  with pytest.raises(reward_functions.RewardFunctionError, match=words.replace("(", r"\(").replace("[", r"\[")):
    _call(fn)


def test_a_reward_function_that_hangs_times_out_and_sigterm_stops_it_at_once():
  t0 = time.perf_counter()
  with pytest.raises(reward_functions.RewardFunctionError, match="did not return within config.scoring.timeout_s=0.5"):
    _call(lambda completions, **_: time.sleep(30), timeout_s=0.5)
  assert time.perf_counter() - t0 < 5
  np.testing.assert_array_equal(_call(lambda completions, **_: [1, None]), [1.0, np.nan])
  with checkpoint.Preemption(pathlib.Path("/tmp")) as preemption:  # in a step loop, user code running
    with pytest.raises(checkpoint.Preempted, match="rerun the same command to resume"):
      _call(lambda completions, **_: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(30)), timeout_s=60)
    preemption.requested = False  # the block would raise again on leaving


# ----------------------------------------------------------------------------- 4. a degenerating run says so


def test_divergence_stops_on_a_loss_that_explodes_and_on_gradients_that_vanish():
  t = _sft(**{"train.vanished_steps": 3}).train
  watch = metrics.Divergence(t, watch_loss=True)
  assert watch.check({"train/loss": 5.5, "train/grad_norm": 2.0}, "train/loss") is None
  assert watch.check({"train/loss": 500.0, "train/grad_norm": 2.0}, "train/loss") is None  # < 100 x 6.5
  assert "rose from 5.5 to 1.305e+05" in watch.check({"train/loss": 130528.0, "train/grad_norm": 2.0}, "train/loss")
  watch = metrics.Divergence(t, watch_loss=False)
  assert all(watch.check({"train/loss": 0.0, "train/grad_norm": 0.0}, "train/loss") is None for _ in range(5))
  assert watch.check({"train/loss": 1.0, "train/grad_norm": 1.0}, "train/loss") is None  # zero from the start: fine
  for _ in range(2):
    assert watch.check({"train/grad_norm": 0.0}, "train/loss") is None
  assert "exactly 0 for 3 steps" in watch.check({"train/grad_norm": 0.0}, "train/loss")


def test_a_run_whose_loss_explodes_stops_with_one_line(tmp_path):
  proc = _cli(*QUICK, f"--workdir={tmp_path}", "--config.optim.learning_rate=1e3", "--config.train.num_steps=30",
              "--config.optim.warmup_steps=1")
  _one_line(proc, 1, "TrainingDiverged")
  assert "step None" not in proc.stderr and ("rose from" in proc.stderr or "exactly 0" in proc.stderr
                                             or "inf" in proc.stderr.lower() or "nan" in proc.stderr.lower())


# ----------------------------------------------------------------------------- 5. signals


def test_sigterm_during_set_up_exits_75_saying_rerun(tmp_path):
  proc = subprocess.Popen([sys.executable, "-m", "rlhfx.main", *QUICK, f"--workdir={tmp_path}"], cwd=ROOT, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  time.sleep(6)  # importing, building the data, compiling: before the step loop
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 75, err[-2000:]
  assert "rerun the same command to resume" in out + err and "Traceback" not in err


def test_metrics_keep_one_row_per_step_across_restarts(tmp_path):
  rows = [{"step": s, "train/loss": float(s)} for s in (0, 1, 2, 3, 4)] + [{"step": 3, "eval/loss": 1.0}]
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "train/lo')  # cut by a kill
  metrics._drop_rows_after(path, 3)  # the run resumes from step 3: 4 and 5 run (and log) again
  assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2, 3, 3]
  metrics._drop_rows_after(path, 0)  # from scratch: every row is written again
  assert path.read_text() == ""


def test_a_stopped_sweep_passes_sigterm_to_its_run_and_starts_no_other(tmp_path):
  sys.path.insert(0, str(ROOT))
  from launch import sweep

  child = [sys.executable, "-c", "import signal, sys, time\n"
           "signal.signal(signal.SIGTERM, lambda *a: (print('child stopped', flush=True), sys.exit(75)))\n"
           "time.sleep(60)"]
  previous = signal.signal(signal.SIGTERM, sweep._Stop.handle)
  try:
    with open(tmp_path / "log", "w") as log:
      signal.setitimer(signal.ITIMER_REAL, 1.0)
      old_alarm = signal.signal(signal.SIGALRM, lambda *a: os.kill(os.getpid(), signal.SIGTERM))
      t0 = time.perf_counter()
      rc = sweep._run(child, log)
      signal.signal(signal.SIGALRM, old_alarm)
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert rc == 75 and time.perf_counter() - t0 < 30 and sweep._Stop.requested
  assert "child stopped" in (tmp_path / "log").read_text()
  results = sweep._run_all("configs/quickstart.py", [{"name": "next", "workdir": str(tmp_path / "n"),
                                                     "overrides": {}}], dry_run=False, out=sys.stdout, results=[])
  assert results[0]["status"].startswith("stopped (SIGTERM): not started")
  sweep._Stop.requested = False


def test_help_and_show_config_print_and_exit_0(tmp_path):
  for module in ("rlhfx.main", "rlhfx.plan"):
    proc = _cli("--help", module=module)
    assert proc.returncode == 0 and "quickstart.py" in proc.stdout and "--config" in proc.stdout, proc.stderr[-500:]
  proc = _cli("--config=configs/quickstart.py", "--show_config", "--config.train.num_steps=7")
  assert proc.returncode == 0, proc.stderr[-500:]
  assert "train.num_steps = 7  # optimizer steps" in proc.stdout
  assert "data.builtin = 'reverse'  # \"reverse: abcd =\"" in proc.stdout  # the config file's own comment
  _one_line(_cli("--config=configs/quickstart.py"), 2, "--workdir is required")


def test_a_wandb_project_without_wandb_installed_is_a_config_line_before_any_work(monkeypatch):
  from rlhfx import validation

  real = validation.importlib.util.find_spec
  monkeypatch.setattr(validation.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else
                      real(name, *a))
  config = _sft(**{"logging.wandb.project": "mine"})
  assert any("pip install 'rlhfx[wandb]'" in p for p in validation.problems(config))
