"""Hub references (`rlhfx.hub`), read through huggingface_hub's cache, and `python -m rlhfx.fetch`.

The session's Hugging Face cache (tests/conftest.py) links to ../shared/data and is offline, as on a machine
that fetched a config's files and then lost its network; an empty cache stands for one that never fetched.
"""

import hashlib
import os
import pathlib
import subprocess
import sys

import pytest

from rlhfx import hub, workdir
from rlhfx.config import GPT2_TOKENIZER, HH_HARMLESS_TEST, load
from rlhfx.data.files import read_records
from rlhfx.data.tokenize import load_tokenizer
from rlhfx.models.llama2c import from_llama2c

ROOT = pathlib.Path(__file__).resolve().parents[1]
HH_CONFIGS = ["sft_hh.py:tiny", "reward_hh.py:tiny", "dpo_hh.py:tiny", "dpo_lora.py:tiny", "kto_hh.py:tiny",
              "ppo_hh.py:tiny"]


def _sha(path) -> str:
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def _cli(module, *args, env=None, timeout=300):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("spec, want", [
    ("hf://datasets/Anthropic/hh-rlhf/harmless-base/test.jsonl.gz",
     hub.HubFile("Anthropic/hh-rlhf", "dataset", None, "harmless-base/test.jsonl.gz")),
    ("hf://karpathy/tinyllamas@v1/stories260K/tok512.bin",
     hub.HubFile("karpathy/tinyllamas", "model", "v1", "stories260K/tok512.bin")),
    ("hf://spaces/org/app/a/b.txt", hub.HubFile("org/app", "space", None, "a/b.txt")),
])
def test_hf_paths_parse_into_repository_revision_and_file(spec, want):
  assert hub.HubFile.parse(spec) == want


@pytest.mark.parametrize("spec", ["hf://org/name", "hf://datasets/org", "hf://org//file"])
def test_an_hf_path_without_a_file_is_one_line_saying_the_form(spec):
  with pytest.raises(hub.HubError, match="expected hf://"):
    hub.HubFile.parse(spec)


def test_the_configs_hub_names_are_the_shared_copies_bytes(shared_data):
  """What the configs name on the hub resolves, offline, to the same bytes as ../shared/data's copies."""
  hh = hub.local_file(HH_HARMLESS_TEST)
  assert _sha(hh) == _sha(shared_data("hh_rlhf/harmless-base-test.jsonl.gz"))
  assert str(hh).startswith(os.environ["HF_HUB_CACHE"])
  records = [r for _, r in read_records(HH_HARMLESS_TEST)]
  assert len(records) == 2312 and set(records[0]) == {"chosen", "rejected"}
  assert load_tokenizer(GPT2_TOKENIZER)("hello world").input_ids == [31373, 995]  # shared/data/README.md
  config, _ = from_llama2c("hf://karpathy/tinyllamas/stories260K/stories260K.bin")
  assert (config.d_model, config.n_layers, config.vocab_size) == (64, 5, 512)
  assert load_tokenizer("hf://karpathy/tinyllamas/stories260K/tok512.bin").convert_ids_to_tokens(3) == "<0x00>"


@pytest.mark.parametrize("name", HH_CONFIGS)
def test_no_config_reads_a_folder_beside_the_checkout(name):
  config = load(f"configs/{name}")
  assert list(config.data.train_files) == [HH_HARMLESS_TEST]
  assert config.data.tokenizer == GPT2_TOKENIZER
  text = (ROOT / "configs" / name.split(":")[0]).read_text()
  assert "shared" not in text and "parents[1].parent" not in text


def test_an_hf_file_is_fingerprinted_by_its_name_and_cached_bytes(shared_data):
  config = load("configs/dpo_hh.py:tiny")
  (print_, ) = workdir.fingerprints(config)
  assert print_["path"] == HH_HARMLESS_TEST
  assert print_["sha256"] == _sha(shared_data("hh_rlhf/harmless-base-test.jsonl.gz"))


def test_offline_and_not_cached_is_one_line_naming_the_file_and_the_fetch_command(tmp_path):
  empty = {"HF_HUB_CACHE": str(tmp_path / "empty-cache")}
  proc = _cli("rlhfx.main", "--config=configs/dpo_hh.py:tiny", f"--workdir={tmp_path / 'run'}", env=empty)
  assert proc.returncode == 1, proc.stderr
  line = proc.stderr.strip()
  assert "\n" not in line and "Traceback" not in line
  assert line.startswith(f"rlhfx: HubError: {HH_HARMLESS_TEST}: not in the Hugging Face cache")
  assert "`python -m rlhfx.fetch --config=configs/dpo_hh.py:tiny`" in line
  assert not (tmp_path / "run" / "data").exists()  # stopped before any build
  fetch = _cli("rlhfx.fetch", "--config=configs/dpo_hh.py:tiny", env=empty)
  assert fetch.returncode == 1 and "run this command where there is a network" in fetch.stderr


def test_fetch_lists_every_reference_and_builds_the_dataset_the_run_then_uses(tmp_path, shared_data):
  run = tmp_path / "run"
  fetch = _cli("rlhfx.fetch", "--config=configs/sft_hh.py:tiny", f"--workdir={run}")
  assert fetch.returncode == 0, fetch.stderr
  assert f"data.train_files[0] = {HH_HARMLESS_TEST}" in fetch.stdout
  assert f"data.tokenizer = {GPT2_TOKENIZER}" in fetch.stdout
  built = [line for line in fetch.stdout.splitlines() if line.startswith("fetch: the sft dataset is ready in")]
  assert len(built) == 1 and str(run / "data") in built[0]
  proc = _cli("rlhfx.main", "--config=configs/sft_hh.py:tiny", f"--workdir={run}", "--config.train.num_steps=2",
              "--config.train.eval_every=0", "--config.train.export_hf=False")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "data: building" not in proc.stdout  # the fetched dataset, checked against its recipe
  assert "data: 2312 records read" in proc.stdout


def test_a_program_without_a_config_names_the_hubs_own_download_command(tmp_path):
  """The demo has no config for rlhfx.fetch: its one line names `hf download` of the missing file."""
  proc = subprocess.run([sys.executable, "-m", "rlhfx.demo", "--llama2c=hf://karpathy/tinyllamas/stories260K/x.bin"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty")})
  assert proc.returncode == 1
  (line,) = proc.stderr.strip().splitlines()
  assert line.startswith("rlhfx-demo: HubError: hf://karpathy/tinyllamas/stories260K/x.bin: not in the Hugging Face")
  assert "fetch it with `hf download karpathy/tinyllamas stories260K/x.bin` where there is a network" in line


@pytest.mark.parametrize("spec, is_id", [
    ("openai-community/gpt2", True), ("Qwen/Qwen2.5-0.5B-Instruct", True), ("meta-llama/Llama-3.1-8B", True),
    ("gpt2", True), ("hf://datasets/Anthropic/hh-rlhf/harmless-base/test.jsonl.gz", False), ("./gpt2", False),
    ("/abs/model", False), ("~/model", False), ("a/b/c", False), ("tok512.bin", False), ("org/train.jsonl.gz", False),
])
def test_a_hub_repository_id_is_told_from_a_path(spec, is_id):
  """One rule for models, tokenizers and datasets: a dot inside a name (Qwen2.5, Llama-3.1) is not a file suffix."""
  assert hub.is_repo_id(spec) is is_id
