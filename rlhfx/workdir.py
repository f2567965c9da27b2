"""A run's work directory: one run at a time, and a record of what it was made from.

  path = workdir.location("--workdir value")     # an absolute local Path, or gs://BUCKET/... (rlhfx.storage)
  workdir.claim(config, path)                      # process 0: lock, compare (set-up)
  workdir.record(config, path)                     # process 0: once the run has started (checkpoint.resume)

`claim` makes the directory (one line if it is a file or not writable), takes an
exclusive lock on <workdir>/.lock for the life of the process (the OS releases it when
the process ends, however it ends; on gs:// a lease renewed while the run lives,
`storage.Lease`: a killed run's is taken over once `train.lock_lease_s` has passed), and
compares the config and the input files with the ones the workdir was made from:

  <workdir>/config.json   the resolved config
  <workdir>/inputs.json   each data file's path, size and SHA-256

A rerun whose config differs in a field that changes the result, or whose input
files changed, stops with one line naming the first difference; `train.resume=
"new_config"` accepts the new config and inputs, except another `algorithm` (a workdir
holds one algorithm's run). Fields that change only cadence or placement (`IGNORED`)
may differ freely. A record that cannot be read (cut short, not JSON) stops the run: it
is what the workdir was made from, and nothing else says so. Nothing is recorded until
the run has started (its state restored or made): a start that fails on its data or
its config leaves the records as they were.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
from pathlib import Path

import jax

from rlhfx import hub, storage

CONFIG, INPUTS, LOCK = "config.json", "inputs.json", ".lock"
# Fields that do not change what a run computes: cadence, placement, process layout, memory knobs.
IGNORED = re.compile(r"^(train\.(log_every|eval_every|eval_batches|checkpoint_every|keep_checkpoints|"
                     r"async_checkpoints|export_hf|log_samples_every|eval_samples|eval_sample_tokens|time_phases|"
                     r"resume|lock_lease_s|on_divergence|divergence_factor|vanished_steps)|data\.read_threads|"
                     r"mesh\..*|rollout\.(mesh|cache_buckets|sampler|slots)|distributed\..*|logging\..*|"
                     r"model\.(remat|lm_head_chunk))$")
# Fields added after runs were made, with the value a saved config without them had.
ADDED = {"init_seed": -1}
# Fields `train.resume=new_config` cannot accept: the checkpoints would hold another kind of run.
FIXED = ("algorithm",)
_held: dict[Path, int] = {}  # workdir -> lock file descriptor, held until the process exits
_hashes: dict[tuple, str] = {}  # (path, size, mtime_ns) -> SHA-256: a file is hashed once per process


class WorkdirError(RuntimeError):
  """The work directory cannot be used as asked; the message says why and what to do."""


def location(workdir: str | os.PathLike):
  """The work directory: an absolute local Path, or an epath.Path on gs:// (other URL schemes are refused)."""
  try:
    return storage.path(workdir)
  except storage.StorageError as e:
    raise WorkdirError(f"--workdir={e}") from None


def claim(config, path: Path) -> None:
  """Make, lock and check `path` for this run (process 0; see the module docstring)."""
  if jax.process_index() != 0:
    return
  if storage.is_remote(path):
    try:
      storage.check_writable(path)  # the bucket exists, credentials, permission: one line before any work
      storage.Lease(path / LOCK, config.train.lock_lease_s).acquire()
    except storage.StorageError as e:
      raise WorkdirError(f"--workdir={e}") from None
  else:
    _make(path)
    _lock(path)
  saved = _read_json(path / CONFIG)
  if saved is None:
    return
  current = json.loads(config.to_json_best_effort())
  fields = differences(saved, current)
  changed = _input_change(_read_json(path / INPUTS), fingerprints(config))
  old, new = {**ADDED, **_flat(saved)}, {**ADDED, **_flat(current)}
  fixed = [k for k in FIXED if k in fields]
  if fixed:
    raise WorkdirError(f"{path} holds a {old.get('algorithm')!r} run (config.{fixed[0]} {old.get(fixed[0])!r} -> "
                       f"{new.get(fixed[0])!r}); its checkpoints are not this run's: use a new --workdir")
  if (fields or changed) and config.train.resume != "new_config":
    first = (f"config.{fields[0]} {old.get(fields[0], '(absent)')!r} -> {new.get(fields[0], '(absent)')!r}"
             if fields else changed)
    raise WorkdirError(f"{path} was made by another run: {first}. Use a new --workdir, or "
                       f"--config.train.resume=new_config to continue this one with the new config and inputs")


def record(config, path: Path) -> None:
  """Write what the workdir was made from (process 0), once the run has started."""
  if jax.process_index() != 0:
    return
  _write(path / CONFIG, json.loads(config.to_json_best_effort()))
  _write(path / INPUTS, fingerprints(config))


def _make(path: Path) -> None:
  if path.is_symlink() and not path.exists():
    raise WorkdirError(f"--workdir={path} is a symbolic link to {os.readlink(path)}, which does not exist")
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
  try:
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise WorkdirError(f"{path / LOCK} cannot be opened as the run's lock file ({e.strerror or e}); remove it "
                       f"if no run of this workdir is alive") from None
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
    if hub.is_hub_file(name) or storage.is_remote(name):  # named as the config names it; its bytes the copy's
      file = hub.local_file(name)
      out.append({"path": str(name), "size": file.stat().st_size, "sha256": _sha256(file)})
      continue
    path = Path(name).absolute()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]  # save_to_disk folders
    for file in files:
      if not file.is_file():
        continue  # the data build names it (a hub dataset id is not fingerprinted)
      out.append({"path": str(file), "size": file.stat().st_size, "sha256": _sha256(file)})
  return out


def _sha256(file: Path) -> str:
  stat = file.stat()
  key = (str(file), stat.st_size, stat.st_mtime_ns)
  if key not in _hashes:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
    _hashes[key] = digest.hexdigest()
  return _hashes[key]


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


def _read_json(file: Path):
  """A record's JSON, None when there is none; one line when it cannot be read (records are written whole, by
  rename: one cut short or not JSON was changed from outside)."""
  if not file.exists():
    return None
  try:
    value = json.loads(file.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise WorkdirError(f"{file} cannot be read ({type(e).__name__}: {str(e)[:80]}): it records what this workdir "
                       f"was made from, so the rerun cannot be checked; restore it, or use a new --workdir") from None
  expected = dict if file.name == CONFIG else list
  if not isinstance(value, expected):
    raise WorkdirError(f"{file} is not a {expected.__name__} of records: restore it, or use a new --workdir")
  return value


def _write(file, value) -> None:
  storage.write_text(file, json.dumps(value, indent=2))
