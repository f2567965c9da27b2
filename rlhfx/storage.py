"""Where a run's files live: a local directory or a Cloud Storage bucket (gs://), through one path layer.

  path = storage.path("gs://bucket/sweeps/a")  # etils epath (gcsfs) for gs://; an absolute pathlib.Path otherwise
  storage.is_remote(path)                      # gs://...
  storage.check_writable(path)                 # the bucket exists and takes a write: else one StorageError line
  storage.local("gs://bucket/data/x.jsonl")    # an input file or folder: its copy in the local cache
  storage.staging(path)                        # the local folder standing for a remote one (files written first)
  storage.publish(local, path)                 # a local file or folder uploaded, each object replaced whole
  storage.Lease(path / ".lock", lease_s)       # the work directory's lock on object storage

Orbax writes checkpoints straight to gs:// (TensorStore's GCS driver) and small records (config.json,
placement.json) are objects written whole. What object storage cannot do is append: metrics.jsonl,
samples.jsonl and TensorBoard's event files are written to `staging(workdir)` and uploaded whole when the run
flushes its logs (at every logged step, at most every `UPLOAD_EVERY_S`, and at every save and at the end), and
exports (Hugging Face, PEFT, reward-model folders) are written there and then uploaded. Inputs on gs:// are copied
into `cache_root()/inputs` once per object generation. A transient error of the object store is retried with
backoff (`retry`); what is left is one StorageError line.

The emulator: with STORAGE_EMULATOR_HOST set (gcsfs) and TENSORSTORE_GCS_HTTP_URL (TensorStore), everything
above talks to a local GCS API server (the tests start fake-gcs-server).
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path

SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
UPLOAD_EVERY_S = 30.0  # logs uploaded at most this often while a run goes (and always at saves and at the end)
RETRIES = 4  # attempts of an object-store call before its error is reported (backoff 1, 2, 4 s)


class StorageError(RuntimeError):
  """A path on object storage cannot be used: the message names it and the cause."""


def is_remote(path) -> bool:
  return str(path).startswith("gs://")


def path(text: str | os.PathLike):
  """A work directory or output path: epath.Path for gs://, an absolute local Path otherwise."""
  text = os.fspath(text)
  match = SCHEME.match(text)
  if match and match.group(1) != "gs":
    raise StorageError(f"{text}: {match.group(1)}:// is not supported; use gs://BUCKET/... or a local path (a "
                       f"mounted bucket)")
  if match:
    _quiet()
    from etils import epath

    return epath.Path(text.rstrip("/"))
  return Path(text).absolute()


def cache_root() -> Path:
  """Local files standing for remote ones: $RLHFX_CACHE, else ~/.cache/rlhfx."""
  return Path(os.environ.get("RLHFX_CACHE") or Path.home() / ".cache" / "rlhfx")


def _key(remote) -> Path:
  return Path(*str(remote).removeprefix("gs://").split("/"))


def staging(remote) -> Path:
  """The local folder where the files of a remote folder are written before they are uploaded (the folder itself
  when it is local)."""
  if not is_remote(remote):
    return Path(remote)
  local = cache_root() / "staging" / "gs" / _key(remote)
  local.mkdir(parents=True, exist_ok=True)
  return local


def _quiet() -> None:
  # gcsfs asks whether each bucket is a zonal one and warns when it cannot tell: noise on every call
  logging.getLogger("gcsfs").setLevel(logging.CRITICAL)  # its errors reach the caller as exceptions too


def _fs():
  """The gs:// file system: the instance etils epath (and so Orbax's metadata files) uses too, so that one listing
  cache sees every change."""
  _quiet()
  from etils.epath import backend

  return backend.fsspec_backend.fs("gs://")


def _first_line(error: BaseException) -> str:
  return (str(error).strip().splitlines() or [""])[0][:200]


def _cause(error: BaseException) -> str:
  if isinstance(error, FileNotFoundError):
    return "not found"
  if isinstance(error, PermissionError) or re.search(r"\b(401|403)\b|[Pp]ermission|[Ff]orbidden", str(error)):
    return f"permission denied ({_first_line(error)})"
  if type(error).__name__ in ("DefaultCredentialsError", "RefreshError"):
    return ("no credentials (run `gcloud auth application-default login`, or use a VM whose service account may "
            "write the bucket)")
  return f"{type(error).__name__}: {_first_line(error)}"


def retry(what: str, call, *, attempts: int = RETRIES):
  """call() with backoff on the object store's transient errors (not on a missing object or a refusal)."""
  for attempt in range(attempts):
    try:
      return call()
    except (FileNotFoundError, FileExistsError, PermissionError):
      raise
    except Exception as e:  # noqa: BLE001 (aiohttp, gcsfs HttpError, timeouts: the text says which)
      if attempt == attempts - 1 or "permission" in _cause(e) or "credentials" in _cause(e):
        raise StorageError(f"{what} failed after {attempt + 1} attempt(s): {_cause(e)}") from None
      logging.warning("%s: %s; retrying in %d s", what, _cause(e), 2**attempt)
      time.sleep(2**attempt)


def check_writable(remote) -> None:
  """The bucket exists and this process may write below `remote` (a probe object written and removed); else one
  StorageError line. Object storage has no free-space figure: this is what is checked before a run writes."""
  bucket = str(remote).removeprefix("gs://").split("/")[0]
  fs = _fs()
  try:
    retry(f"gs://{bucket}", lambda: fs.call("GET", "b/{}", bucket, json_out=True))
  except FileNotFoundError:
    raise StorageError(f"{remote}: the bucket gs://{bucket} does not exist (create it: gcloud storage buckets "
                       f"create gs://{bucket})") from None
  except StorageError:
    raise
  except Exception as e:  # noqa: BLE001
    raise StorageError(f"{remote}: {_cause(e)}") from None
  probe = f"{str(remote).removeprefix('gs://')}/.write_test"
  try:
    retry(f"writing {remote}", lambda: fs.pipe_file(probe, b""))
    fs.rm_file(probe)
  except StorageError as e:
    raise StorageError(f"{remote} is not writable: {e}") from None
  except Exception as e:  # noqa: BLE001
    raise StorageError(f"{remote} is not writable: {_cause(e)}") from None


def write_text(file, text: str) -> None:
  """A small record written whole: by rename locally, as one object (atomic) on gs://."""
  if is_remote(file):
    retry(f"writing {file}", lambda: file.write_text(text))
    return
  file = Path(file)
  tmp = file.with_suffix(file.suffix + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, file)


def read_text(file) -> str | None:
  """A file's text, None when there is none; on gs:// read as it is now (gcsfs caches listings, sizes included, for
  the life of the process: a file that grew since would be read cut short)."""
  if is_remote(file):
    _fs().invalidate_cache(str(file))
  return file.read_text() if file.exists() else None


def publish(local: Path, remote) -> None:
  """Upload a local file, or every file of a local folder, to `remote` (nothing to do when it is local)."""
  if not is_remote(remote):
    return
  fs, local = _fs(), Path(local)
  files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
  for file in files:
    target = str(remote) if file == local else f"{remote}/{file.relative_to(local).as_posix()}"
    retry(f"uploading {target}", lambda: fs.put_file(str(file), target))


def download(remote, local: Path) -> bool:
  """Copy a remote file to `local` when it exists (True), for a log that goes on appending to it."""
  fs = _fs()
  if not fs.exists(str(remote)):
    return False
  local.parent.mkdir(parents=True, exist_ok=True)
  retry(f"downloading {remote}", lambda: fs.get_file(str(remote), str(local)))
  return True


def local(name: str | os.PathLike) -> Path:
  """An input named by the config: a gs:// file or folder as its copy under `cache_root()/inputs` (fetched when
  missing or when an object's generation changed); any other name as a Path."""
  if not is_remote(name):
    return Path(name)
  fs, text = _fs(), str(name).rstrip("/")
  try:
    objects = retry(f"listing {text}", lambda: fs.find(text, detail=True))
  except StorageError as e:
    raise StorageError(f"{text}: cannot be read: {e}") from None
  if not objects:
    raise StorageError(f"{text}: no such object or folder (bucket {text[5:].split('/')[0]})")
  target = cache_root() / "inputs" / "gs" / _key(text)
  key = text.removeprefix("gs://")
  record = target.parent / f".{target.name}.generations.json"
  seen = json.loads(record.read_text()) if record.exists() else {}
  for name_, info in objects.items():
    rel = name_[len(key):].lstrip("/")
    file = target / rel if rel else target
    generation = str(info.get("generation", ""))
    if seen.get(rel) == generation and file.exists():
      continue
    print(f"storage: downloading gs://{name_} -> {file}", flush=True)
    file.parent.mkdir(parents=True, exist_ok=True)
    retry(f"downloading gs://{name_}", lambda: fs.get_file(name_, str(file)))
    seen[rel] = generation
  record.parent.mkdir(parents=True, exist_ok=True)
  record.write_text(json.dumps(seen))
  return target


def move(source, target) -> None:
  """A folder moved (on gs:// copied object by object, then deleted)."""
  if not is_remote(source):
    import shutil

    shutil.move(str(source), str(target))
    return
  fs, source, target = _fs(), str(source).rstrip("/"), str(target).rstrip("/")
  names = fs.find(source)
  for name in names:  # every object copied first, then the originals deleted: nothing is lost half-way
    to = f"{target}/{name[len(source.removeprefix('gs://')):].lstrip('/')}"
    try:
      fs.copy(name, to)  # server-side (rewrite)
    except Exception:  # noqa: BLE001 (an emulator without rewrite: through this process)
      retry(f"copying gs://{name}", lambda: fs.pipe_file(to, fs.cat_file(name)))
  fs.rm(names)
  fs.invalidate_cache()


def rmtree(folder) -> None:
  if is_remote(folder):
    fs = _fs()
    if fs.exists(str(folder)):
      fs.rm(str(folder), recursive=True)
    return
  import shutil

  shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------- the lock on object storage


class LockHeld(StorageError):
  """The lock object is another live run's (renewed within its lease)."""


class Lease:
  """A lock object on gs:// created only if absent (generation precondition 0), naming host and pid; renewed every
  lease/4 s by a daemon thread, each renewal conditional on the generation it wrote last; deleted at exit. A lock
  not renewed for `lease_s` seconds (its holder was killed) is taken over by a conditional overwrite, with a line
  saying so; a live one never. If another run took the lock from this one (this process stalled past its lease),
  this process stops at once, without saving: two runs must not write one work directory."""

  def __init__(self, remote, lease_s: float):
    self.remote, self.lease_s = str(remote), float(lease_s)
    self.bucket, self.key = self.remote.removeprefix("gs://").split("/", 1)
    self.holder = f"pid {os.getpid()} on {socket.gethostname()}"
    self.generation = None
    self._stop = threading.Event()

  def _put(self, generation) -> str:
    """Write the lock if its generation is `generation` (0: absent); its new generation, FileExistsError if not."""
    fs = _fs()
    meta = json.dumps({"name": self.key})
    body = json.dumps({"holder": self.holder, "lease_s": self.lease_s, "renewed": time.time()}).encode()
    data = (f"--==0==\nContent-Type: application/json; charset=UTF-8\n\n{meta}\n--==0==\n"
            f"Content-Type: application/json\n\n").encode() + body + b"\n--==0==--"
    out = fs.call("POST", f"{fs._location}/upload/storage/v1/b/{self.bucket}/o", uploadType="multipart",
                  headers={"Content-Type": 'multipart/related; boundary="==0=="'}, data=data, json_out=True,
                  ifGenerationMatch=str(generation))
    return str(out["generation"])

  def acquire(self) -> None:
    try:
      self.generation = retry(f"locking {self.remote}", lambda: self._put(0))
    except FileExistsError:
      self._take_over()
    thread = threading.Thread(target=self._renew, name="rlhfx-lease", daemon=True)
    thread.start()
    atexit.register(self.release)

  def _take_over(self) -> None:
    fs = _fs()
    fs.invalidate_cache(self.remote)
    info = fs.info(self.remote)
    try:
      holder = json.loads(fs.cat_file(self.remote)).get("holder", "another run")
    except (ValueError, OSError):
      holder = "another run"
    updated = datetime.datetime.fromisoformat(info["updated"].replace("Z", "+00:00")).timestamp()
    age = time.time() - updated
    if age < self.lease_s:
      raise LockHeld(f"{self.remote.rsplit('/', 1)[0]} is in use by {holder} (its lock renewed {max(age, 0):.0f} s "
                     f"ago; lease {self.lease_s:.0f} s); wait for that run to end or use another workdir")
    try:
      self.generation = self._put(info["generation"])
    except FileExistsError:  # another run took it over first
      raise LockHeld(f"{self.remote.rsplit('/', 1)[0]} is in use: another run took its lock over first") from None
    print(f"workdir: taking over the lock of {holder}, not renewed for {age:.0f} s (lease {self.lease_s:.0f} s): "
          f"that run is gone", flush=True)

  def _renew(self) -> None:
    while not self._stop.wait(self.lease_s / 4):
      try:
        self.generation = self._put(self.generation)
      except FileExistsError:
        print(f"rlhfx: StorageError: {self.remote}: another run took this work directory's lock (this run did not "
              f"renew it within its {self.lease_s:.0f} s lease); stopping without saving", flush=True)
        os._exit(1)
      except Exception as e:  # noqa: BLE001 (a network error: the next renewal tries again)
        logging.warning("renewing %s: %s", self.remote, _cause(e))

  def release(self) -> None:
    self._stop.set()
    if self.generation is None:
      return
    try:
      fs = _fs()
      fs.invalidate_cache(self.remote)
      if str(fs.info(self.remote).get("generation")) == self.generation:
        fs.rm_file(self.remote)
    except Exception as e:  # noqa: BLE001 (the lease runs out by itself)
      logging.warning("releasing %s: %s", self.remote, _cause(e))
    self.generation = None
