"""A run's set-up, the first thing every algorithm's `train()` does.

  runtime, model_config, data = setup.run(config, workdir)

In order: every config field checked (`rlhfx.validation`, before anything is built),
fake devices / processes / mesh (`rlhfx.sharding`), the work directory locked and compared
with the config and input files it was made from (`rlhfx.workdir`), the model's
config (a Hugging Face model's config.json only; weights come later) checked against
the config and the mesh, the dataset built once and opened with its tokenizer
(`rlhfx.data.prepare`).
"""

from __future__ import annotations

from rlhfx import sharding, validation, workdir as workdirs
from rlhfx.data import prepare
from rlhfx.data.formats import PARSERS
from rlhfx.models import load


def run(config, workdir):
  """(runtime, model config, data) of a run; the data's kind (sft, preference, unpaired, prompts) follows
  `config.data.input_format`, which validation has matched to the algorithm."""
  validation.check(config)
  kind = PARSERS[config.data.input_format][0]
  runtime = sharding.setup(config, workdirs.location(workdir))
  workdirs.claim(config, runtime.workdir)  # locked; config and inputs the same as before (or accepted)
  model_config = load.model_config(config, load_params=False)[0]
  validation.check_model(config, model_config, sharding.data_parallel_size(runtime.mesh), runtime.mesh)
  data = prepare.prepare(config, runtime.workdir, kind=kind)
  load.check_tokenizer(model_config, data.tokenizer)
  return runtime, model_config, data
