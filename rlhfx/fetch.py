"""Fetch what a config names on the Hugging Face hub, and build its dataset, ahead of a run.

  python -m rlhfx.fetch --config=configs/dpo_hh.py:tiny                          # into the Hugging Face cache
  python -m rlhfx.fetch --config=configs/dpo_hh.py:tiny --workdir=/tmp/dpo_hh    # and the run's dataset

Every hub reference of the config is downloaded into the Hugging Face cache (HF_HUB_CACHE, by default
~/.cache/huggingface/hub) and listed with where it lies: data files (hf:// files, hub datasets), the tokenizer,
model.init_from, scoring.model. With --workdir (or the config's data.dir) the dataset is also built where the
run will look for it. For a machine without a network (an offline TPU VM, a cluster node): run this where
there is one, then bring the cache along (copy it, or point HF_HOME at a shared disk) and set HF_HUB_OFFLINE=1.
"""

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from rlhfx import errors, hub, validation
from rlhfx.data import prepare
from rlhfx.data.files import is_hub_dataset
from rlhfx.data.formats import PARSERS
from rlhfx.data.tokenize import load_tokenizer
from rlhfx.errors import run_cli, usage
from rlhfx.models import convert

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py[:variant])",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "also build the dataset where this run directory's run will read it")
flags.mark_flags_as_required(["config"])


def _size(path: Path) -> str:
  files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
  return f"{sum(p.stat().st_size for p in files) / 2**20:.1f} MB"


def references(config) -> list[tuple[str, str]]:
  """(field, value) of every hub reference in a config: hf:// files, hub dataset ids and repository ids."""
  found = [(f"data.train_files[{i}]", str(f)) for i, f in enumerate(config.data.train_files)
           if hub.is_hub_file(f) or is_hub_dataset(str(f))]
  if config.data.tokenizer and (hub.is_hub_file(config.data.tokenizer) or hub.is_repo_id(config.data.tokenizer)):
    found.append(("data.tokenizer", config.data.tokenizer))
  init_from = config.model.init_from.removeprefix("llama2c:")
  if hub.is_hub_file(init_from) or hub.is_repo_id(init_from):
    found.append(("model.init_from", config.model.init_from))
  scorer = config.get("scoring", {}).get("model", "")
  if scorer and hub.is_repo_id(scorer):
    found.append(("scoring.model", scorer))
  return found


def fetch(field: str, value: str) -> Path:
  """The local copy of one reference, downloaded into the Hugging Face cache when missing."""
  import datasets

  value = value.removeprefix("llama2c:")
  if hub.is_hub_file(value):
    return hub.local_file(value)
  if field.startswith("data.train_files"):  # a hub dataset: the datasets library's own cache
    name = value.partition(":")[0]
    try:
      loaded = datasets.load_dataset(name)
      return Path(next(iter(loaded.values())).cache_files[0]["filename"]).parent
    except Exception as e:  # noqa: BLE001 (offline, unknown id: one line)
      raise hub.HubError(f"{value}: the hub dataset could not be loaded ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]})") from None
  if field == "data.tokenizer":
    path = hub.local_repo(value, hub.TOKENIZER_FILES)
    load_tokenizer(path)  # it loads
    return path
  return convert.resolve(value)  # a model: config, tokenizer and weights


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # the dataset build's libraries are chatty at INFO
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  try:
    validation.check(config)
    refs = references(config)
    print(f"fetch: {len(refs)} hub reference(s) in {flags.FLAGS['config'].config_filename}; "
          f"Hugging Face cache: {hub.cache_dir()}", flush=True)
    for field, value in refs:
      path = fetch(field, value)
      print(f"  {field} = {value}\n    -> {path} ({_size(path)})", flush=True)
    if _WORKDIR.value or config.data.dir:
      workdir = Path(_WORKDIR.value or ".").absolute()
      kind = PARSERS[config.data.input_format][0]
      data_dir = prepare.dataset_dir(config, workdir, kind)
      print(f"fetch: the {kind} dataset is ready in {data_dir} ({_size(data_dir)}); runs with "
            + (f"--workdir={_WORKDIR.value}" if not config.data.dir else f"data.dir={config.data.dir}")
            + " use it", flush=True)
    else:
      print("fetch: no --workdir: the dataset is built by the run (or pass --workdir to build it now)", flush=True)
  except errors.USER_ERRORS as e:
    errors.report("rlhfx.fetch", e)


def run():
  run_cli(main, "rlhfx.fetch", usage("rlhfx.fetch", __doc__, ("config", "workdir")))


if __name__ == "__main__":
  sys.exit(run())
