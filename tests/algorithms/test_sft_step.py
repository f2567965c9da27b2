"""The SFT step: parameters move, loss falls, gradient accumulation k x b == one batch of k*b, freezing."""

import functools

import jax
import numpy as np
import optax

from rlhfx.algorithms import sft
from rlhfx.config import base_config
from rlhfx.models import Transformer, get_preset, init_params
from rlhfx.optim import learning_rate_schedule, make_optimizer, param_labels


def _batch(seed=0, batch=8, length=12, vocab=256):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, size=(batch, length)).astype(np.int32)
  lengths = rng.integers(6, length + 1, size=batch)
  mask = np.arange(length)[None] < lengths[:, None]
  loss_mask = mask & (np.arange(length)[None] >= 4)
  return {"tokens_BxT": tokens, "mask_BxT": mask, "loss_mask_BxT": loss_mask}


def _setup(**optim):
  config = base_config("sft")
  config.optim.warmup_steps = 0
  config.optim.schedule = "constant"
  config.optim.update(optim)
  model_config = get_preset("tiny")
  params = init_params(model_config, jax.random.key(0))
  optimizer = make_optimizer(config.optim, 10, params)
  schedule = learning_rate_schedule(config.optim, 10)
  return model_config, params, optimizer, schedule


def _step(model_config, optimizer, schedule, k):
  return jax.jit(functools.partial(sft.train_step, model=Transformer(model_config), optimizer=optimizer,
                                   schedule=schedule, grad_accum_steps=k))


def test_gradient_accumulation_equals_one_big_batch():
  model_config, params, optimizer, schedule = _setup()
  batch = _batch()
  normalizer = sft.target_mask(batch["loss_mask_BxT"]).sum()
  loss = functools.partial(sft.loss_fn, model=Transformer(model_config), normalizer=normalizer)
  accumulate = jax.jit(sft.accumulate_gradients, static_argnums=(0, 3))
  grads1, sums1 = accumulate(loss, params, batch, 1)
  for k in (2, 4):
    grads, sums = accumulate(loss, params, batch, k)
    np.testing.assert_allclose(sums["loss"], sums1["loss"], rtol=1e-6)
    assert int(sums["tokens"]) == int(sums1["tokens"]) == normalizer
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads1)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max())
  # and through the whole step (loss and gradient norm reported identically)
  for k in (1, 4):
    state, metrics = _step(model_config, optimizer, schedule, k)(sft.init_state(params, optimizer), batch)
    np.testing.assert_allclose(metrics["train/loss"], sums1["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["train/grad_norm"], optax.global_norm(grads1), rtol=1e-5)


def test_steps_lower_the_loss_and_move_parameters():
  model_config, params, optimizer, schedule = _setup(learning_rate=3e-3)
  step = _step(model_config, optimizer, schedule, 1)
  state = sft.init_state(params, optimizer)
  batch = _batch()
  losses = []
  for _ in range(10):
    state, metrics = step(state, batch)
    losses.append(float(metrics["train/loss"]))
  assert losses[-1] < losses[0] - 0.5
  assert int(state.step) == 10
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params))]
  assert all(moved)
  assert np.isclose(float(metrics["train/lr"]), 3e-3)


def test_frozen_parameters_do_not_move():
  model_config, params, optimizer, schedule = _setup(freeze=("embed/", "layer_0/attn"))
  labels = param_labels(params, ("embed/", "layer_0/attn"))
  state = sft.init_state(params, optimizer)
  state, _ = _step(model_config, optimizer, schedule, 1)(state, _batch())
  frozen = jax.tree.map(lambda label, a, b: (label == "frozen", bool(np.array_equal(a, b))), labels, params,
                        state.params)
  pairs = jax.tree.leaves(frozen, is_leaf=lambda x: isinstance(x, tuple))
  assert any(f for f, _ in pairs) and any(not f for f, _ in pairs)
  assert all(same == is_frozen for is_frozen, same in pairs)


def test_schedule_warmup_then_cosine():
  config = base_config("sft").optim
  config.learning_rate, config.warmup_steps, config.min_lr_ratio = 1.0, 10, 0.1
  schedule = learning_rate_schedule(config, 110)
  assert float(schedule(0)) == 0.0 and np.isclose(float(schedule(5)), 0.5)
  assert np.isclose(float(schedule(10)), 1.0) and np.isclose(float(schedule(110)), 0.1)
  assert np.isclose(float(schedule(60)), 0.1 + 0.9 * 0.5, atol=1e-6)


def test_microbatches_interleave_rows():
  batch = {"x": np.arange(8)[:, None]}
  micro = sft.microbatches(batch, 4)
  assert micro["x"][:, :, 0].tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
