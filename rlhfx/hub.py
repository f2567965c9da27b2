"""Files and repositories on the Hugging Face hub, read through its local cache.

A config names a file of a hub repository with huggingface_hub's `hf://` paths,

  hf://datasets/Anthropic/hh-rlhf/harmless-base/test.jsonl.gz       # a dataset repository's file
  hf://karpathy/tinyllamas/stories260K/stories260K.bin               # a model repository's file
  hf://datasets/Anthropic/hh-rlhf@<revision>/harmless-base/test.jsonl.gz

and a whole repository (a tokenizer, a checkpoint) by its id, "openai-community/gpt2". Either is looked up in
the cache first (`HF_HUB_CACHE`, by default ~/.cache/huggingface/hub), without asking the hub, and downloaded
into it otherwise. With no network (or `HF_HUB_OFFLINE=1`) and nothing cached, the error is one line naming
what is missing and the command that fetches a config's files ahead of time (`python -m rlhfx.fetch`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from pathlib import Path

from rlhfx import storage

PREFIX = "hf://"
TOKENIZER_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken")  # a repository's tokenizer (and its config.json)
CHECKPOINT_FILES = ("*.json", "*.safetensors", "*.model", "*.txt")  # config, weights, tokenizer


class HubError(ValueError):
  """A hub file or repository that is neither cached nor downloadable; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class HubFile:
  repo_id: str  # "org/name"
  repo_type: str  # model | dataset | space
  revision: str | None  # a branch, tag or commit; None = main
  filename: str  # the path inside the repository

  @classmethod
  def parse(cls, spec: str) -> HubFile:
    """`hf://[datasets/|spaces/]org/name[@revision]/path/in/repo`."""
    parts = spec.removeprefix(PREFIX).split("/")
    repo_type = "model"
    if parts[0] in ("datasets", "spaces"):
      repo_type, parts = parts[0].removesuffix("s"), parts[1:]
    if len(parts) < 3 or not all(parts):
      raise HubError(f"{spec}: not a hub file; expected hf://[datasets/]<org>/<name>[@<revision>]/<path in the repo>")
    name, _, revision = parts[1].partition("@")
    return cls(f"{parts[0]}/{name}", repo_type, revision or None, "/".join(parts[2:]))


def is_hub_file(spec) -> bool:
  return str(spec).startswith(PREFIX)


# a name ending so is a file the user meant, not a repository ("Qwen/Qwen2.5-0.5B" has a dot and is a repository)
FILE_SUFFIXES = (".json", ".jsonl", ".gz", ".parquet", ".txt", ".bin", ".model", ".safetensors")


def is_repo_id(spec) -> bool:
  """"org/name" or a canonical "name" that is no local path: a hub repository (a model, a tokenizer, a dataset:
  `rlhfx.data.files.is_hub_dataset` is this with an optional ":split")."""
  text = str(spec)
  path = Path(text)
  return (not is_hub_file(text) and "://" not in text and not path.exists() and not path.is_absolute()
          and not text.startswith((".", "~")) and 1 <= len(path.parts) <= 2 and path.suffix not in FILE_SUFFIXES)


def cache_dir() -> str:
  from huggingface_hub import constants

  return str(constants.HF_HUB_CACHE)


def _offline() -> bool:
  from huggingface_hub import constants

  return bool(constants.HF_HUB_OFFLINE)


def fetch_command(what: str = "") -> str:
  """The command that fetches what this program needs: `rlhfx.fetch` with its --config as given, or (a program
  without a config, the demo) the hub's own `hf download` of the file or repository `what`."""
  config = next((a.removeprefix("--config=") for a in sys.argv[1:] if a.startswith("--config=")), None)
  if config is not None or not what:
    return f"python -m rlhfx.fetch --config={config or '<config>'}"
  if not is_hub_file(what):
    return f"hf download {what}"
  f = HubFile.parse(what)
  return (f"hf download {f.repo_id} {f.filename}" + (f" --repo-type {f.repo_type}" if f.repo_type != "model" else "")
          + (f" --revision {f.revision}" if f.revision else ""))


def _unavailable(what: str, cause: str) -> HubError:
  fix = "run this command" if Path(sys.argv[0]).name == "fetch.py" else f"fetch it with `{fetch_command(what)}`"
  return HubError(f"{what}: not in the Hugging Face cache ({cache_dir()}) and {cause}; {fix} where there is a "
                  f"network and bring that cache here (or set HF_HOME to a shared disk)")


@contextlib.contextmanager
def _quiet_retries():
  """huggingface_hub logs each retry of an unreachable hub as a warning: the failure is said once, by us."""
  logger = logging.getLogger("huggingface_hub")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _failure(what: str, error: Exception) -> HubError:
  from huggingface_hub import errors

  if isinstance(error, errors.GatedRepoError):  # a kind of RepositoryNotFoundError: asked first
    return HubError(f"{what}: a gated repository; accept its terms on the hub and log in with `hf auth login`")
  if isinstance(error, errors.RepositoryNotFoundError):
    return HubError(f"{what}: no such repository on the hub, or a private one (log in with `hf auth login`)")
  if isinstance(error, errors.RevisionNotFoundError):
    return HubError(f"{what}: no such revision on the hub")
  if isinstance(error, errors.EntryNotFoundError) and not isinstance(error, errors.LocalEntryNotFoundError):
    return HubError(f"{what}: no such file in the repository")
  if isinstance(error, errors.LocalEntryNotFoundError):
    return _unavailable(what, "the hub could not be reached")
  return _unavailable(what, f"the download failed ({type(error).__name__}: {(str(error).splitlines() or [''])[0]})")


def _download(what: str, fetch, complete=lambda path: True):
  """fetch(local_files_only) from the cache when what it finds is `complete`, else from the hub (saying so),
  else one HubError."""
  from huggingface_hub import errors

  try:
    found = fetch(True)
    if complete(Path(found)):
      return found
  except (errors.LocalEntryNotFoundError, FileNotFoundError):
    pass
  if _offline():
    raise _unavailable(what, "HF_HUB_OFFLINE is set")
  print(f"hub: downloading {what} into {cache_dir()}", flush=True)
  try:
    with _quiet_retries():
      found = fetch(False)
  except (OSError, ValueError, errors.HfHubHTTPError) as e:  # the hub's errors are OSError/ValueError subclasses
    raise _failure(what, e) from None
  if not complete(Path(found)):  # snapshot_download falls back to an incomplete cached snapshot when offline
    raise _unavailable(what, "the hub could not be reached for the files missing from the cached copy")
  return found


def local_file(spec: str | os.PathLike) -> Path:
  """The cached copy of an `hf://` file (downloaded when missing) or of a gs:// object (`storage.local`); any
  other path as it is."""
  if not is_hub_file(spec):
    return storage.local(spec)
  from huggingface_hub import hf_hub_download

  f = HubFile.parse(str(spec))
  return Path(_download(str(spec), lambda cached_only: hf_hub_download(
      f.repo_id, f.filename, repo_type=f.repo_type, revision=f.revision, local_files_only=cached_only)))


def local_repo(repo_id: str, patterns=CHECKPOINT_FILES, required: tuple[str, ...] = ()) -> Path:
  """The cached snapshot of a hub repository's files matching `patterns`, downloaded when missing or when the
  cached one lacks a file matching one of `required` (a tokenizer fetched before, the weights wanted now)."""
  from huggingface_hub import snapshot_download

  return Path(_download(repo_id, lambda cached_only: snapshot_download(
      repo_id, allow_patterns=list(patterns), local_files_only=cached_only),
      complete=lambda path: all(any(path.glob(pattern)) for pattern in required)))
