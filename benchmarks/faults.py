"""The fault matrix of issue "Nothing lost, nothing silent": each case run through the CLI as a user would, with
what must hold; prints one JSON object per case and a total.

  python benchmarks/faults.py [--only SUBSTRING]    # about 5 minutes on 2 cores

A case holds when the command ends with the expected exit status and output (one line for an error, no
traceback), and when its after-check passes (the files it must leave, the figures it must log).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK = ["--config=configs/quickstart.py", "--config.train.log_every=1", "--config.train.eval_every=0",
         "--config.data.eval_fraction=0", "--config.train.export_hf=False"]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def run(workdir, *args, config=QUICK, wait=True):
  cmd = [sys.executable, "-m", "rlhfx.main", f"--workdir={workdir}", *config, *args]
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)


def one_line_error(proc, code: int, *words: str) -> str | None:
  """None when `proc` exited with `code`, printed no traceback and one `rlhfx:` line containing `words`."""
  lines = [line for line in proc.stderr.splitlines() if line.startswith("rlhfx:")]
  if proc.returncode != code:
    return f"exit {proc.returncode}, expected {code}: {(lines or proc.stderr.splitlines() or [''])[-1][:200]}"
  if "Traceback" in proc.stderr:
    return "a traceback"
  if len(lines) != 1 or not all(w in lines[0] for w in words):
    return f"error lines {lines}, expected one with {words}"
  return None


def metrics(workdir) -> list[dict]:
  return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def largest(directory: pathlib.Path) -> pathlib.Path:
  return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def damaged(kind):
  def case(tmp):
    assert run(tmp, "--config.train.num_steps=4", "--config.train.checkpoint_every=2").returncode == 0
    latest = tmp / "checkpoints" / "4"
    if kind == "xor":
      data = bytearray(largest(latest / "state").read_bytes())
      for i in range(len(data) // 4, len(data) // 4 + 4096):
        data[i % len(data)] ^= 0xFF
      largest(latest / "state").write_bytes(bytes(data))
    elif kind == "truncate":
      os.truncate(largest(latest / "state"), largest(latest / "state").stat().st_size // 2)
    elif kind == "iterator":
      (latest / "data_iterator" / "process_0-of-1.json").unlink()
    else:
      shutil.rmtree(latest / kind)
    proc = run(tmp, "--config.train.num_steps=4", "--config.train.checkpoint_every=2")
    if proc.returncode != 0 or "checkpoint damaged, not used: step 4" not in proc.stdout:
      return f"exit {proc.returncode}: {proc.stdout[-300:]} {proc.stderr[-300:]}"
    return None if "resumed from step 2" in proc.stdout else "did not resume from step 2"
  return case


def sigterm(tmp):
  proc = run(tmp, "--config.train.num_steps=300", "--config.train.checkpoint_every=1000", wait=False)
  while not (tmp / "metrics.jsonl").exists() or len(metrics(tmp)) < 5:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  if proc.returncode != 75:
    return f"exit {proc.returncode}"
  again = run(tmp, "--config.train.num_steps=300", "--config.train.checkpoint_every=1000")
  return None if again.returncode == 0 and "resumed from step" in again.stdout else f"rerun exit {again.returncode}"


def other_data(tmp):
  a, b = tmp / "a.jsonl", tmp / "b.jsonl"
  for path, word in ((a, "x"), (b, "y")):
    path.write_text("".join(json.dumps({"prompt": f"{word}{i}", "completion": f" {i}"}) + "\n" for i in range(300)))
  cfg = ["--config.data.builtin=", "--config.data.input_format=sft", "--config.train.num_steps=2"]
  assert run(tmp / "w", *cfg, f"--config.data.train_files=('{a}',)").returncode == 0
  return one_line_error(run(tmp / "w", *cfg, f"--config.data.train_files=('{b}',)"), 1, "data.train_files",
                        "resume=new_config")


def changed_file(tmp):
  a = tmp / "a.jsonl"
  a.write_text("".join(json.dumps({"prompt": f"x{i}", "completion": f" {i}"}) + "\n" for i in range(300)))
  cfg = ["--config.data.builtin=", "--config.data.input_format=sft", "--config.train.num_steps=2",
         f"--config.data.train_files=('{a}',)"]
  assert run(tmp / "w", *cfg).returncode == 0
  a.write_text(a.read_text() + json.dumps({"prompt": "new", "completion": " one"}) + "\n")
  error = one_line_error(run(tmp / "w", *cfg), 1, "changed", "size")
  accepted = run(tmp / "w", *cfg, "--config.train.resume=new_config")
  return error or (None if accepted.returncode == 0 and "rebuilt" in accepted.stdout else "accepting failed")


def other_config(tmp):
  assert run(tmp, "--config.train.num_steps=2").returncode == 0
  proc = run(tmp, "--config.train.num_steps=2", "--config.optim.learning_rate=0.5", "--config.seed=3")
  return one_line_error(proc, 1, "config.optim.learning_rate", "resume=new_config")


def cadence_only(tmp):
  assert run(tmp, "--config.train.num_steps=2").returncode == 0
  proc = run(tmp, "--config.train.num_steps=2", "--config.train.log_every=5", "--config.train.checkpoint_every=7")
  return None if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr[-300:]}"


def other_model(tmp):
  assert run(tmp, "--config.train.num_steps=2").returncode == 0
  proc = run(tmp, "--config.train.num_steps=2", "--config.model.d_model=96", "--config.train.resume=new_config")
  return one_line_error(proc, 1, "CheckpointError", "another state")


def empty_file(tmp):
  empty = tmp / "empty.jsonl"
  empty.write_text("")
  cfg = ["--config.data.builtin=", "--config.data.input_format=sft", "--config.train.num_steps=2",
         f"--config.data.train_files=('{empty}',)"]
  error = one_line_error(run(tmp / "w", *cfg), 1, "no records")
  empty.write_text("".join(json.dumps({"prompt": f"x{i}", "completion": f" {i}"}) + "\n" for i in range(300)))
  fixed = run(tmp / "w", *cfg, "--config.train.resume=new_config")
  return error or (None if fixed.returncode == 0 else f"after filling the file: exit {fixed.returncode}")


def two_runs(tmp):
  first = run(tmp, "--config.train.num_steps=300", wait=False)
  while not (tmp / "metrics.jsonl").exists():
    time.sleep(0.05)
  second = run(tmp, "--config.train.num_steps=300")
  first.communicate(timeout=600)
  return one_line_error(second, 1, "in use by pid")


def bad_bytes(on_error):
  def case(tmp):
    data = tmp / "bad.jsonl"
    lines = [json.dumps({"prompt": f"x{i}", "completion": f" {i}"}).encode() for i in range(300)]
    lines[7] = b'{"prompt": "\xff\xfe", "completion": " 7"}'
    data.write_bytes(b"\n".join(lines) + b"\n")
    proc = run(tmp / "w", "--config.data.builtin=", "--config.data.input_format=sft", "--config.train.num_steps=2",
               f"--config.data.train_files=('{data}',)", f"--config.data.on_error={on_error}")
    if on_error == "raise":
      return one_line_error(proc, 1, "bad.jsonl:8", "not UTF-8")
    return None if proc.returncode == 0 and "undecodable 1" in proc.stdout else f"exit {proc.returncode}"
  return case


def truncated_gz(on_error):
  def case(tmp):
    data = "".join(json.dumps({"prompt": f"x{i}", "completion": f" {i}"}) + "\n" for i in range(3000)).encode()
    packed = gzip.compress(data)
    (tmp / "t.jsonl.gz").write_bytes(packed[:len(packed) // 2])
    proc = run(tmp / "w", "--config.data.builtin=", "--config.data.input_format=sft", "--config.train.num_steps=2",
               f"--config.data.train_files=('{tmp / 't.jsonl.gz'}',)", f"--config.data.on_error={on_error}")
    if on_error == "raise":
      return one_line_error(proc, 1, "t.jsonl.gz", "truncated", "after line")
    return None if proc.returncode == 0 and "truncated_file 1" in proc.stdout else f"exit {proc.returncode}"
  return case


def overlong_counts(tmp):
  proc = run(tmp, "--config.train.num_steps=2", "--config.data.max_length=22", "--config.data.max_prompt_length=16",
             "--config.data.on_overlong=skip")
  last = metrics(tmp)[-1]
  shown = f"{int(last.get('data/skipped/overlong', 0))} skipped as over-long"
  return None if proc.returncode == 0 and last.get("data/skipped/overlong", 0) > 0 and shown in proc.stdout else (
      f"exit {proc.returncode}; metrics {last}")


def gcs(tmp):
  return one_line_error(run("gs://bucket/x"), 1, "gcsfuse")


def file_workdir(tmp):
  (tmp / "f").write_text("")
  return one_line_error(run(tmp / "f"), 1, "is a file")


def in_tmpfs(size, ro, script):
  mount = f"mount -t tmpfs -o size={size}{',ro' if ro else ''} tmpfs /mnt"
  return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", f"{mount} && {script}"],
                        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def read_only(tmp):
  proc = in_tmpfs("1m", True, f"{sys.executable} -m rlhfx.main --workdir=/mnt/run {' '.join(QUICK)}")
  return one_line_error(proc, 1, "not writable", "Read-only")


def disk_full(tmp):
  proc = in_tmpfs("3m", False, f"{sys.executable} -m rlhfx.main --workdir=/mnt/run {' '.join(QUICK)} "
                  f"--config.train.num_steps=20 --config.train.checkpoint_every=1 --config.train.keep_checkpoints=20 "
                  f"--config.data.dir={tmp}/data; code=$?; ls /mnt/run/checkpoints; exit $code")
  return one_line_error(proc, 1, "No space left on device", "complete checkpoints kept") or (
      "temporary folder left" if "orbax-checkpoint-tmp" in proc.stdout else None)


def small_eval(config):
  def case(tmp):
    if config == "sft":
      args = QUICK + ["--config.data.eval_fraction=0.002", "--config.train.eval_every=2", "--config.train.num_steps=2"]
    else:  # DPO on 50 pairs made here, 5% for eval (< one batch of 16)
      pairs = tmp / "p.jsonl"
      pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f" yes {i}", "rejected": f" no {i}"}) + "\n"
                               for i in range(60)))
      args = ["--config=configs/dpo_hh.py:tiny", "--config.data.input_format=pairs",
              f"--config.data.train_files=('{pairs}',)", "--config.data.eval_fraction=0.1",
              "--config.train.num_steps=2", "--config.train.eval_every=2", "--config.train.export_hf=False"]
    proc = run(tmp, config=args)
    evals = [r for r in metrics(tmp) if "eval/loss" in r] if (tmp / "metrics.jsonl").exists() else []
    return None if proc.returncode == 0 and evals and evals[-1]["eval/loss"] > 0.05 else (
        f"exit {proc.returncode} {proc.stderr[-300:]}; evals {evals}")
  return case


def step_time(tmp):
  proc = run(tmp, "--config.train.num_steps=20", "--config.train.checkpoint_every=5", "--config.train.eval_every=5",
             "--config.data.eval_fraction=0.05")
  rows = [r for r in metrics(tmp) if "perf/step_s" in r]
  fast = [r["step"] for r in rows if r["perf/step_s"] < 1e-4 or r.get("perf/mfu", 0) > 1]
  return None if proc.returncode == 0 and len(rows) == 20 and not fast else f"steps with ~0 s or MFU > 100%: {fast}"


def demo_bos(tmp):
  assert run(tmp, config=["--config=configs/quickstart.py", "--config.train.export_hf=True"]).returncode == 0
  proc = subprocess.run([sys.executable, "-m", "rlhfx.demo", f"--hf={tmp / 'hf'}", "--prompt=reverse: abcd =",
                         "--temperature=0", "--samples=1", "--max_new_tokens=6"], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=300)
  return None if "reverse: abcd = dcba" in proc.stdout else proc.stdout[-300:]


CASES = {
    "SIGTERM: exit 75, the rerun resumes": sigterm,
    "checkpoint: array bytes flipped": damaged("xor"),
    "checkpoint: array file truncated": damaged("truncate"),
    "checkpoint: metadata/ deleted": damaged("metadata"),
    "checkpoint: state/ deleted": damaged("state"),
    "checkpoint: data iterator state deleted": damaged("iterator"),
    "rerun: other data.train_files": other_data,
    "rerun: input file changed (then accepted)": changed_file,
    "rerun: other learning rate and seed": other_config,
    "rerun: cadence fields only": cadence_only,
    "rerun: other model shape (accepted config)": other_model,
    "empty input file (then filled)": empty_file,
    "two runs of one workdir": two_runs,
    "non-UTF-8 line, on_error=raise": bad_bytes("raise"),
    "non-UTF-8 line, on_error=skip": bad_bytes("skip"),
    "truncated .gz, on_error=raise": truncated_gz("raise"),
    "truncated .gz, on_error=skip": truncated_gz("skip"),
    "over-long rows skipped: counts shown": overlong_counts,
    "disk full while saving": disk_full,
    "workdir gs://": gcs,
    "workdir is a file": file_workdir,
    "workdir read-only": read_only,
    "SFT eval split smaller than a batch": small_eval("sft"),
    "DPO eval split smaller than a batch": small_eval("dpo"),
    "perf/step_s at eval and save steps": step_time,
    "demo --prompt with BOS": demo_bos,
}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--only", default="")
  args = parser.parse_args()
  held = 0
  cases = {k: v for k, v in CASES.items() if args.only in k}
  for name, case in cases.items():
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="rlhfx-fault-"))
    t0 = time.time()
    try:
      problem = case(tmp)
    except Exception as e:  # noqa: BLE001 (the matrix reports, it does not stop)
      problem = f"{type(e).__name__}: {e}"
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    held += problem is None
    print(json.dumps({"case": name, "held": problem is None, "problem": problem, "s": round(time.time() - t0, 1)}),
          flush=True)
  print(json.dumps({"cases": len(cases), "held": held, "broke": len(cases) - held}))


if __name__ == "__main__":
  np.set_printoptions(precision=4)
  main()
