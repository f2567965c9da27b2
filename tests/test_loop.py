"""A train loop in-process: NaN stops the run keeping the last good checkpoint; keep-last-N and resume."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhfx import checkpoint, sharding
from rlhfx.algorithms import sft
from rlhfx.checkpoint import Checkpointer
from rlhfx.config import base_config, load as load_config
from rlhfx.metrics import TrainingDiverged
from rlhfx.models import Transformer, get_preset, load
from rlhfx.optim import make_optimizer
from rlhfx.train_state import create_state, init_state

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _quickstart(num_steps: int, checkpoint_every: int):
  config = load_config(ROOT / "configs" / "quickstart.py").unlock()
  config.train.num_steps, config.train.checkpoint_every, config.train.log_every = num_steps, checkpoint_every, 1
  config.data.eval_fraction, config.train.export_hf, config.train.global_batch_size = 0.0, False, 8
  return config


def test_nan_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  config = _quickstart(num_steps=12, checkpoint_every=5)
  real = sft.jit_train_step

  def poisoned(*args):
    step = real(*args)

    def run(state, batch):
      state, metrics = step(state, batch)
      return state, {**metrics, "train/loss": jnp.where(state.step == 7, jnp.nan, metrics["train/loss"])}

    return run

  monkeypatch.setattr(sft, "jit_train_step", poisoned)
  with pytest.raises(TrainingDiverged, match=r"step 7: train/loss = \[nan\]; stopping\. "
                                             r"The last good checkpoint is step 5"):
    sft.train(config, tmp_path)
  assert Checkpointer(tmp_path / "checkpoints").all_steps() == [5]
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 6  # steps 1..6 were logged, step 7 was not


def test_keeps_the_last_n_checkpoints_and_resumes_from_the_latest(tmp_path):
  config = base_config("sft")
  config.train.keep_checkpoints, config.train.checkpoint_every, config.train.num_steps = 2, 2, 12
  mesh = sharding.make_mesh({"data": -1})
  runtime = sharding.Runtime(mesh=mesh, rules=sharding.DEFAULT_RULES, workdir=tmp_path)

  def fresh_state():
    params = load.sharded_params(Transformer(get_preset("tiny")), runtime, jax.random.key(0))
    optimizer = make_optimizer(config.optim, 12, params)
    return create_state(functools.partial(init_state, optimizer=optimizer), params, mesh)[0]

  state = fresh_state()
  with Checkpointer(tmp_path / "checkpoints", keep=2) as checkpointer:
    for step in range(1, 13):
      state = state.replace(step=state.step + 1, params=jax.tree.map(lambda x: x + 1, state.params))
      if checkpoint.due(step, config.train, preempted=False):
        checkpointer.save(step, {"state": state})
  restored_by, restored, start = checkpoint.resume(config, tmp_path, fresh_state(), None)
  restored_by.close()
  assert start == 12 and restored_by.all_steps() == [10, 12]
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  assert (tmp_path / "placement.json").exists()


def test_pretrained_model_shapes_come_from_the_checkpoint(shared_data):
  """config.model.{vocab_size,n_layers,d_model} may repeat a pretrained model's value but never change it."""
  from rlhfx.config import ConfigError

  config = base_config("sft")
  config.model.init_from = f"llama2c:{shared_data('stories260k/stories260K.bin')}"
  config.model.vocab_size = 512  # the checkpoint's own value: fine
  model_config, params = load.model_config(config)
  assert model_config.n_layers == 5 and params is not None
  config.model.n_layers = 2
  with pytest.raises(ConfigError, match=r"config.model.n_layers=2 differs from the pretrained model's n_layers=5"):
    load.model_config(config)
