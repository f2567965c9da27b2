"""gs:// work directories end to end, against a real GCS API server (fake-gcs-server, started by the `gcs` fixture):
the quickstart on a bucket gives the local run's losses and resumes after SIGTERM to them, its export loads back
from gs://, a second run of a live workdir stops, a killed run's lock is taken over after its lease, a damaged
checkpoint object falls back as on local disk, and a bucket that does not exist is one line before any work.
"""

import os
import pathlib
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from rlhfx import metrics, storage

from conftest import run_processes

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK = ["--config=configs/quickstart.py", "--config.train.num_steps=40", "--config.train.log_every=1",
         "--config.train.checkpoint_every=20", "--config.train.eval_every=20"]


def _run(workdir, *overrides, sigterm_at=None, check=True, timeout=300):
  program = ["-m", "rlhfx.main"] if sigterm_at is None else [str(ROOT / "tests" / "preempted_run.py"), str(sigterm_at)]
  proc = subprocess.run([sys.executable, *program, *QUICK, f"--workdir={workdir}", *overrides], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != (0 if sigterm_at is None else 75):
    raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc


def _losses(workdir) -> dict[int, float]:
  return {r["step"]: r["train/loss"] for r in metrics.rows(workdir) if "train/loss" in r}


def _objects(prefix: str) -> set[str]:
  """The object names below gs://<prefix>/, relative to it."""
  fs = storage._fs()
  fs.invalidate_cache()
  return {name[len(prefix) + 1:] for name in fs.find(prefix)}


def _workdir(bucket: str, name: str) -> str:
  return f"gs://{bucket}/{name}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("local")
  _run(workdir)
  return workdir


@pytest.mark.slow
def test_quickstart_on_gcs_resumes_after_sigterm_to_the_local_runs_losses_and_its_export_loads_back(gcs, local_run):
  workdir = _workdir(gcs, "quickstart")
  _run(workdir, sigterm_at=25)
  objects = _objects(workdir[5:])
  assert "checkpoints/25/commit_success.txt" in objects and ".lock" not in objects  # saved at SIGTERM; lock released
  proc = _run(workdir)
  assert f"resumed from step 25 ({workdir}/checkpoints)" in proc.stdout
  got, want = _losses(workdir), _losses(local_run)
  assert sorted(got) == sorted(want) == list(range(1, 41))
  np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=1e-5)
  objects = _objects(workdir[5:])
  for name in ("config.json", "inputs.json", "placement.json", "metrics.jsonl", "hf/model.safetensors",
               "hf/config.json", "checkpoints/40/commit_success.txt"):
    assert name in objects, (name, sorted(objects))
  assert any(name.startswith("tensorboard/events.out.tfevents") for name in objects)
  # the export, read back from the bucket at learning rate 0: its first evaluation is the exporter's last
  evaluated = _workdir(gcs, "from-export")
  _run(evaluated, f"--config.model.init_from={workdir}/hf", "--config.optim.learning_rate=0",
       "--config.train.num_steps=1", "--config.train.export_hf=False")
  last = [r["eval/loss"] for r in metrics.rows(workdir) if "eval/loss" in r][-1]
  first = [r["eval/loss"] for r in metrics.rows(evaluated) if r["step"] == 0 and "eval/loss" in r]
  np.testing.assert_allclose(first, [last], rtol=1e-6)


@pytest.mark.slow
def test_a_live_runs_workdir_is_refused_and_a_killed_runs_lock_is_taken_over_after_its_lease(gcs):
  workdir, lease = _workdir(gcs, "locked"), 15
  common = [f"--config.train.lock_lease_s={lease}", "--config.train.num_steps=100000",
            "--config.train.log_every=50", "--config.train.eval_every=0", "--config.train.export_hf=False"]
  first = subprocess.Popen([sys.executable, "-m", "rlhfx.main", *QUICK, f"--workdir={workdir}", *common],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 240
    while "checkpoints/20/commit_success.txt" not in _objects(workdir[5:]):
      assert first.poll() is None and time.time() < deadline, "the first run saved no checkpoint"
      time.sleep(1)
    second = _run(workdir, *common, check=False)
    assert second.returncode == 1, second.stderr[-2000:]
    assert f"is in use by pid {first.pid} on" in second.stderr and "lease 15 s" in second.stderr
  finally:
    first.kill()  # SIGKILL: no release, the lock stays until its lease runs out
    first.wait()
  killed = time.time()
  assert ".lock" in _objects(workdir[5:])
  time.sleep(max(0.0, killed + lease + 1 - time.time()))
  third = _run(workdir, *common[:1], "--config.train.num_steps=30", "--config.train.log_every=10",
               "--config.train.eval_every=0", "--config.train.export_hf=False", "--config.train.resume=new_config")
  assert f"workdir: taking over the lock of pid {first.pid} on" in third.stdout
  assert "that run is gone" in third.stdout and "resumed from step" in third.stdout
  assert ".lock" not in _objects(workdir[5:])


@pytest.mark.slow
def test_a_damaged_checkpoint_object_falls_back_to_the_one_before(gcs):
  workdir = _workdir(gcs, "damaged")
  _run(workdir, "--config.train.export_hf=False")
  prefix = f"{workdir[5:]}/checkpoints/40/state"
  fs = storage._fs()
  data = max((name for name in _objects(prefix) if "/d/" in f"/{name}"), key=lambda n: fs.size(f"{prefix}/{n}"))
  size = fs.size(f"{prefix}/{data}")
  fs.pipe_file(f"{prefix}/{data}", np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
  proc = _run(workdir, "--config.train.export_hf=False", "--config.train.num_steps=50",
              "--config.train.resume=new_config")
  assert "checkpoint damaged, not used: step 40" in proc.stdout
  assert "resumed from step 20" in proc.stdout
  objects = _objects(workdir[5:])
  assert any(name.startswith("rejected_checkpoints/40/") for name in objects)  # kept aside, never used
  assert "checkpoints/50/commit_success.txt" in objects


@pytest.mark.parametrize("workdir, message", [
    ("gs://no-such-bucket-rlhfx/run", "--workdir=gs://no-such-bucket-rlhfx/run: the bucket gs://no-such-bucket-rlhfx "
                                      "does not exist (create it: gcloud storage buckets create "
                                      "gs://no-such-bucket-rlhfx)"),
    ("s3://bucket/run", "--workdir=s3://bucket/run: s3:// is not supported; use gs://BUCKET/... or a local path"),
])
def test_a_bad_gs_workdir_is_one_line_before_any_work(gcs, workdir, message):
  proc = _run(workdir, check=False, timeout=120)
  assert proc.returncode == 1, proc.stderr[-2000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith("rlhfx:")]
  assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
  assert "data:" not in proc.stdout  # stopped before the data was built


def test_the_lock_object_names_its_holder_and_is_taken_over_only_after_its_lease(gcs, capsys):
  lock = f"gs://{gcs}/lease-{uuid.uuid4().hex[:6]}/.lock"
  first = storage.Lease(lock, lease_s=4)
  first.acquire()
  second = storage.Lease(lock, lease_s=4)
  second.holder = "pid 2 on another-host"
  with pytest.raises(storage.LockHeld, match=rf"in use by pid {os.getpid()} on .* \(its lock renewed \d s ago"):
    second.acquire()
  time.sleep(6)  # longer than the lease, renewed meanwhile (every lease/4): still the first's
  with pytest.raises(storage.LockHeld):
    second.acquire()
  first._stop.set()  # the first holder dies without releasing
  time.sleep(5)
  second.acquire()
  assert f"taking over the lock of pid {os.getpid()} on" in capsys.readouterr().out
  second.release()
  first.generation = None  # its process would have been gone; nothing left to release
  assert not storage._fs().exists(lock)


def test_an_input_on_gcs_is_copied_once_per_generation(gcs, capsys):
  remote = f"gs://{gcs}/inputs-{uuid.uuid4().hex[:6]}"
  fs = storage._fs()
  fs.pipe_file(f"{remote[5:]}/a.txt", b"one")
  fs.pipe_file(f"{remote[5:]}/sub/b.txt", b"two")
  local = storage.local(remote)
  assert (local / "a.txt").read_text() == "one" and (local / "sub" / "b.txt").read_text() == "two"
  assert capsys.readouterr().out.count("storage: downloading") == 2
  assert storage.local(remote) == local and "downloading" not in capsys.readouterr().out  # unchanged: no fetch
  fs.pipe_file(f"{remote[5:]}/a.txt", b"three")
  assert (storage.local(remote) / "a.txt").read_text() == "three"
  assert capsys.readouterr().out.count("storage: downloading") == 1
  assert storage.local(f"{remote}/sub/b.txt").read_text() == "two"  # a single object
  with pytest.raises(storage.StorageError, match="no such object or folder"):
    storage.local(f"{remote}/missing")


def test_object_store_errors_are_retried_with_backoff_then_one_line(monkeypatch):
  waits, calls = [], []
  monkeypatch.setattr(storage.time, "sleep", waits.append)

  def flaky():
    calls.append(1)
    if len(calls) < 3:
      raise ConnectionResetError("Connection reset by peer")
    return "saved"

  assert storage.retry("writing gs://b/x", flaky) == "saved" and waits == [1, 2]

  def down():
    raise TimeoutError("timed out")

  with pytest.raises(storage.StorageError, match=r"^writing gs://b/x failed after 4 attempt\(s\): TimeoutError: timed "
                                                 r"out$"):
    storage.retry("writing gs://b/x", down)
  with pytest.raises(FileNotFoundError):  # a missing object is no transient error: not retried
    storage.retry("reading gs://b/y", lambda: (_ for _ in ()).throw(FileNotFoundError("gs://b/y")))


def test_a_config_naming_a_gcs_data_file_is_fingerprinted_by_its_name_and_bytes(gcs):
  import hashlib

  from rlhfx import workdir
  from rlhfx.config import base_config

  name = f"gs://{gcs}/data-{uuid.uuid4().hex[:6]}/pairs.jsonl"
  storage._fs().pipe_file(name[5:], b'{"chosen": "a", "rejected": "b"}\n')
  config = base_config("dpo")
  config.data.train_files = (name,)
  [record] = workdir.fingerprints(config)
  assert record == {"path": name, "size": 33,
                    "sha256": hashlib.sha256(b'{"chosen": "a", "rejected": "b"}\n').hexdigest()}


@pytest.mark.slow
def test_two_processes_write_one_gcs_workdir_with_one_process_losses(gcs, local_run):
  """As the hosts of a TPU slice do: two processes on loopback (gloo), one gs:// workdir; process 0 holds the lock and
  writes the logs, both write their shards of each checkpoint. The held-out split's last batch (193 examples in
  batches of 64) has one row: the evaluation over two processes still sees every example once."""
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  workdir = _workdir(gcs, "two-processes")
  common = [sys.executable, "-m", "rlhfx.main", *QUICK, f"--workdir={workdir}",
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2",
            "--config.mesh.num_cpu_devices=2", "--config.mesh.shape.data=2", "--config.mesh.shape.fsdp=2"]
  run_processes([common + [f"--config.distributed.process_id={i}"] for i in range(2)], ROOT, timeout=400)
  got, want = _losses(workdir), _losses(local_run)
  assert sorted(got) == sorted(want) == list(range(1, 41))
  np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=1e-5)
  evals = [{r["step"]: r["eval/loss"] for r in metrics.rows(w) if "eval/loss" in r} for w in (workdir, local_run)]
  assert sorted(evals[0]) == sorted(evals[1]) == [0, 20, 40]
  np.testing.assert_allclose([evals[0][s] for s in evals[1]], list(evals[1].values()), rtol=1e-6)
  objects = _objects(f"{workdir[5:]}/checkpoints/40/state")
  for process in (0, 1):  # each process wrote its shards
    assert any(name.startswith(f"ocdbt.process_{process}/") for name in objects), sorted(objects)
