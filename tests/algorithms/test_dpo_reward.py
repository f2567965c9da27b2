"""DPO and reward steps on a tiny model: reference modes agree, trainable params move, frozen trees don't,
a custom loss trains through the same step, chunked log-probs equal the full ones, LoRA merges and saves."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import sequence_logps, token_logps

from rlhfx.algorithms import dpo, reward
from rlhfx.config import base_config
from rlhfx.logprobs import completion_logps
from rlhfx.losses import preference
from rlhfx.losses.common import target_mask
from rlhfx.models import Transformer, get_preset, init_params, lora
from rlhfx.models.heads import ScoreModel, last_token_index
from rlhfx.optim import learning_rate_schedule, make_optimizer
from rlhfx.train_state import init_state

CONFIG = get_preset("tiny")
MODEL = Transformer(CONFIG)


def _pairs(seed=0, b=4, t=16):
  rng = np.random.default_rng(seed)
  batch = {}
  for side in ("chosen", "rejected"):
    tokens = rng.integers(3, 256, size=(b, t)).astype(np.int32)
    lengths = rng.integers(10, t + 1, size=b)
    mask = np.arange(t)[None] < lengths[:, None]
    batch[f"{side}_tokens_BxT"] = tokens
    batch[f"{side}_mask_BxT"] = mask
    batch[f"{side}_loss_mask_BxT"] = mask & (np.arange(t)[None] >= 5)
  return batch


def _optim(num_steps=10, lr=1e-2):
  cfg = base_config("dpo").optim
  cfg.learning_rate, cfg.warmup_steps, cfg.schedule = lr, 0, "constant"
  return cfg


def test_chunked_logps_equal_full_logits():
  params = init_params(CONFIG, jax.random.key(0))
  batch = _pairs()
  tokens, mask, loss = batch["chosen_tokens_BxT"], batch["chosen_mask_BxT"], batch["chosen_loss_mask_BxT"]
  logits = jax.jit(MODEL.apply)({"params": params}, tokens, mask)
  want = sequence_logps(token_logps(logits, jnp.asarray(tokens)), target_mask(loss))
  logps = jax.jit(completion_logps, static_argnums=0, static_argnames="chunk_size")
  for chunk in (None, 4, 5, 64):
    got, mean_logits, count = logps(MODEL, params, tokens, mask, loss, chunk_size=chunk)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert (np.asarray(count) == target_mask(loss).sum(-1)).all()
  np.testing.assert_allclose(mean_logits, (np.asarray(logits)[:, :-1].mean(-1) * target_mask(loss)[:, 1:]).sum(1)
                             / target_mask(loss).sum(1), rtol=1e-5)

  def grad(c):
    return jax.jit(jax.grad(lambda p: completion_logps(MODEL, p, tokens, mask, loss, chunk_size=c)[0].sum()))(params)

  for a, b in zip(jax.tree.leaves(grad(4)), jax.tree.leaves(grad(None))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_completion_window_logps_equal_full_rows():
  """LM head over a window of W positions per row = over whole rows, when every completion fits in W."""
  params = init_params(CONFIG, jax.random.key(0))
  t, window = 24, 6
  rng = np.random.default_rng(3)
  tokens = rng.integers(3, 256, size=(5, t)).astype(np.int32)
  # (prompt, completion) lengths: short and long prompts, a completion ending the row (start clamped),
  # one of exactly W tokens, a 1-token completion
  spans = [(3, 6), (10, 4), (20, 4), (17, 6), (1, 1)]
  mask = np.stack([np.arange(t) < p + c for p, c in spans])
  loss = np.stack([(np.arange(t) >= p) & (np.arange(t) < p + c) for p, c in spans])
  logps = jax.jit(completion_logps, static_argnums=0, static_argnames=("chunk_size", "window"))
  want, want_mean, want_count = logps(MODEL, params, tokens, mask, loss)
  for chunk in (None, 4):
    got, mean, count = logps(MODEL, params, tokens, mask, loss, chunk_size=chunk, window=window)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-5)
    np.testing.assert_array_equal(count, want_count)

  def grad(w):
    return jax.jit(jax.grad(lambda p: completion_logps(MODEL, p, tokens, mask, loss, window=w)[0].sum()))(params)

  for a, b in zip(jax.tree.leaves(grad(window)), jax.tree.leaves(grad(None))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # a completion longer than the window is NaN, never a partial sum; the other rows are unchanged
  got, _, _ = logps(MODEL, params, tokens, mask, loss, window=3)
  too_long = np.array([c > 3 for _, c in spans])
  assert np.isnan(np.asarray(got)[too_long]).all()
  np.testing.assert_allclose(np.asarray(got)[~too_long], np.asarray(want)[~too_long], rtol=1e-5)


def test_three_reference_modes_give_the_same_loss():
  base = init_params(CONFIG, jax.random.key(0))
  adapters = lora.init(base, patterns=("attn/(q|v)_proj/kernel", "mlp/up_proj/kernel"), rank=4,
                       rng=jax.random.key(1))
  adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), adapters)
  policy = lora.merge(base, adapters, scale=2.0)  # a policy that differs from the reference (= base)
  batch = _pairs()
  loss = functools.partial(preference.dpo_loss, beta=0.5)
  settings = lambda mode: dpo.Settings(model=MODEL, loss=loss, reference=mode, lora_scale=2.0)  # noqa: E731
  objective = lambda p, b, r, mode: dpo.dpo_objective(p, b, r, s=settings(mode))  # noqa: E731
  frozen, m_frozen = objective(policy, batch, base, mode="frozen")
  ref = dpo.reference_logps_step(base, batch, s=settings("frozen"))
  cached = {**batch, "ref_chosen_logps_B": ref["chosen_B"], "ref_rejected_logps_B": ref["rejected_B"]}
  precomputed, _ = objective(policy, cached, None, mode="precomputed")
  lora_base, _ = objective({"base": base, "lora": adapters}, batch, None, mode="lora_base")
  np.testing.assert_allclose(precomputed, frozen, rtol=1e-5)
  np.testing.assert_allclose(lora_base, frozen, rtol=1e-5)
  assert abs(float(frozen) - np.log(2)) > 1e-3  # the policy really differs from the reference
  assert {"rewards/chosen", "rewards/margins", "logits/chosen", "logps/rejected"} <= set(m_frozen)


def test_eval_step_gives_per_example_values_whose_mean_is_the_batch_loss():
  """Held-out DPO metrics are means over examples, so a short last batch's padding rows can be left out."""
  base = init_params(CONFIG, jax.random.key(0))
  policy = jax.tree.map(lambda x: x * 1.05, base)
  batch = _pairs(b=6)
  loss = preference.from_config(base_config("dpo").dpo)  # the registered sigmoid loss
  kwargs = dict(s=dpo.Settings(model=MODEL, loss=loss))
  batch_loss, batch_metrics = dpo.dpo_objective(policy, batch, base, **kwargs)
  per_example = jax.jit(functools.partial(dpo.eval_step, **kwargs))(policy, batch, base)
  assert per_example["loss"].shape == (6,)
  np.testing.assert_allclose(per_example["loss"].mean(), batch_loss, rtol=1e-6)
  # rewards are beta x differences of log-prob sums of ~1e2, whose float32 round-off (~1e-5 each) the jitted and
  # eager programs order differently: 1e-6 absolute on rewards near 0
  for key in ("rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/rejected"):
    np.testing.assert_allclose(per_example[key].mean(), batch_metrics[key], rtol=1e-5, atol=1e-6, err_msg=key)
  first_four = jax.tree.map(lambda x: x[:4], batch)  # leaving rows out changes the mean: rows are separate
  np.testing.assert_allclose(dpo.dpo_objective(policy, first_four, base, **kwargs)[0],
                             per_example["loss"][:4].mean(), rtol=1e-6)


def _dpo_step(params, reference, *, mode, loss, frozen=(), steps=1):
  optimizer = make_optimizer(_optim(), 10, params, frozen=frozen)
  step = jax.jit(functools.partial(dpo.train_step, optimizer=optimizer,
                                   schedule=learning_rate_schedule(_optim(), 10),
                                   s=dpo.Settings(model=MODEL, loss=loss, reference=mode, lora_scale=2.0)))
  state = init_state(params, optimizer)
  for _ in range(steps):
    state, metrics = step(state, _pairs(), reference)
  return state, metrics


def _all_changed(before, after):
  return all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def _all_same(before, after):
  return all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_dpo_step_moves_every_trainable_parameter_and_no_frozen_one():
  """Frozen through the optimizer (config.optim.freeze): the embedding and the final norm stay bit-identical,
  every other parameter moves; the reference, a device argument of the donating jitted step, survives it."""
  params = init_params(CONFIG, jax.random.key(0))
  host = jax.tree.map(np.array, params)
  reference = jax.tree.map(jnp.array, params)
  optimizer = make_optimizer(_optim(), 10, params, frozen=("^embed/", "^final_norm/"))
  step = jax.jit(functools.partial(dpo.train_step, optimizer=optimizer, schedule=learning_rate_schedule(_optim(), 10),
                                   s=dpo.Settings(model=MODEL, loss=preference.LOSSES["sigmoid"](beta=0.1))),
                 donate_argnums=0)
  state, metrics = step(init_state(params, optimizer), _pairs(), reference)
  frozen = {k: v for k, v in state.params.items() if k in ("embed", "final_norm")}
  trained = {k: v for k, v in state.params.items() if k not in ("embed", "final_norm")}
  assert set(frozen) == {"embed", "final_norm"}
  assert _all_same({k: host[k] for k in frozen}, frozen)
  assert _all_changed({k: host[k] for k in trained}, trained)
  # policy == reference at step 0: h = 0 for every pair, so the loss is exactly log 2 up to float32 round-off
  np.testing.assert_allclose(metrics["train/loss"], np.log(2), rtol=1e-6)
  assert not any(x.is_deleted() for x in jax.tree.leaves(reference)) and _all_same(host, reference)


def test_lora_step_moves_only_adapters():
  base = init_params(CONFIG, jax.random.key(0))
  base_copy = jax.tree.map(np.array, base)
  adapters = lora.init(base, patterns=("attn/(q|k|v|o)_proj/kernel",), rank=2, rng=jax.random.key(1))
  # B starts at 0, so A's gradient is 0 on the first step: two steps move both
  state, _ = _dpo_step({"base": base, "lora": adapters}, None, mode="lora_base",
                       loss=functools.partial(preference.dpo_loss, beta=0.1), frozen=("^base/",), steps=2)
  assert _all_same(base_copy, state.params["base"])
  assert _all_changed(adapters, state.params["lora"])
  assert len(state.params["lora"]) == 4 * CONFIG.n_layers


def test_a_custom_loss_trains_through_the_same_step():
  # A new DPO variant, written outside the package: DPO with a margin that grows with the length gap.
  def length_margin_dpo(x: preference.PairLogps, *, beta=0.1, per_token=0.01):
    margin = per_token * (x.chosen_tokens_B - x.rejected_tokens_B)
    logits = beta * (x.chosen_logratios() - x.rejected_logratios()) - margin
    chosen, rejected = beta * x.chosen_logratios(), beta * x.rejected_logratios()
    return -jax.nn.log_sigmoid(logits).mean(), preference.reward_metrics(x, chosen, rejected)

  params = init_params(CONFIG, jax.random.key(0))
  reference = jax.tree.map(jnp.array, params)
  optimizer = make_optimizer(_optim(lr=3e-3), 20, params)
  step = jax.jit(functools.partial(dpo.train_step, optimizer=optimizer,
                                   schedule=learning_rate_schedule(_optim(), 20),
                                   s=dpo.Settings(model=MODEL, loss=length_margin_dpo)))
  state = init_state(params, optimizer)
  losses = []
  for _ in range(15):
    state, metrics = step(state, _pairs(), reference)
    losses.append(float(metrics["train/loss"]))
  assert losses[-1] < losses[0] - 0.1
  assert float(metrics["rewards/accuracies"]) == 1.0


def test_reward_step_moves_every_parameter_and_reads_the_last_token():
  model = ScoreModel(CONFIG)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  params = jax.tree.map(lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value"))
  assert set(params) == {"backbone", "score"} and "lm_head" not in params["backbone"]
  optimizer = make_optimizer(_optim(), 10, params)
  step = jax.jit(functools.partial(reward.train_step, model=model, optimizer=optimizer,
                                   schedule=learning_rate_schedule(_optim(), 10)))
  state, metrics = step(init_state(params, optimizer), _pairs())
  assert _all_changed(params, state.params) and np.isfinite(float(metrics["train/loss"]))
  # the reward is the score at the last real token: padding after it changes nothing
  batch = _pairs()
  tokens, mask = batch["chosen_tokens_BxT"], batch["chosen_mask_BxT"]
  r = model.apply({"params": params}, tokens, mask)
  values = model.apply({"params": params}, tokens, mask, per_token=True)
  np.testing.assert_allclose(r, values[np.arange(4), mask.sum(1) - 1], rtol=1e-6)
  assert (np.asarray(last_token_index(jnp.asarray(mask))) == mask.sum(1) - 1).all()


def test_lora_merge_save_load(tmp_path):
  base = init_params(CONFIG, jax.random.key(0))
  adapters = lora.init(base, patterns=("o_proj/kernel", "up_proj"), rank=3, rng=jax.random.key(1))
  np.testing.assert_array_equal(lora.merge(base, adapters, scale=1.0)["layer_0"]["attn"]["o_proj"]["kernel"],
                                base["layer_0"]["attn"]["o_proj"]["kernel"])  # B = 0: starts at the base
  adapters = jax.tree.map(lambda x: x + 1.0, adapters)
  merged = lora.merge(base, adapters, scale=0.5)
  a, b = adapters["layer_0/attn/o_proj/kernel"]["a"], adapters["layer_0/attn/o_proj/kernel"]["b"]
  kernel = base["layer_0"]["attn"]["o_proj"]["kernel"]
  np.testing.assert_allclose(merged["layer_0"]["attn"]["o_proj"]["kernel"],
                             kernel + 0.5 * (a @ b).reshape(kernel.shape), rtol=1e-6)
  lora.save(adapters, tmp_path, rank=3, alpha=1.5, patterns=("o_proj/kernel",))
  loaded, cfg = lora.load(tmp_path)
  assert cfg == {"rank": 3, "alpha": 1.5, "patterns": ["o_proj/kernel"]} and set(loaded) == set(adapters)
  for path, ab in adapters.items():  # the values round-trip exactly (safetensors stores the float32 bits)
    for k in ("a", "b"):
      np.testing.assert_array_equal(loaded[path][k], np.asarray(ab[k]))
  with pytest.raises(ValueError, match="match no kernel"):
    lora.init(base, patterns=("nothing_here",), rank=2, rng=jax.random.key(0))


def test_sequence_reward_is_the_per_token_value_at_the_last_real_token():
  """The reward reads only the last real token's hidden state; it must equal the per-token head there."""
  import flax.linen as nn

  cfg = get_preset("tiny", vocab_size=64)
  model = ScoreModel(cfg)
  tokens = jax.random.randint(jax.random.key(0), (3, 7), 3, 64)
  mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3, [0] * 2 + [1] * 5], bool)  # full, right- and left-padded
  params = nn.meta.unbox(model.init(jax.random.key(1), tokens, mask)["params"])
  per_token = model.apply({"params": params}, tokens, mask, per_token=True)
  last = np.array([6, 3, 6])  # by hand: full row, right-padded after 4 tokens, left-padded (ends at the row's end)
  assert (np.asarray(last_token_index(mask)) == last).all()
  want = np.asarray(per_token)[np.arange(3), last]
  # the same head on the same hidden state, computed once for one position and once for all: float32 round-off
  np.testing.assert_allclose(model.apply({"params": params}, tokens, mask), want, rtol=1e-5, atol=1e-6)


def _unpaired(seed=0, b=8, t=16):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 256, size=(b, t)).astype(np.int32)
  mask = np.arange(t)[None] < rng.integers(10, t + 1, size=b)[:, None]
  return {"tokens_BxT": tokens, "mask_BxT": mask, "loss_mask_BxT": mask & (np.arange(t)[None] >= 5),
          "label_B": np.arange(b) % 2 == 0}


def test_kto_trains_through_the_dpo_step_on_unpaired_rows():
  params = init_params(CONFIG, jax.random.key(0))
  loss = preference.LOSSES["kto"](beta=0.5, desirable_weight=1.0, undesirable_weight=3.0)
  batch = _unpaired()
  # at step 0 the policy is the reference: r = 0, z0 = 0, each row's loss is w * (1 - sigmoid(0)) = w / 2
  settings = lambda mode: dpo.Settings(model=MODEL, loss=loss, reference=mode, unpaired=True)  # noqa: E731
  objective = lambda p, b, r, mode="frozen": dpo.dpo_objective(p, b, r, s=settings(mode))  # noqa: E731
  value, metrics = objective(params, batch, params)
  np.testing.assert_allclose(value, np.mean(np.where(batch["label_B"], 1.0, 3.0)) / 2, rtol=1e-6)
  # precomputed reference columns give the same objective as the frozen tree
  ref = dpo.reference_logps_step(params, batch, s=settings("frozen"))
  cached = {**batch, "ref_logps_B": ref["logps_B"]}
  np.testing.assert_allclose(objective(params, cached, None, mode="precomputed")[0], value, rtol=1e-6)
  # the step moves the policy and the desirable rows' implicit reward above the undesirable rows'
  optimizer = make_optimizer(_optim(lr=3e-3), 20, params)
  step = jax.jit(functools.partial(dpo.train_step, optimizer=optimizer,
                                   schedule=learning_rate_schedule(_optim(lr=3e-3), 20), s=settings("frozen")))
  state = init_state(params, optimizer)
  for _ in range(10):
    state, metrics = step(state, batch, params)
  assert float(metrics["train/loss"]) < float(value) - 0.05
  assert float(metrics["rewards/chosen"]) > float(metrics["rewards/rejected"])
