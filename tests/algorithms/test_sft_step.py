"""The SFT step: parameters move, loss falls, gradient accumulation k x b == one batch of k*b, freezing."""

import functools

import jax
import numpy as np
import optax

from rlhfx.algorithms import sft
from rlhfx.losses.common import target_mask
from rlhfx.train_state import accumulate_gradients, init_state, microbatches
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
  normalizer = target_mask(batch["loss_mask_BxT"]).sum()
  loss = functools.partial(sft.loss_fn, model=Transformer(model_config), normalizer=normalizer)
  accumulate = jax.jit(accumulate_gradients, static_argnums=(0, 3))
  grads1, sums1 = accumulate(loss, params, batch, 1)
  for k in (2, 4):
    grads, sums = accumulate(loss, params, batch, k)
    np.testing.assert_allclose(sums["loss"], sums1["loss"], rtol=1e-6)
    assert int(sums["tokens"]) == int(sums1["tokens"]) == normalizer
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads1)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max())
  # and through the whole step (loss and gradient norm reported identically)
  for k in (1, 4):
    state, metrics = _step(model_config, optimizer, schedule, k)(init_state(params, optimizer), batch)
    np.testing.assert_allclose(metrics["train/loss"], sums1["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["train/grad_norm"], optax.global_norm(grads1), rtol=1e-5)


def test_steps_lower_the_loss_and_move_parameters():
  model_config, params, optimizer, schedule = _setup(learning_rate=3e-3)
  step = _step(model_config, optimizer, schedule, 1)
  state = init_state(params, optimizer)
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
  state = init_state(params, optimizer)
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
  micro = microbatches(batch, 4)
  assert micro["x"][:, :, 0].tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_lora_sft_and_reward_steps_move_only_adapters_and_the_score_head():
  """config.lora.rank > 0 for SFT and the reward model: the base stays bit-identical, every adapter moves (two
  steps: B starts at 0), and the reward model's score head (outside the adapters) trains."""
  import jax.numpy as jnp

  from rlhfx.algorithms import reward
  from rlhfx.models import lora
  from rlhfx.models.heads import ScoreModel

  config = base_config("sft")
  config.lora.rank, config.lora.patterns = 2, ("attn/(q|v)_proj/kernel",)
  config.optim.warmup_steps = 0
  model_config = get_preset("tiny", vocab_size=259)
  schedule = learning_rate_schedule(config.optim, 10)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 259, size=(4, 16)).astype(np.int32)
  mask = np.ones_like(tokens, bool)
  sft_batch = {"tokens_BxT": tokens, "mask_BxT": mask, "loss_mask_BxT": np.arange(16)[None].repeat(4, 0) >= 8}
  pair_batch = {f"{side}_{k}": v for side in ("chosen", "rejected") for k, v in sft_batch.items()}
  pair_batch["rejected_tokens_BxT"] = tokens[::-1].copy()
  score_model = ScoreModel(model_config)
  score_params = jax.tree.map(lambda x: getattr(x, "value", x), score_model.init(
      jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"], is_leaf=lambda x: hasattr(x, "value"))
  for step_fn, model, base, batch in (
      (sft.train_step, Transformer(model_config), init_params(model_config, jax.random.key(0)), sft_batch),
      (reward.train_step, score_model, score_params, pair_batch)):
    params = lora.wrap(base, config.lora, 1)
    before = jax.tree.map(np.array, params)
    optimizer = make_optimizer(config.optim, 10, params, frozen=lora.frozen(config.lora))
    step = jax.jit(functools.partial(step_fn, model=model, optimizer=optimizer, schedule=schedule,
                                     lora_scale=lora.scale(config.lora)))
    state = init_state(params, optimizer)
    for _ in range(2):
      state, metrics = step(state, batch)
    trunk = lambda tree: {k: v for k, v in tree.items() if k != "score"}  # noqa: E731
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trunk(before["base"])),
                                                    jax.tree.leaves(trunk(state.params["base"]))))
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["lora"]),
                                                        jax.tree.leaves(state.params["lora"])))
    if "score" in base:
      assert not np.array_equal(before["base"]["score"]["kernel"], state.params["base"]["score"]["kernel"])
