"""The fault matrix of issues "Nothing lost, nothing silent" and "Nothing silent, round two": each case run through
the CLI as a user would, with what must hold; prints one JSON object per case and a total.

  python benchmarks/faults.py [--only SUBSTRING]    # about 30 minutes on 2 cores

Round two's cases are grouped by its five classes: 1 a workdir's records checked, 2 every user error one line,
3 user code guarded, 4 a degenerating run says so, 5 a signal at any moment leaves a resumable state.

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
import threading
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


PROGRAMS = ("rlhfx", "rlhfx-demo", "rlhfx-plan", "launch/tpu.py")  # the prefixes of their one-line errors


def one_line_error(proc, code: int, *words: str) -> str | None:
  """None when `proc` exited with `code`, printed no traceback and one error line (`rlhfx: ...`, `rlhfx-demo: ...`,
  ...) containing `words`."""
  lines = [line for line in proc.stderr.splitlines() if line.split(":")[0] in PROGRAMS]
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
  return error or (None if accepted.returncode == 0 and "building" in accepted.stdout else "accepting failed")


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


def other_object_store(tmp):  # gs:// work directories are tests/test_storage.py's (against a GCS emulator)
  return one_line_error(run("s3://bucket/x"), 1, "s3:// is not supported")


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



# ----------------------------------------------------------------------------- round two


ACCEPT = "--config.train.resume=new_config"  # a rerun for more steps


def pairs_file(path: pathlib.Path, n: int = 80) -> pathlib.Path:
  path.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f" yes {i}", "rejected": f" no {i}"}) + "\n"
                          for i in range(n)))
  return path


def sft_file(path: pathlib.Path, n: int = 300, word: str = "x") -> pathlib.Path:
  path.write_text("".join(json.dumps({"prompt": f"{word}{i}", "completion": f" {i}"}) + "\n" for i in range(n)))
  return path


def dpo_args(pairs) -> list[str]:
  return ["--config=configs/dpo_hh.py:tiny", "--config.data.input_format=pairs", "--config.train.export_hf=False",
          f"--config.data.train_files=('{pairs}',)", "--config.data.eval_fraction=0", "--config.train.num_steps=2",
          "--config.train.eval_every=0", "--config.train.eval_samples=0"]


def files_args(path, *extra) -> list[str]:
  return ["--config.data.builtin=", "--config.data.input_format=sft", "--config.train.num_steps=2",
          f"--config.data.train_files=('{path}',)", *extra]


def ok(proc, *words) -> str | None:
  if proc.returncode != 0:
    return f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:200]}"
  missing = [w for w in words if w not in proc.stdout + proc.stderr]
  return f"not said: {missing}" if missing else None


# 1. records


def other_algorithm(tmp):
  assert run(tmp, "--config.train.num_steps=2").returncode == 0
  pairs = pairs_file(tmp.parent / f"{tmp.name}_p.jsonl")
  proc = run(tmp, config=dpo_args(pairs) + ["--config.train.resume=new_config"])
  again = run(tmp, "--config.train.num_steps=2")  # the SFT run's own command still runs (and resumes)
  return one_line_error(proc, 1, "holds a 'sft' run") or ok(again, "resumed from step 2")


def failed_shape_keeps_records(tmp):
  assert run(tmp, "--config.train.num_steps=2").returncode == 0
  bad = run(tmp, "--config.train.num_steps=2", "--config.model.d_model=96", "--config.train.resume=new_config")
  again = run(tmp, "--config.train.num_steps=2")  # the records are the first run's still: its command runs
  return one_line_error(bad, 1, "another state") or ok(again, "resumed from step 2")


def record_cut(name):
  def case(tmp):
    assert run(tmp, "--config.train.num_steps=2").returncode == 0
    text = (tmp / name).read_text()
    (tmp / name).write_text(text[:len(text) // 2])
    return one_line_error(run(tmp, "--config.train.num_steps=2", "--config.optim.learning_rate=0.5"), 1, name,
                          "cannot be read")
  return case


def shared_dir_other_files(tmp):
  a, b = sft_file(tmp / "a.jsonl", 300, "x"), sft_file(tmp / "b.jsonl", 200, "y")
  first = run(tmp / "w1", *files_args(a, f"--config.data.dir={tmp / 'shared'}"))
  second = run(tmp / "w2", *files_args(b, f"--config.data.dir={tmp / 'shared'}"))
  return ok(first) or ok(second, "200 records read")


def shared_dir_other_kind(tmp):
  a = sft_file(tmp / "a.jsonl")
  first = run(tmp / "w1", *files_args(a, f"--config.data.dir={tmp / 'shared'}"))
  second = run(tmp / "w2", config=dpo_args(pairs_file(tmp / "p.jsonl")) + [f"--config.data.dir={tmp / 'shared'}"])
  return ok(first) or ok(second, "80 records read")


def shared_dir_at_once(tmp):
  a = sft_file(tmp / "a.jsonl", 3000)
  procs = [run(tmp / f"w{i}", *files_args(a, f"--config.data.dir={tmp / 'shared'}"), wait=False) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  bad = [f"exit {p.returncode}: {err.strip().splitlines()[-1:]}" for p, (_, err) in zip(procs, outs) if p.returncode]
  return bad[0] if bad else None


def data_damage(kind):
  def case(tmp):
    assert run(tmp, "--config.train.num_steps=2", "--config.data.eval_fraction=0.05").returncode == 0
    files = [p for p in (tmp / "data").rglob("*") if p.is_file()]
    if kind == "truncate":
      target = max((p for p in files if "train.array_record" in p.name), key=lambda p: p.stat().st_size)
      os.truncate(target, target.stat().st_size // 3)
    elif kind == "eval":
      target = next(p for p in files if "eval.array_record" in p.name)
      target.unlink()
    else:
      target = next(p for p in files if p.name == "recipe.json")
      target.write_text("{not json")
    proc = run(tmp, "--config.train.num_steps=3", "--config.data.eval_fraction=0.05", ACCEPT)
    return ok(proc, "rebuilding the dataset from its inputs", "resumed from step 2")
  return case


def bad_record_then_fixed(tmp):
  data = sft_file(tmp / "a.jsonl")
  data.write_text(data.read_text() + "{broken\n")
  first = run(tmp / "w", *files_args(data))
  sft_file(data)
  return one_line_error(first, 1, "a.jsonl:301", "malformed") or ok(run(tmp / "w", *files_args(data)))


def batch_size_then_fixed(tmp):
  cfg = ["--config.mesh.num_cpu_devices=2", "--config.train.num_steps=2"]
  first = run(tmp, *cfg, "--config.train.global_batch_size=3")
  return one_line_error(first, 2, "global_batch_size") or ok(run(tmp, *cfg, "--config.train.global_batch_size=4"))


def renamed_checkpoint(tmp):
  assert run(tmp, "--config.train.num_steps=4", "--config.train.checkpoint_every=2").returncode == 0
  os.rename(tmp / "checkpoints" / "4", tmp / "checkpoints" / "6")
  return ok(run(tmp, "--config.train.num_steps=6", "--config.train.checkpoint_every=2", ACCEPT), "resumed from step 2",
            "checkpoint damaged, not used: step 6")


def lock_is_a_directory(tmp):
  (tmp / ".lock").mkdir()
  return one_line_error(run(tmp), 1, ".lock", "lock file")


def dangling_symlink(tmp):
  (tmp / "w").symlink_to(tmp / "gone")
  return one_line_error(run(tmp / "w"), 1, "symbolic link", "does not exist")


def placement_garbled(tmp):
  assert run(tmp, "--config.train.num_steps=2").returncode == 0
  (tmp / "placement.json").write_text("{garbage")
  return ok(run(tmp, "--config.train.num_steps=3", "--config.train.resume=new_config"), "resumed from step 2")


# 2. one line


def cli(module, *args, env=None):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env or ENV, capture_output=True,
                        text=True, timeout=600)


one_line = one_line_error


def missing_config(tmp):
  return one_line(cli("rlhfx.main", "--config=configs/nope.py", f"--workdir={tmp}"), 2, "no such config file")


def raising_variant(tmp):
  (tmp / "c.py").write_text("def get_config(arg=None):\n  raise ValueError(f'unknown variant {arg!r}')\n")
  return one_line(cli("rlhfx.main", f"--config={tmp / 'c.py'}:huge", f"--workdir={tmp / 'w'}"), 2,
                  "ValueError: unknown variant 'huge'")


def model_dir(tmp, kind) -> pathlib.Path:
  gold, d = ROOT / "tests" / "goldens" / "llama", tmp / kind
  d.mkdir()
  if kind != "no_config":
    (d / "config.json").write_bytes(b'{"model_type": "llama", "hid' if kind == "json" else
                                    (gold / "config.json").read_bytes())
  weights = (gold / "model.safetensors").read_bytes()
  (d / "model.safetensors").write_bytes(weights[:3000] if kind == "cut" else weights)
  return d


HF_CONFIG = ("from rlhfx.config import base_config\n\ndef get_config(arg=None):\n  c = base_config('sft')\n"
             "  c.data.builtin = 'reverse'\n  c.data.tokenizer = 'builtin:bytes'\n  return c\n")


def init_from(kind, words):
  def case(tmp):
    (tmp / "c.py").write_text(HF_CONFIG)
    path = tmp / "gone" if kind == "gone" else model_dir(tmp, kind)
    return one_line(cli("rlhfx.main", f"--config={tmp / 'c.py'}", f"--workdir={tmp / 'w'}",
                        f"--config.model.init_from={path}"), 1, words)
  return case


def demo_hf(kind, words):
  def case(tmp):
    path = tmp / "gone" if kind == "gone" else model_dir(tmp, kind)
    return one_line(cli("rlhfx.demo", f"--hf={path}"), 1, words)
  return case


def tpu(*args, env=None):
  return subprocess.run([sys.executable, "launch/tpu.py", "--name=x", "--zone=z", "--project=p", "--workdir=/w",
                         *args], cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=120)


def tpu_missing_config(tmp):
  return one_line(tpu("--dry-run", "--config=configs/nope.py"), 2, "no such config file")


def tpu_bad_accelerator(tmp):
  return one_line(tpu("--dry-run", "--config=configs/quickstart.py", "--accelerator-type=v9-8"), 2, "v9-8")


def tpu_gcloud_fails(tmp):
  (tmp / "gcloud").write_text("#!/bin/sh\necho 'ERROR: (gcloud) permission denied' >&2\nexit 1\n")
  (tmp / "gcloud").chmod(0o755)
  env = {**ENV, "PATH": f"{tmp}:{ENV['PATH']}"}
  return one_line(tpu("--no-plan", "--config=configs/quickstart.py", f"--log-dir={tmp}", env=env), 1, "failed",
                  "exit status 1")


def plan_missing_config(tmp):
  return one_line(cli("rlhfx.plan", "--config=configs/nope.py", "--topology=v5e-4"), 2, "no such config file")


def plan_bad_topology(tmp):
  return one_line(cli("rlhfx.plan", "--config=configs/quickstart.py", "--topology=v9-8"), 1, "v9-8")


def plan_bad_grid(tmp):
  error = one_line(cli("rlhfx.plan", "--config=configs/quickstart.py", "--topology=v5e:3x3"), 1, "v5e:3x3")
  return error


# 3. user code


USER_CODE = """
import os, time

def raises(completions, **kw):
  return {}["missing"]

def short(completions, **kw):
  return [0.0]

def text(completions, **kw):
  return "good"

def hangs(completions, **kw):
  open(os.environ["HANG_FLAG"], "w").close()
  time.sleep(3600)

def nothing(completions, **kw):
  return [None] * len(completions)
"""


def grpo(tmp, function, *extra, wait=True):
  (tmp / "usercode.py").write_text(USER_CODE)
  env = {**ENV, "PYTHONPATH": f"{tmp}:{ROOT}", "HANG_FLAG": str(tmp / "hanging")}
  cmd = [sys.executable, "-m", "rlhfx.main", f"--workdir={tmp / 'w'}", "--config=configs/grpo_letters.py:tiny",
         f"--config.scoring.functions=('usercode:{function}',)", "--config.train.num_steps=3",
         "--config.train.eval_every=0", "--config.data.eval_fraction=0", "--config.train.export_hf=False", *extra]
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def user_code(function, code, *words):
  def case(tmp):
    proc = grpo(tmp, function, "--config.scoring.timeout_s=5")
    return one_line_error(proc, code, *words) if code else ok(proc, *words)
  return case


def user_code_sigterm(tmp):
  proc = grpo(tmp, "hangs", wait=False)
  deadline = time.time() + 600
  while not (tmp / "hanging").exists() and time.time() < deadline:
    time.sleep(0.2)
  t0 = time.time()
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  if proc.returncode != 75 or time.time() - t0 > 30:
    return f"exit {proc.returncode} after {time.time() - t0:.0f} s: {err.strip().splitlines()[-1:]}"
  return None if "rerun the same command to resume" in out + err else "not said"


# 4. degenerating runs


def diverges(lr, *extra, code=1, words=("TrainingDiverged",)):
  def case(tmp):
    proc = run(tmp, f"--config.optim.learning_rate={lr}", "--config.train.num_steps=40",
               "--config.optim.warmup_steps=1", *extra)
    if "step None" in proc.stderr:
      return "says 'step None'"
    return one_line_error(proc, code, *words) if code else ok(proc, *words)
  return case


# 5. signals


def sigterm_when(marker, *extra, config=QUICK, rerun_words=("resumed",), finished_ok=False):
  """SIGTERM as soon as `marker(tmp, stdout so far)` holds; the run must exit 75 saying so, and a rerun finish."""
  def case(tmp):
    args = list(extra)
    cfg = config
    if cfg is None:  # DPO with a precomputed reference
      cfg = dpo_args(pairs_file(tmp.parent / f"{tmp.name}_p.jsonl", 400)) + ["--config.dpo.reference=precomputed"]
    proc = run(tmp, *args, config=cfg, wait=False)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # stdout as it comes
    reader.start()
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not marker(tmp, "".join(lines)):
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()  # until the run exits (its stdout drains into `lines` meanwhile)
    proc.wait(timeout=300)
    reader.join(timeout=30)
    if "Traceback" in err:
      return f"a traceback: {err.strip().splitlines()[-1][:200]}"
    if proc.returncode == 0 and finished_ok:  # it ended before the signal came: done, nothing to resume
      return None
    if proc.returncode != 75 or "rerun the same command to resume" not in "".join(lines) + err:
      return f"exit {proc.returncode}: {(err.strip().splitlines() or [''])[-1][:200]}"
    again = run(tmp, *args, config=cfg)
    return ok(again, *rerun_words)
  return case


def one_row_per_step(tmp):
  proc = run(tmp, "--config.train.num_steps=40", "--config.train.checkpoint_every=5", wait=False)
  while not (tmp / "metrics.jsonl").exists() or len(metrics(tmp)) < 12:
    time.sleep(0.05)
  proc.kill()  # SIGKILL after step 12: steps 11-12 logged, not saved
  proc.communicate()
  assert run(tmp, "--config.train.num_steps=40", "--config.train.checkpoint_every=5").returncode == 0
  steps = [r["step"] for r in metrics(tmp) if "train/loss" in r]
  return None if steps == list(range(1, 41)) else f"steps logged: {steps}"


SWEEP_CONFIG = """from rlhfx.config import load


def get_config(arg=None):
  c = load({quickstart!r})
  c.train.num_steps, c.train.checkpoint_every, c.train.export_hf = {steps}, 1000, False
  c.train.eval_every, c.data.eval_fraction = 0, 0.0
  return c


def sweep():
  return [{{"seed": s}} for s in range({runs})]
"""


def sweep_config(tmp, steps, runs) -> pathlib.Path:
  path = tmp / "s.py"
  path.write_text(SWEEP_CONFIG.format(quickstart=str(ROOT / "configs" / "quickstart.py"), steps=steps, runs=runs))
  return path


def alive(tmp) -> list[str]:
  found = subprocess.run(["pgrep", "-f", "--", f"--workdir={tmp / 'runs'}"], capture_output=True, text=True)
  return found.stdout.split()


def wait_for_a_run(tmp):
  deadline = time.time() + 600
  while time.time() < deadline and not list((tmp / "runs").rglob("metrics.jsonl")):
    time.sleep(0.2)
  time.sleep(2)


def sweep_stopped(tmp):
  cmd = [sys.executable, "launch/sweep.py", f"--config={sweep_config(tmp, 200, 2)}", f"--root={tmp / 'runs'}"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  wait_for_a_run(tmp)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  if proc.returncode != 75 or alive(tmp):
    return f"sweep exit {proc.returncode}, runs alive {alive(tmp)}: {out.strip().splitlines()[-2:]}"
  again = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
  return None if again.returncode == 0 and "resuming" in again.stdout else f"rerun: {again.stdout[-300:]}"


def sweep_killed(tmp):
  cmd = [sys.executable, "launch/sweep.py", f"--config={sweep_config(tmp, 400, 1)}", f"--root={tmp / 'runs'}"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  wait_for_a_run(tmp)
  proc.kill()
  proc.wait()
  for _ in range(120):  # the run got SIGTERM with its parent's death: it saves and stops
    if not alive(tmp):
      return None
    time.sleep(0.5)
  return "the run is still alive 60 s after its sweep was killed"


def first_eval_started(tmp, seen):
  return "step " not in seen and (tmp / "checkpoints").exists()


def reference_pass(tmp, seen):
  return "mesh:" in seen and (tmp / "data").exists() and any((tmp / "data").rglob("recipe.json"))


ROUND_TWO = {
    "1 rerun with another algorithm (new_config): refused, the SFT run continues": other_algorithm,
    "1 rerun with another shape (new_config): refused, records kept": failed_shape_keeps_records,
    "1 config.json cut short": record_cut("config.json"),
    "1 inputs.json cut short": record_cut("inputs.json"),
    "1 shared data.dir, other input files": shared_dir_other_files,
    "1 shared data.dir, other data kind": shared_dir_other_kind,
    "1 shared data.dir, two builds at once": shared_dir_at_once,
    "1 built train split cut short": data_damage("truncate"),
    "1 built eval split deleted": data_damage("eval"),
    "1 dataset recipe.json garbled": data_damage("recipe"),
    "1 bad record, then fixed: the same command runs": bad_record_then_fixed,
    "1 batch size refused, then fixed: the same workdir runs": batch_size_then_fixed,
    "1 checkpoint folder renamed": renamed_checkpoint,
    "1 .lock is a directory": lock_is_a_directory,
    "1 workdir a dangling symlink": dangling_symlink,
    "1 placement.json garbled": placement_garbled,
    "2 config file missing": missing_config,
    "2 config variant raises": raising_variant,
    "2 init_from: config.json not JSON": init_from("json", "not valid JSON"),
    "2 init_from: folder missing": init_from("gone", "no such directory"),
    "2 init_from: no config.json": init_from("no_config", "config.json: missing"),
    "2 demo --hf: folder missing": demo_hf("gone", "no such directory"),
    "2 demo --hf: safetensors cut short": demo_hf("cut", "not a readable safetensors file"),
    "2 demo --hf: no config.json": demo_hf("no_config", "config.json: missing"),
    "2 demo --hf: no tokenizer": demo_hf("weights", "no usable tokenizer"),
    "2 demo --hf: config.json not JSON": demo_hf("json", "not valid JSON"),
    "2 launch/tpu.py --dry-run: config missing": tpu_missing_config,
    "2 launch/tpu.py --dry-run: accelerator v9-8": tpu_bad_accelerator,
    "2 launch/tpu.py: a gcloud step fails": tpu_gcloud_fails,
    "2 planner: config missing": plan_missing_config,
    "2 planner: topology v9-8": plan_bad_topology,
    "2 planner: a grid the compiler does not know": plan_bad_grid,
    "3 reward function raises": user_code("raises", 1, "reward function raises raised KeyError"),
    "3 reward function returns one score for many": user_code("short", 1, "returned 1 scores for"),
    "3 reward function returns a string": user_code("text", 1, "returned str 'good'"),
    "3 reward function hangs: scoring.timeout_s": user_code("hangs", 1, "did not return within"),
    "3 reward function hangs: SIGTERM stops the run": user_code_sigterm,
    "3 reward function scores nothing: said aloud": user_code("nothing", 0, "scored none of a batch"),
    "4 learning rate 1e3: stops": diverges("1e3"),
    "4 learning rate 1e30: stops without 'step None'": diverges("1e30"),
    "4 learning rate 1e3, on_divergence=warn: goes on, said": diverges(
        "1e3", "--config.train.on_divergence=warn", code=0,
        words=("WARNING: training degenerates", "WARNING: the run degenerated")),
    "5 SIGTERM while the dataset is built": sigterm_when(lambda tmp, seen: "data: building" in seen, rerun_words=()),
    "5 SIGTERM while compiling / the first evaluation": sigterm_when(
        first_eval_started, "--config.train.eval_every=5", "--config.data.eval_fraction=0.05", rerun_words=()),
    "5 SIGTERM during the final export": sigterm_when(lambda tmp, seen: (tmp / "hf").exists(),
                                                      "--config.train.num_steps=3", "--config.train.export_hf=True",
                                                      finished_ok=True),
    "5 SIGTERM during DPO's reference pass": sigterm_when(reference_pass, config=None, rerun_words=()),
    "5 SIGKILL then resume: metrics.jsonl one row per step": one_row_per_step,
    "5 sweep stopped: its run stops, the rerun resumes": sweep_stopped,
    "5 sweep killed: its run stops too": sweep_killed,
}


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
    "workdir s3://": other_object_store,
    "workdir is a file": file_workdir,
    "workdir read-only": read_only,
    "SFT eval split smaller than a batch": small_eval("sft"),
    "DPO eval split smaller than a batch": small_eval("dpo"),
    "perf/step_s at eval and save steps": step_time,
    "demo --prompt with BOS": demo_bos,
    **ROUND_TWO,
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
