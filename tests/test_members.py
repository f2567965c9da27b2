"""A sweep in one program (rlhfx.members): which runs can be members, and that each member computes what its run
alone computes.

Tolerance: members run the algorithm's own step under `jax.vmap` (batched matmuls: another summation order than
the run's unbatched ones) and take their learning rate as 1 x the schedule's shape x lr instead of lr x shape
(`optim.scaled`): float32 round-off, a few ulps per step. Over a handful of steps losses agree to 1e-5 relative
and parameters to 1e-5 absolute (they are O(0.1-1)); a wrong number (another member's beta or rate) moves them
by 1e-3 or more.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhfx import members, optim, sharding
from rlhfx.config import ConfigError, base_config, init_seed
from rlhfx.losses import preference
from rlhfx.models import load as model_load
from rlhfx.algorithms import dpo, reward, sft

# ----------------------------------------------------------------------------- which runs can be members


def test_a_sweep_splits_into_programs_by_the_fields_outside_the_numbers():
  dpo_sweep = [{"dpo.beta": b, "dpo.loss": loss} for b in (0.05, 0.1, 0.3) for loss in ("sigmoid", "ipo")]
  assert members.group("dpo", dpo_sweep) == [[0, 2, 4], [1, 3, 5]]  # one program per loss, the betas its members
  lr_x_seed = [{"optim.learning_rate": lr, "init_seed": s} for lr in (1e-3, 3e-3) for s in (0, 1)]
  assert members.group("reward", lr_x_seed) == [[0, 1, 2, 3]]
  assert members.shared_overrides([{"dpo.beta": 0.1, "dpo.loss": "ipo"}]) == {"dpo.loss": "ipo"}


def test_a_sweep_with_no_two_members_is_refused_naming_the_field():
  with pytest.raises(ConfigError, match=r"they differ in model\.n_layers, which changes shapes or code"):
    members.group("sft", [{"model.n_layers": n} for n in (2, 3)])
  with pytest.raises(ConfigError, match=r"config.algorithm='ppo'.*ppo\.kl_coef must be swept as separate runs"):
    members.group("ppo", [{"ppo.kl_coef": k} for k in (0.01, 0.05)])


def test_members_share_everything_but_their_numbers():
  config = base_config("dpo").lock()
  a = members.apply(config, {"dpo.beta": 0.1})
  b = members.apply(config, {"dpo.beta": 0.5, "data.max_length": 128})
  with pytest.raises(ConfigError, match=r"members a and b differ in data\.max_length \(256 vs 128\): members of one "
                                        r"program share everything but their numbers"):
    members.check({"a": a, "b": b})
  members.check({"a": a, "b": members.apply(config, {"dpo.beta": 0.5, "optim.learning_rate": 1e-4})})
  # a random model's reference would differ per init seed: members share one
  with pytest.raises(ConfigError, match=r"members differ in init_seed \(\[0, 1\]\) but model\.init_from is empty"):
    members.check({"a": members.apply(config, {"init_seed": 0}), "b": members.apply(config, {"init_seed": 1})})
  with pytest.raises(ConfigError, match=r"sweep field 'dpo.betta' is not a field of the config"):
    members.apply(config, {"dpo.betta": 0.1})


def _pair_logps(rng, n=6):
  draw = lambda: jnp.asarray(rng.normal(-40, 8, n), jnp.float32)  # noqa: E731
  return preference.PairLogps(chosen_B=draw(), rejected_B=draw(), ref_chosen_B=draw(), ref_rejected_B=draw(),
                              chosen_tokens_B=jnp.asarray(rng.integers(5, 30, n)),
                              rejected_tokens_B=jnp.asarray(rng.integers(5, 30, n)))


@pytest.mark.parametrize("name", sorted(preference.LOSSES))
def test_every_registered_loss_takes_its_numbers_per_member(name):
  """Each member's loss numbers are traced values under vmap: every registered loss computes with them what it
  computes with Python floats (no Python branch on a hyper-parameter)."""
  registered = preference.LOSSES[name]
  rng = np.random.default_rng(0)
  if registered.unpaired:
    x = preference.UnpairedLogps(logps_B=jnp.asarray(rng.normal(-40, 8, 6), jnp.float32),
                                 ref_logps_B=jnp.asarray(rng.normal(-40, 8, 6), jnp.float32),
                                 labels_B=jnp.asarray([True, False] * 3))
  else:
    x = _pair_logps(rng)
  defaults = registered.defaults()
  per_member = [defaults, {k: v * 0.8 if isinstance(v, float) and v else v for k, v in defaults.items()}]
  numbers = {k: jnp.asarray([m[k] for m in per_member], jnp.float32) for k in defaults
             if isinstance(defaults[k], float)}
  together = jax.vmap(lambda h: registered(**{**defaults, **h})(x)[0])(numbers)
  alone = [float(registered(**m)(x)[0]) for m in per_member]
  np.testing.assert_allclose(np.asarray(together), alone, rtol=1e-5, atol=1e-6)
  assert {f"dpo.{k}" for k in numbers} <= members.NUMBERS


def test_the_optimizer_at_rate_one_scaled_is_the_optimizer_at_that_rate():
  cfg = base_config("sft").optim
  cfg.learning_rate, cfg.weight_decay, cfg.warmup_steps, cfg.min_lr_ratio = 3e-3, 0.1, 2, 0.2
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.asarray(rng.normal(size=3))}
  plain = optim.make_optimizer(cfg, 10, params)
  scaled = optim.scaled(optim.make_optimizer(optim.unit_learning_rate(cfg), 10, params), jnp.float32(3e-3))
  s1, s2 = plain.init(params), scaled.init(params)
  assert jax.tree.structure(s1) == jax.tree.structure(s2)  # a member's checkpoint restores as a separate run's
  for _ in range(6):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    u1, s1 = plain.update(grads, s1, params)
    u2, s2 = scaled.update(grads, s2, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), u1, u2)
    params = optax.apply_updates(params, u1)


# ----------------------------------------------------------------------------- one program, each member's run


def _tiny(algorithm: str):
  config = base_config(algorithm)
  config.model.preset, config.model.vocab_size, config.model.max_seq_len = "tiny", 256, 64
  config.train.global_batch_size, config.train.num_steps, config.optim.warmup_steps = 8, 6, 2
  return config


def _batches(algorithm: str, n: int = 3):
  rng = np.random.default_rng(1)
  sides = ("",) if algorithm in ("sft", "kto") else ("chosen_", "rejected_")
  out = []
  for _ in range(n):
    batch = {}
    for side in sides:
      batch[f"{side}tokens_BxT"] = rng.integers(0, 256, (8, 32)).astype(np.int32)
      batch[f"{side}mask_BxT"] = np.ones((8, 32), bool)
      loss_mask = np.zeros((8, 32), bool)
      loss_mask[:, 16 + rng.integers(0, 8):] = True
      batch[f"{side}loss_mask_BxT"] = loss_mask
    if algorithm == "kto":
      batch["label_B"] = np.arange(8) % 2 == 0
    out.append(batch)
  return out


CASES = {
    "sft": ("sft", {}, [{"optim.learning_rate": 1e-3}, {"optim.learning_rate": 4e-3}]),
    "sft_init_seed": ("sft", {}, [{"init_seed": 0}, {"init_seed": 7, "optim.learning_rate": 2e-3}]),
    "reward": ("reward", {}, [{"optim.learning_rate": 2e-3, "reward.center_coef": 0.0},
                              {"optim.learning_rate": 2e-3, "reward.center_coef": 0.5},
                              {"optim.learning_rate": 5e-3, "reward.center_coef": 0.1}]),
    "dpo": ("dpo", {}, [{"dpo.beta": 0.1, "dpo.label_smoothing": 0.0}, {"dpo.beta": 0.5, "dpo.label_smoothing": 0.2},
                        {"dpo.beta": 0.5, "optim.learning_rate": 5e-3}]),
    "kto": ("dpo", {"dpo.loss": "kto", "data.input_format": "unpaired"},
            [{"dpo.beta": 0.1, "dpo.desirable_weight": 1.0}, {"dpo.beta": 0.3, "dpo.desirable_weight": 1.33}]),
    "dpo_lora": ("dpo", {"lora.rank": 4, "dpo.reference": "lora_base", "optim.learning_rate": 1e-2},
                 [{"dpo.beta": 0.1}, {"dpo.beta": 1.0, "optim.learning_rate": 3e-2}]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_member_computes_what_its_run_alone_computes(case):
  algorithm, shared, entries = CASES[case]
  base = members.apply(_tiny(algorithm), shared).lock()
  configs = {f"m{i}": members.apply(base, e) for i, e in enumerate(entries)}
  model_config = model_load.model_config(base, load_params=False)[0]
  mesh = sharding.make_mesh({"data": -1})
  runtime = sharding.Runtime(mesh=mesh, rules=sharding.DEFAULT_RULES, workdir=None)
  module = {"sft": sft, "reward": reward, "dpo": dpo}[algorithm]
  batches = _batches("kto" if case == "kto" else algorithm)
  with sharding.active(mesh, runtime.rules):
    program = members.init(configs, model_config, model_load.Trees(runtime))
    state_M, losses_M = program.state, []
    alive = jnp.ones(len(configs), bool)
    for b in batches:
      state_M, m = program.step(state_M, sharding.global_batch(b, mesh), *program.frozen_args, program.numbers, alive)
      losses_M.append(np.asarray(m["train/loss"]))
    for i, config in enumerate(configs.values()):
      run = module.init(config, model_config, model_load.Trees(runtime, seed=init_seed(config)))
      state, losses = run.state, []
      for b in batches:
        state, m = run.jitted(state, sharding.global_batch(b, mesh), *run.frozen.values())
        losses.append(float(m["train/loss"]))
      np.testing.assert_allclose([x[i] for x in losses_M], losses, rtol=1e-5, err_msg=f"member {i}")
      mine = program.member_state(state_M, i)
      assert jax.tree.structure(mine) == jax.tree.structure(state)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), mine.params, state.params)
  if case == "dpo_lora":  # the LoRA base is held once: no member axis
    base_leaf = state_M.params["base"]["embed"]["embedding"]
    assert base_leaf.shape == (256, 64) and jax.tree.leaves(state_M.params["lora"])[0].shape[0] == 2


def test_a_stopped_member_keeps_its_state_and_the_others_go_on():
  configs = {f"m{i}": members.apply(_tiny("sft").lock(), {"optim.learning_rate": lr}) for i, lr in
             enumerate((1e-3, 4e-3))}
  model_config = model_load.model_config(configs["m0"], load_params=False)[0]
  mesh = sharding.make_mesh({"data": -1})
  runtime = sharding.Runtime(mesh=mesh, rules=sharding.DEFAULT_RULES, workdir=None)
  with sharding.active(mesh, runtime.rules):
    program = members.init(configs, model_config, model_load.Trees(runtime))
    before = program.member_state(program.state, 0)
    moving = program.member_state(program.state, 1)
    state_M = program.state
    for b in _batches("sft", 2):
      state_M, _ = program.step(state_M, sharding.global_batch(b, mesh), program.numbers, jnp.asarray([False, True]))
    after = program.member_state(state_M, 0)
    jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
    assert int(after.step) == 0 and int(program.member_state(state_M, 1).step) == 2
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), program.member_state(
        state_M, 1).params, moving.params))
    assert all(changed)
