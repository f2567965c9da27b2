"""launch/: the dry-run commands of the TPU and SLURM paths (golden text), and a local sweep that is killed
mid-way and rerun (finished runs skipped, the interrupted one resumed from its checkpoint).

Regenerate the golden files after an intended change with RLHFX_UPDATE_GOLDENS=1 pytest tests/test_launch.py.
"""

import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDENS = ROOT / "tests" / "goldens" / "launch"
sys.path.insert(0, str(ROOT))

from launch import slurm, sweep, tpu  # noqa: E402

TPU_ARGS = ["--name", "rlhfx-dpo", "--zone", "us-west4-a", "--project", "my-project", "--accelerator-type",
            "v5litepod-16", "--runtime-version", "v2-alpha-tpuv5-lite", "--spot", "--bucket", "my-bucket",
            "--config", "configs/dpo_hh.py", "--workdir", "/gcs/my-bucket/runs/dpo", "--log-dir", "logs", "--dry-run",
            "--", "--config.optim.learning_rate=1e-6"]
SLURM_ARGS = ["--name", "dpo-1b", "--nodes", "2", "--gpus-per-node", "8", "--time", "12:00:00", "--partition", "gpu",
              "--project-dir", "/home/me/rlhfx", "--config", "configs/dpo_hh.py", "--workdir", "/shared/runs/dpo",
              "--log-dir", "logs", "--dry-run", "--", "--config.dpo.beta=0.05"]
SWEEP_TPU = ["--config", "configs/quickstart.py", "--root", "gs://my-bucket/sweeps/qs", "--backend", "tpu",
             "--vms", "2", "--zone", "us-west4-a", "--project", "my-project", "--queued", "--reserved",
             "--log-dir", "logs", "--dry-run", "--", "--config.train.num_steps=100"]
SWEEP_SLURM = ["--config", "configs/quickstart.py", "--root", "/shared/sweeps/qs", "--backend", "slurm",
               "--name", "qs", "--nodes", "1", "--gpus-per-node", "4", "--project-dir", "/home/me/rlhfx",
               "--log-dir", "logs", "--dry-run"]


def _capture(main, argv) -> str:
  out = io.StringIO()
  if main is sweep.main:
    assert main(argv, out=out) == 0
  else:
    import contextlib

    with contextlib.redirect_stdout(out):
      assert main(argv) == 0
  return out.getvalue()


def _check_golden(name: str, text: str):
  path = GOLDENS / name
  if os.environ.get("RLHFX_UPDATE_GOLDENS"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  assert text == path.read_text(), f"{name} differs from its golden file (see the module docstring)"


@pytest.mark.parametrize("name,main,argv", [("tpu.txt", tpu.main, TPU_ARGS), ("slurm.txt", slurm.main, SLURM_ARGS),
                                            ("sweep_tpu.txt", sweep.main, SWEEP_TPU),
                                            ("sweep_slurm.txt", sweep.main, SWEEP_SLURM)])
def test_dry_run_commands_match_golden_text(name, main, argv):
  _check_golden(name, _capture(main, argv))


def test_dry_run_runs_the_same_command_on_every_worker():
  text = _capture(tpu.main, TPU_ARGS)
  run = [line for line in text.splitlines() if "rlhfx.main" in line]
  assert len(run) == 1 and "--worker=all" in run[0] and "~/rlhfx-venv/bin/python -m rlhfx.main" in run[0]
  assert text.splitlines()[-1].startswith("gcloud compute tpus tpu-vm delete rlhfx-dpo")  # deleted at the end


def test_sweep_names_and_overrides():
  runs = sweep.expand("configs/quickstart.py", "/r", ["--config.seed=3"])
  assert [r["name"] for r in runs] == ["00-learning_rate=0.001-n_layers=2", "01-learning_rate=0.001-n_layers=3",
                                       "02-learning_rate=0.003-n_layers=2", "03-learning_rate=0.003-n_layers=3"]
  assert runs[3]["overrides"] == ["--config.optim.learning_rate=0.003", "--config.model.n_layers=3",
                                  "--config.seed=3"]
  assert runs[0]["workdir"] == "/r/00-learning_rate=0.001-n_layers=2"
  assert sweep.format_value((128,)) == "128," and sweep.format_value((1, 2)) == "1,2"


SWEEP_CONFIG = '''
from rlhfx.config import load


def get_config(arg=None):
  config = load({quickstart!r} + (f":{{arg}}" if arg else ""))
  with config.unlocked():
    config.train.num_steps = {steps}
    config.train.checkpoint_every = 10
    config.train.log_every = 10
    config.train.eval_every = 0
    config.data.eval_fraction = 0.0
    config.train.export_hf = False
  return config


def sweep():
  return [{{"optim.learning_rate": 0.003}}, {{"optim.learning_rate": "bad"}}, {{"optim.learning_rate": 0.001}}]
'''


def _complete_checkpoints(workdir):
  """Finished checkpoint directories (Orbax renames a step's temporary directory to its number when done)."""
  directory = workdir / "checkpoints"
  return [p for p in directory.iterdir() if p.name.isdigit()] if directory.exists() else []


@pytest.mark.slow  # about 65 s: three training runs, a kill and a resume
def test_local_sweep_reports_failures_and_resumes_after_a_kill(tmp_path):
  config = tmp_path / "sweep_config.py"
  config.write_text(SWEEP_CONFIG.format(quickstart=str(ROOT / "configs" / "quickstart.py"), steps=150))
  root = tmp_path / "sweep"
  command = [sys.executable, str(ROOT / "launch" / "sweep.py"), "--config", str(config), "--root", str(root)]
  last = root / "02-learning_rate=0.001"
  proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
  try:  # kill the whole sweep (launcher and its run) once the third run has a checkpoint
    deadline = time.time() + 400
    while time.time() < deadline and not _complete_checkpoints(last):
      assert proc.poll() is None, proc.stdout.read()
      time.sleep(0.5)
    assert _complete_checkpoints(last), "the third run never wrote a checkpoint"
    time.sleep(1.0)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  first = proc.stdout.read()
  assert "00-learning_rate=0.003: finished" in first
  assert "01-learning_rate=bad: failed" in first  # reported; the sweep went on to the next run
  assert not (last / sweep.DONE).exists()

  second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=400)
  assert second.returncode == 1, second.stdout + second.stderr  # the bad run still fails
  assert "00-learning_rate=0.003: finished before, skipped" in second.stdout
  assert "02-learning_rate=0.001: resuming" in second.stdout
  assert "02-learning_rate=0.001: finished" in second.stdout
  log = (last / "sweep.log").read_text()
  assert "resumed from step" in log
  steps = [json.loads(line)["step"] for line in (last / "metrics.jsonl").read_text().splitlines()
           if "train/loss" in line]
  assert steps[-1] == 150 and steps.count(10) == 1  # continued, not restarted from step 0
  summary = json.loads((root / "sweep.json").read_text())
  assert [r["status"].split(" ")[0] for r in summary] == ["skipped", "failed", "finished"]

  # the sweep's report: one row per run, from sweep.json and the runs' own metrics (no held-out split here)
  out = io.StringIO()
  assert sweep.main(["report", "--root", str(root), "--format", "json", "--sort", "train/loss",
                     "--plot", "train/loss"], out=out) == 0
  rows = json.loads(out.getvalue())
  finals = {}
  for name in ("00-learning_rate=0.003", "02-learning_rate=0.001"):
    records = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    finals[name] = [r for r in records if "train/loss" in r][-1]["train/loss"]
  assert [r["run"] for r in rows] == [*sorted(finals, key=finals.get), "01-learning_rate=bad"]  # lowest first
  by_name = {r["run"]: r for r in rows}
  ok, bad = by_name["00-learning_rate=0.003"], by_name["01-learning_rate=bad"]
  assert (ok["state"], ok["steps"], ok["overrides"], ok["algorithm"], ok["train/loss"]) == (
      "done", "150/150", "optim.learning_rate=0.003", "sft", finals["00-learning_rate=0.003"])
  assert ok["eval/loss last"] is None and ok["eval/loss best"] is None
  assert bad["state"].startswith("failed") and bad["steps"] == "0/?" and bad["train/loss"] is None
  assert (root / "train_loss.png").stat().st_size > 10_000
  table = io.StringIO()
  sweep.main(["report", "--root", str(root), "--format", "markdown"], out=table)
  assert table.getvalue().splitlines()[0] == ("| run | overrides | algorithm | state | steps | train/loss | "
                                              "eval/loss last | eval/loss best |")


# 2.1B embedding and LM-head parameters, replicated (data parallelism only): ~25 GiB of state per v5e chip
TOO_BIG = ["--", "--config.model.d_model=16384", "--config.model.vocab_size=65536", "--config.mesh.shape.data=-1"]


def test_tpu_launch_refuses_a_config_that_does_not_fit(tmp_path):
  """The planner compiles the run's programs for the accelerator here; a config that does not fit stops before
  any gcloud command (no VM is paid for to learn it)."""
  pytest.importorskip("libtpu", reason="the plan needs libtpu: pip install -e '.[test,tpu]'")
  import contextlib

  argv = ["--name", "too-big", "--zone", "z", "--project", "p", "--accelerator-type", "v5litepod-4",
          "--config", "configs/dpo_hh.py:tiny", "--workdir", str(tmp_path / "run"), "--log-dir", str(tmp_path),
          *TOO_BIG]
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rc = tpu.main(argv)
  text = out.getvalue()
  assert rc == 3, text
  assert "DOES NOT FIT" in text and "does not fit v5litepod-4: not creating anything" in text
  assert "gcloud" not in text


def test_tpu_sweep_refuses_before_creating_the_vm(tmp_path):
  pytest.importorskip("libtpu", reason="the plan needs libtpu: pip install -e '.[test,tpu]'")
  argv = ["--config", "configs/quickstart.py", "--root", str(tmp_path / "sweep"), "--backend", "tpu",
          "--zone", "z", "--project", "p", "--accelerator-type", "v5litepod-4", "--log-dir", str(tmp_path), *TOO_BIG]
  out = io.StringIO()
  assert sweep.main(argv, out=out) == 1
  text = out.getvalue()
  assert "does not fit v5litepod-4: the sweep creates nothing" in text and "gcloud" not in text


def test_dry_run_commands_carry_the_arguments():
  """The lines that matter, written here by hand from the arguments (the golden files are snapshots of the
  code's own output; these are not): the slice created as asked, the run on every worker with the config, the
  workdir and the overrides, the slice deleted; SLURM's nodes, GPUs, preemption signal and requeue."""
  lines = _capture(tpu.main, TPU_ARGS).splitlines()
  assert lines[0] == ("python -m rlhfx.plan --config=configs/dpo_hh.py --topology=v5litepod-16 "
                      "--config.optim.learning_rate=1e-6 --json")
  assert ("gcloud compute tpus tpu-vm create rlhfx-dpo --zone=us-west4-a --project=my-project "
          "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot") in lines
  run = [line for line in lines if "rlhfx.main" in line]
  assert run == ["gcloud compute tpus tpu-vm ssh rlhfx-dpo --zone=us-west4-a --project=my-project --worker=all "
                 "'--command=cd ~/rlhfx && ~/rlhfx-venv/bin/python -m rlhfx.main --config=configs/dpo_hh.py "
                 "--workdir=/gcs/my-bucket/runs/dpo --config.optim.learning_rate=1e-6'"]
  assert lines[-1] == "gcloud compute tpus tpu-vm delete rlhfx-dpo --zone=us-west4-a --project=my-project --quiet"
  script = _capture(slurm.main, SLURM_ARGS).splitlines()
  for line in ("#SBATCH --job-name=dpo-1b", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
               "#SBATCH --gpus-per-node=8", "#SBATCH --time=12:00:00", "#SBATCH --signal=TERM@120", "#SBATCH --requeue",
               "#SBATCH --partition=gpu", "cd /home/me/rlhfx",
               "srun --kill-on-bad-exit=1 python -m rlhfx.main --config=configs/dpo_hh.py --workdir=/shared/runs/dpo "
               "--config.dpo.beta=0.05 || { rc=$?; if [ \"$rc\" -eq 75 ]; then scontrol requeue \"$SLURM_JOB_ID\"; fi; "
               "exit \"$rc\"; }", "sbatch logs/dpo-1b.sbatch"):
    assert line in script, line


@pytest.mark.slow  # about 40 s: one training run, SIGTERM to it mid-way, its resumption
def test_local_sweep_resumes_a_run_stopped_by_sigterm_and_finishes_it(tmp_path):
  """A run SIGTERM stops after a checkpoint exits 75 ("resume me"), is never marked finished, and the local
  sweep reruns it at once: the same invocation ends with every run finished, the stopped one continued."""
  import psutil

  config = tmp_path / "sweep_config.py"
  config.write_text(SWEEP_CONFIG.format(quickstart=str(ROOT / "configs" / "quickstart.py"), steps=150).replace(
      '{"optim.learning_rate": "bad"}, ', ""))
  root = tmp_path / "sweep"
  proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "sweep.py"), "--config", str(config), "--root",
                           str(root)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
  run = root / "01-learning_rate=0.001"
  try:
    deadline = time.time() + 400
    while time.time() < deadline and not _complete_checkpoints(run):
      assert proc.poll() is None, proc.stdout.read()
      time.sleep(0.5)
    assert _complete_checkpoints(run), "the second run never wrote a checkpoint"
    assert not (run / sweep.DONE).exists()
    children = [p for p in psutil.Process(proc.pid).children(recursive=True) if "rlhfx.main" in " ".join(p.cmdline())]
    assert len(children) == 1
    children[0].send_signal(signal.SIGTERM)  # a preemption of the run, not of the sweep
    out, _ = proc.communicate(timeout=400)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  assert proc.returncode == 0, out
  assert "01-learning_rate=0.001: stopped by SIGTERM, resuming (attempt 2)" in out
  assert "00-learning_rate=0.003: finished" in out and "01-learning_rate=0.001: finished" in out
  assert (run / sweep.DONE).exists() and "resumed from step" in (run / "sweep.log").read_text()
  steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
           if "train/loss" in line]
  assert steps[-1] == 150 and steps.count(10) == 1  # continued, not restarted


def test_vms_zero_is_a_usage_error_and_more_vms_than_runs_are_fine(capsys):
  with pytest.raises(SystemExit) as stop:
    sweep.main([*SWEEP_TPU[:6], "--vms", "0", "--zone", "z", "--project", "p", "--dry-run"])
  assert stop.value.code == 2 and "--vms 0: at least 1" in capsys.readouterr().err
  argv = [*SWEEP_TPU[:6], "--vms", "9", "--no-plan", *SWEEP_TPU[8:]]
  text = _capture(sweep.main, argv)
  assert "# --vms 9: 4 runs need only 4" in text
  assert sum(line.startswith("gcloud compute tpus queued-resources create") for line in text.splitlines()) == 4


@pytest.mark.slow  # about 2 minutes: four tiny runs on two fake VMs, one preempted, plus the unbroken reference run
def test_a_tpu_sweep_on_two_fake_vms_survives_a_preemption_and_a_failed_creation(tmp_path, gcs):
  """launch/sweep.py --backend tpu --vms 2 with a fake gcloud on PATH (tests/fake_gcloud/gcloud: every VM a folder
  here, its commands separate processes): VM 0's first creation fails (retried after a backoff), VM 1 is preempted
  at step 15 of its first run. Every run ends done exactly once, the preempted one resumed on a new VM to the
  unbroken run's losses, sweep.json tells the story, a rerun of the command does nothing, and the report reads the
  sweep from the bucket."""
  from rlhfx import metrics, storage

  root = f"gs://{gcs}/sweep-{os.getpid()}"
  state = tmp_path / "gcloud"
  env = {**os.environ, "PATH": f"{ROOT / 'tests' / 'fake_gcloud'}:{os.environ['PATH']}",
         "FAKE_GCLOUD_STATE": str(state), "FAKE_GCLOUD_PYTHON": sys.executable,
         "FAKE_GCLOUD_PREEMPT": "rlhfx-sweep-1:15", "FAKE_GCLOUD_FAIL_CREATE": "rlhfx-sweep-0:1"}
  steps = ["--config.train.num_steps=30", "--config.train.log_every=1", "--config.train.checkpoint_every=10",
           "--config.train.export_hf=False"]
  command = [sys.executable, str(ROOT / "launch" / "sweep.py"), "--config", "configs/quickstart.py", "--root", root,
             "--backend", "tpu", "--vms", "2", "--zone", "us-west4-a", "--project", "p", "--spot", "--no-plan",
             "--create-backoff", "1", "--log-dir", str(tmp_path / "logs"), "--", *steps]
  proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "[rlhfx-sweep-0] creation failed (attempt 1); retrying in 1 s" in proc.stdout
  assert "(its VM was preempted)" in proc.stdout and "done: 4 ok, 0 failed, 0 stopped" in proc.stdout

  record = json.loads(storage.read_text(storage.path(root) / "sweep.json"))
  assert [r["state"] for r in record["runs"]] == ["done"] * 4
  preempted = [r for r in record["runs"] if r["attempts"] == 2]
  assert len(preempted) == 1 and all(r["attempts"] == 1 for r in record["runs"] if r not in preempted)
  story = preempted[0]["history"]
  assert story[:3] == ["running on rlhfx-sweep-1 (attempt 1)", "stopped on rlhfx-sweep-1 (its VM was preempted)",
                       "queued again"] and story[-1] == "done"
  assert record["vms"]["rlhfx-sweep-0"]["create_failures"] == 1
  assert record["vms"]["rlhfx-sweep-1"]["preempted"] == 1 and record["vms"]["rlhfx-sweep-1"]["created"] == 2
  for r in record["runs"]:  # done exactly once: one row per step, and the launcher's mark
    assert [row["step"] for row in metrics.rows(r["workdir"]) if "train/loss" in row] == list(range(1, 31))
    assert storage.path(r["workdir"]).joinpath(sweep.DONE).exists()
  assert not list((state / "vms").iterdir())  # every VM deleted
  resumed = (tmp_path / "logs" / "rlhfx-sweep-1.log").read_text()
  assert "resumed from step 1" in resumed and "Connection to the TPU VM closed" in resumed

  unbroken = tmp_path / "unbroken"
  subprocess.run([sys.executable, "-m", "rlhfx.main", "--config=configs/quickstart.py", f"--workdir={unbroken}",
                  *preempted[0]["overrides"]], cwd=ROOT, check=True, capture_output=True, timeout=300)
  got = {row["step"]: row["train/loss"] for row in metrics.rows(preempted[0]["workdir"]) if "train/loss" in row}
  want = {row["step"]: row["train/loss"] for row in metrics.rows(unbroken) if "train/loss" in row}
  assert got.keys() == want.keys()
  np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=1e-5)

  creations = (state / "calls.log").read_text().count(" create ")
  again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0 and "attempt" not in again.stdout and "done: 4 ok" in again.stdout
  assert (state / "calls.log").read_text().count(" create ") == creations  # nothing left to do: no VM made

  report = subprocess.run([sys.executable, str(ROOT / "launch" / "sweep.py"), "report", "--root", root,
                           "--format", "csv"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  lines = report.stdout.strip().splitlines()
  assert report.returncode == 0 and len(lines) == 5 and lines[0].startswith("run,overrides,algorithm,state,steps")
  assert all(",sft,done,30/30," in line for line in lines[1:]), report.stdout
