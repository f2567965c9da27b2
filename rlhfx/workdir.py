"""A run's work directory: one run at a time, and a record of what it was made from.

  path = workdir.location("--workdir value")     # an absolute local Path; gs:// and the like refused
  workdir.claim(config, path)                      # process 0: lock, compare, record

`claim` makes the directory (one line if it is a file or not writable), takes an
exclusive lock on <workdir>/.lock for the life of the process (the OS releases it when
the process ends, however it ends), and compares the config and the input files with
the ones the workdir was made from:

  <workdir>/config.json   the resolved config
  <workdir>/inputs.json   each data file's path, size and SHA-256

A rerun whose config differs in a field that changes the result, or whose input
files changed, stops with one line naming the first difference; `train.resume=
"new_config"` accepts the new config and inputs (and rebuilds the workdir's own
dataset when the data changed). Fields that change only cadence or placement
(`IGNORED`) may differ freely.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import jax

CONFIG, INPUTS, LOCK = "config.json", "inputs.json", ".lock"
# Fields that do not change what a run computes: cadence, placement, process layout, memory knobs.
IGNORED = re.compile(r"^(train\.(log_every|eval_every|eval_batches|checkpoint_every|keep_checkpoints|"
                     r"async_checkpoints|export_hf|log_samples_every|eval_samples|eval_sample_tokens|time_phases|resume)|data\.read_threads|"
                     r"mesh\..*|rollout\.(mesh|cache_buckets|sampler|slots)|distributed\..*|logging\..*|"
                     r"model\.(remat|lm_head_chunk))$")
# Fields the built dataset (<workdir>/data) depends on: a change rebuilds it.
BUILD_FIELDS = ("data.builtin", "data.train_files", "data.input_format", "data.eval_fraction", "data.on_error", "seed")
_held: dict[Path, int] = {}  # workdir -> lock file descriptor, held until the process exits


class WorkdirError(RuntimeError):
  """The work directory cannot be used as asked; the message says why and what to do."""


def location(workdir: str | os.PathLike) -> Path:
  """The work directory as an absolute local path; URLs (gs://, s3://) are refused with what to do instead."""
  text = os.fspath(workdir)
  if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text):
    raise WorkdirError(f"--workdir={text}: object-store URLs are not supported; mount the bucket with gcsfuse "
                       f"(launch/tpu.py mounts gs://BUCKET at /gcs/BUCKET) and pass the mounted path")
  return Path(text).absolute()


def claim(config, path: Path) -> None:
  """Make, lock and check `path` for this run (process 0; see the module docstring)."""
  if jax.process_index() != 0:
    return
  _make(path)
  _lock(path)
  saved = _read_json(path / CONFIG)
  current = json.loads(config.to_json_best_effort())
  inputs = fingerprints(config)
  accept = config.train.resume == "new_config"
  if saved is not None:
    fields = differences(saved, current)
    changed = _input_change(_read_json(path / INPUTS), inputs)
    if (fields or changed) and not accept:
      old, new = _flat(saved), _flat(current)
      first = (f"config.{fields[0]} {old.get(fields[0], '(absent)')!r} -> {new.get(fields[0], '(absent)')!r}"
               if fields else changed)
      raise WorkdirError(f"{path} was made by another run: {first}. Use a new --workdir, or "
                         f"--config.train.resume=new_config to continue this one with the new config and inputs")
    if changed or set(fields) & set(BUILD_FIELDS):
      _forget_dataset(config, path)
  _write(path / CONFIG, current)
  _write(path / INPUTS, inputs)


def _make(path: Path) -> None:
  if path.exists() and not path.is_dir():
    raise WorkdirError(f"--workdir={path} is a file, not a directory")
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / ".write_test"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise WorkdirError(f"--workdir={path} is not writable: {e.strerror or e}") from None


def _lock(path: Path) -> None:
  """An exclusive, non-blocking lock on <path>/.lock (re-entrant within one process)."""
  if path in _held:
    return
  fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
    os.close(fd)
    raise WorkdirError(f"--workdir={path} is in use by {holder}; wait for that run to end or use another "
                       f"workdir") from None
  except OSError as e:  # a file system without locks (some network mounts): run, unprotected
    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
      raise
    logging.warning("%s: file locks unsupported (%s); nothing stops a second run of this workdir", path, e)
  os.ftruncate(fd, 0)
  os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode())
  _held[path] = fd


def fingerprints(config) -> list[dict]:
  """[{path, size, sha256}] of the config's data files (none for a built-in task, which the config defines)."""
  if config.data.builtin:
    return []
  out = []
  for name in config.data.train_files:
    path = Path(name).absolute()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]  # save_to_disk folders
    for file in files:
      if not file.is_file():
        continue  # the data build names it (a hub dataset id is not fingerprinted)
      digest = hashlib.sha256()
      with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          digest.update(chunk)
      out.append({"path": str(file), "size": file.stat().st_size, "sha256": digest.hexdigest()})
  return out


def _flat(tree, prefix: str = "") -> dict:
  if isinstance(tree, dict):
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
  return {prefix[:-1]: tree}


def differences(saved: dict, current: dict) -> list[str]:
  """The result-changing fields (dotted, sorted) whose values differ between two configs' JSON."""
  old, new = _flat(saved), _flat(current)
  return [k for k in sorted(set(old) | set(new)) if not IGNORED.match(k) and old.get(k) != new.get(k)]


def _input_change(saved: list | None, current: list[dict]) -> str | None:
  if saved is None:
    return None
  before = {f["path"]: f for f in saved}
  for f in current:
    was = before.get(f["path"])
    if was is None:
      continue  # a new path is a config difference (data.train_files)
    if was["size"] != f["size"]:
      return f"data file {f['path']} changed (size {was['size']} -> {f['size']} bytes)"
    if was["sha256"] != f["sha256"]:
      return f"data file {f['path']} changed (same size, different SHA-256)"
  return None


def _forget_dataset(config, path: Path) -> None:
  """Remove the dataset this workdir built (it is rebuilt from the new inputs); a shared data.dir is left alone."""
  if config.data.dir:
    logging.warning("the inputs changed but data.dir=%s is shared; remove it yourself to rebuild", config.data.dir)
    return
  data = path / "data"
  for info in data.glob("*/*/dataset_info.json"):
    shutil.rmtree(info.parent.parent)
    print(f"inputs changed: removed the built dataset {info.parent.parent}; it is rebuilt", flush=True)


def _read_json(file: Path):
  try:
    return json.loads(file.read_text()) if file.exists() else None
  except json.JSONDecodeError:
    return None  # a torn write: nothing to compare against


def _write(file: Path, value) -> None:
  tmp = file.with_suffix(".tmp")
  tmp.write_text(json.dumps(value, indent=2))
  os.replace(tmp, file)
