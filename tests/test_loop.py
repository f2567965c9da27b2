"""The shared step loop in-process: NaN stops the run keeping the last good checkpoint; keep-last-N."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhfx import loop, sharding
from rlhfx.algorithms import sft
from rlhfx.checkpoint import Checkpointer
from rlhfx.config import base_config
from rlhfx.metrics import MetricsWriter
from rlhfx.models import Transformer, get_preset
from rlhfx.optim import learning_rate_schedule, make_optimizer


def _batches():
  rng = np.random.default_rng(0)
  while True:
    tokens = rng.integers(3, 256, size=(4, 16)).astype(np.int32)
    yield {"tokens_BxT": tokens, "mask_BxT": np.ones_like(tokens, bool),
           "loss_mask_BxT": np.arange(16)[None].repeat(4, 0) >= 8}


class _Iterator:
  """A data iterator without Grain state (the loop saves no iterator when it is None)."""

  def __init__(self):
    self._it = _batches()

  def __next__(self):
    return next(self._it)


def _setup(tmp_path, num_steps=12, checkpoint_every=5, keep=3):
  config = base_config("sft")
  config.train.num_steps, config.train.checkpoint_every, config.train.log_every = num_steps, checkpoint_every, 1
  config.train.keep_checkpoints = keep
  mesh = sharding.make_mesh({"data": -1})
  runtime = loop.Runtime(mesh=mesh, rules=sharding.DEFAULT_RULES, workdir=tmp_path)
  model_config = get_preset("tiny")
  params = loop.init_params(model_config, runtime, jax.random.key(0))
  optimizer = make_optimizer(config.optim, num_steps, params)
  state = sft.init_state(params, optimizer)
  step = jax.jit(functools.partial(sft.train_step, model=Transformer(model_config), optimizer=optimizer,
                                   schedule=learning_rate_schedule(config.optim, num_steps)))
  return config, runtime, state, step


def _run(config, runtime, state, step_fn, tmp_path, checkpointer):
  writer = MetricsWriter(tmp_path, total_steps=config.train.num_steps)
  try:
    return loop.run(config=config, runtime=runtime, state=state, step_fn=step_fn, train_iter=_Iterator(),
                    checkpointer=checkpointer, writer=writer, tokens_per_step=lambda b: b["tokens_BxT"].size,
                    flops_per_token=1.0, loss_key="train/loss")
  finally:
    writer.close()


class _NoIteratorCheckpointer(Checkpointer):
  def save(self, step, trees, *, metadata=None, data_iterator=None, wait=False):
    super().save(step, trees, metadata=metadata, data_iterator=None, wait=wait)


def test_nan_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
  config, runtime, state, step = _setup(tmp_path)

  def poisoned(state, batch):
    state, metrics = step(state, batch)
    loss = jnp.where(state.step == 7, jnp.nan, metrics["train/loss"])
    return state, {**metrics, "train/loss": loss}

  checkpointer = _NoIteratorCheckpointer(tmp_path / "ckpt")
  with pytest.raises(loop.TrainingDiverged, match=r"step 7: train/loss = \[nan\]; stopping\. "
                                                  r"The last good checkpoint is step 5"):
    _run(config, runtime, state, poisoned, tmp_path, checkpointer)
  assert checkpointer.all_steps() == [5]
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 6  # steps 1..6 were logged, step 7 was not


def test_keeps_the_last_n_checkpoints_and_resumes_from_the_latest(tmp_path):
  config, runtime, state, step = _setup(tmp_path, num_steps=12, checkpoint_every=2, keep=2)
  checkpointer = _NoIteratorCheckpointer(tmp_path / "ckpt", keep=2)
  result = _run(config, runtime, state, step, tmp_path, checkpointer)
  assert int(result.state.step) == 12 and not result.stopped_early
  assert checkpointer.all_steps() == [10, 12]
  restored, start = loop.restore_or_init(checkpointer, state, None)
  assert start == 12
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(result.state.params)):
    np.testing.assert_array_equal(a, b)


def test_pretrained_model_shapes_come_from_the_checkpoint(shared_data):
  """config.model.{vocab_size,n_layers,d_model} may repeat a pretrained model's value but never change it."""
  from rlhfx.config import ConfigError

  config = base_config("sft")
  config.model.init_from = f"llama2c:{shared_data('stories260k/stories260K.bin')}"
  config.model.vocab_size = 512  # the checkpoint's own value: fine
  model_config, params = loop.model_config_from(config)
  assert model_config.n_layers == 5 and params is not None
  config.model.n_layers = 2
  with pytest.raises(ConfigError, match=r"config.model.n_layers=2 differs from the pretrained model's n_layers=5"):
    loop.model_config_from(config)
