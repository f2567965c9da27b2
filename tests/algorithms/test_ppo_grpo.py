"""One PPO / GRPO iteration as a pure function on a tiny model: what changes, what must not, and the scores."""

import functools
import string

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhfx import rewards, rollout
from rlhfx.algorithms import grpo, ppo
from rlhfx.data.synthetic import byte_tokenizer
from rlhfx.models import Transformer, get_preset, init_params
from rlhfx.models.heads import ScoreModel, from_lm_params
from rlhfx.sampling import pad_prompts

CFG = get_preset("tiny", vocab_size=259)
EOS = 2


def _prompts():
  tok = byte_tokenizer()
  ids = [[1] + tok.encode(p) for p in ("reverse: abc =", "reverse: hello =", "say:", "reverse: xyz =")]
  tokens, mask = pad_prompts(ids, pad_id=0)
  return {"prompt_BxP": jnp.asarray(tokens), "prompt_mask_BxP": jnp.asarray(mask)}


def _score_params(seed):
  params = ScoreModel(CFG).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]
  return jax.tree.map(np.asarray, nn.meta.unbox(params))


def _sampling(group_size=1):
  return rollout.SamplingSettings(CFG, max_new_tokens=8, group_size=group_size, temperature=1.0, eos_id=EOS,
                                   pad_id=0)


def _copy(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _changed(a, b) -> bool:
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _all_changed(a, b) -> bool:
  return all(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def ppo_setup():
  policy = init_params(CFG, jax.random.key(0))
  reward = _score_params(1)
  scorer = rollout.Scorer(module=ScoreModel(CFG), mean=0.3, std=2.0)
  params = {"policy": policy, "value": from_lm_params(_copy(policy), {"kernel": np.zeros((CFG.d_model, 1),
                                                                                          np.float32)})}
  optimizer = optax.adam(1e-3)
  s = ppo.Settings(model=Transformer(CFG), critic=ScoreModel(CFG), scorer=scorer, sampling=_sampling(),
                   optimizer=optimizer, epochs=2, minibatches=2)
  state = ppo.PPOState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                       kl_coef=jnp.float32(0.05))
  frozen = {"reference": _copy(policy), "reward": reward}
  step = jax.jit(functools.partial(ppo.iteration, s=s))
  before = _copy(state.params), _copy(frozen)
  new_state, metrics, r, scores_B = step(state, _prompts(), frozen)
  return dict(s=s, before=before, frozen=frozen, state=new_state, metrics=jax.device_get(metrics), rollout=r,
              scores=scores_B, reward=reward, step=step)


def test_ppo_iteration_updates_policy_and_critic_only(ppo_setup):
  (params0, frozen0), state = ppo_setup["before"], ppo_setup["state"]
  assert int(state.step) == 1
  assert _changed(params0["policy"], state.params["policy"])
  assert _changed(params0["value"], state.params["value"])
  assert _changed(params0["value"]["score"], state.params["value"]["score"])  # the critic's head learns
  # the frozen trees are bit-identical after the iteration
  assert not _changed(frozen0["reference"], ppo_setup["frozen"]["reference"])
  assert not _changed(frozen0["reward"], ppo_setup["frozen"]["reward"])


def test_ppo_kl_is_exactly_zero_before_the_first_update(ppo_setup):
  m = ppo_setup["metrics"]
  assert m["objective/kl"] == 0.0 and m["objective/non_score_reward"] == 0.0
  assert m["objective/rlhf_reward"] == pytest.approx(m["objective/scores"], abs=1e-6)
  for name in ("policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
               "val/clipfrac_avg", "objective/entropy"):
    assert np.isfinite(m[name]), name
  # the second iteration starts from an updated policy: its KL to the reference is no longer 0
  state, metrics, _, _ = ppo_setup["step"](ppo_setup["state"], _prompts(), ppo_setup["frozen"])
  assert float(metrics["objective/kl"]) != 0.0


def test_ppo_scores_are_the_normalised_reward_model_scores(ppo_setup):
  r = ppo_setup["rollout"]
  raw = ScoreModel(CFG).apply({"params": ppo_setup["reward"]}, r.sequence_BxT, r.sequence_mask_BxT)
  np.testing.assert_allclose(ppo_setup["scores"], (raw - 0.3) / 2.0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ppo_setup["metrics"]["objective/scores"], np.mean((raw - 0.3) / 2.0), rtol=1e-5)


def test_rollout_logps_match_a_forward_pass(ppo_setup):
  """The sampler's log-probs equal log softmax of a full forward pass at the sampled tokens."""
  r, s = ppo_setup["rollout"], ppo_setup["s"]
  params0 = ppo_setup["before"][0]
  logps, _, _ = rollout.completion_stats(s.model, params0["policy"], r, temperature=1.0)
  np.testing.assert_allclose(np.where(r.mask_BxC, logps, 0), r.sample_logps_BxC, atol=2e-5)


def test_missing_eos_penalty_and_stop_token():
  tokens = jnp.array([[5, 6, EOS, 0], [5, 6, 7, 8]])
  mask = jnp.array([[True, True, True, False], [True, True, True, True]])
  r = rollout.Rollout(prompt_BxP=jnp.ones((2, 1), jnp.int32), prompt_mask_BxP=jnp.ones((2, 1), bool),
                       tokens_BxC=tokens, mask_BxC=mask, sample_logps_BxC=jnp.zeros((2, 4)))
  scores, has_eos = rollout.finish_scores(jnp.array([1.0, 1.0]), r, EOS, 0.5)
  np.testing.assert_array_equal(has_eos, [True, False])
  np.testing.assert_allclose(scores, [1.0, 0.5])


def test_value_head_on_the_policy():
  policy = init_params(CFG, jax.random.key(0))
  params = {"policy": policy, "value_head": ppo.init_value_head(CFG.d_model)}
  optimizer = optax.adam(1e-3)
  # a set that a random byte model hits often: with every score 0 and KL 0 at the first iteration, every
  # return is 0 and a zero value head gets no gradient ("abc" alone left 32 sampled tokens scoreless by chance)
  chars = string.ascii_letters + string.digits
  fn = rewards.character_fraction(chars, byte_tokenizer())
  s = ppo.Settings(model=Transformer(CFG), critic=None, scorer=rollout.Scorer(fn=fn), sampling=_sampling(),
                   optimizer=optimizer, epochs=1, minibatches=1)
  state = ppo.PPOState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                       kl_coef=jnp.float32(0.05))
  new, metrics, r, scores = jax.jit(functools.partial(ppo.iteration, s=s))(
      state, _prompts(), {"reference": _copy(policy), "reward": None})
  assert np.asarray(scores).any(), "precondition: some sampled token scored"
  assert _all_changed(params["value_head"], new.params["value_head"])
  assert _changed(params["policy"], new.params["policy"])
  # the built-in reward: share of completion tokens among the characters
  tok = byte_tokenizer()
  want = [np.mean([tok.decode([t]) in chars for t in row[m]]) for row, m in zip(np.asarray(r.tokens_BxC),
                                                                                  np.asarray(r.mask_BxC))]
  np.testing.assert_allclose(scores, want, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_grpo_iteration(beta):
  policy = init_params(CFG, jax.random.key(0))
  optimizer = optax.adam(1e-3)
  fn = rewards.character_fraction("abcdefghijklmnopqrstuvwxyz", byte_tokenizer())
  s = grpo.Settings(model=Transformer(CFG), scorer=rollout.Scorer(fn=fn), sampling=_sampling(group_size=4),
                    optimizer=optimizer, beta=beta)
  params = policy
  state = grpo.GRPOState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
  reference = _copy(policy)
  new, m, r, scores = jax.jit(functools.partial(grpo.iteration, s=s))(
      state, _prompts(), {"reference": reference, "reward": None})
  assert r.tokens_BxC.shape[0] == 16  # 4 prompts x 4 samples, one prompt's samples consecutive
  np.testing.assert_array_equal(r.prompt_BxP[0], r.prompt_BxP[3])
  assert _changed(params, new.params)
  assert not _changed(reference, policy)
  if beta:
    assert float(m["objective/kl"]) == 0.0  # the first rollout comes from the reference itself
  else:
    assert "objective/kl" not in m
  assert float(m["val/ratio"]) == pytest.approx(1.0, abs=1e-5)  # one update: old = current policy


def _lora_cfg(rank=2):
  from rlhfx.config import base_config

  cfg = base_config("ppo").lora
  cfg.rank, cfg.patterns = rank, ("attn/(q|v)_proj/kernel",)
  return cfg


def _optim(algorithm):
  from rlhfx.config import base_config

  optim = base_config(algorithm).optim
  optim.warmup_steps = 0  # the first update moves B, the second A
  return optim


def _base_same_adapters_moved(before, after):
  from rlhfx.models import lora

  assert lora.is_wrapped(after)
  assert not _changed(before["base"], after["base"])
  assert _all_changed(before["lora"], after["lora"])


def test_lora_ppo_moves_only_adapters_of_policy_and_critic():
  """LoRA on the policy and the critic: three iterations leave both bases bit-identical, move every adapter and
  the critic's head (outside the base). (The zero head passes no gradient to the critic's B in the first update,
  and B = 0 none to A before B has moved.)"""
  from rlhfx.models import lora
  from rlhfx.optim import make_optimizer

  policy = init_params(CFG, jax.random.key(0))
  value = from_lm_params(_copy(policy), {"kernel": np.zeros((CFG.d_model, 1), np.float32)})
  cfg = _lora_cfg()
  params = {"policy": lora.wrap(policy, cfg, jax.random.key(1)), "value": lora.wrap(value, cfg, jax.random.key(2))}
  optim = _optim("ppo")
  optimizer = make_optimizer(optim, 10, params, frozen=lora.frozen(cfg))
  scorer = rollout.Scorer(module=ScoreModel(CFG), mean=0.3, std=2.0)
  s = ppo.Settings(model=Transformer(CFG), critic=ScoreModel(CFG), scorer=scorer, sampling=_sampling(),
                   optimizer=optimizer, epochs=1, minibatches=1, lora_scale=lora.scale(cfg))
  state = ppo.init_state(params, optimizer=optimizer, kl_coef=0.05)
  before = _copy(params)
  step = jax.jit(functools.partial(ppo.iteration, s=s))
  frozen = {"reference": _copy(policy), "reward": _score_params(1)}
  for _ in range(3):
    state, metrics, _, _ = step(state, _prompts(), frozen)
  _base_same_adapters_moved(before["policy"], state.params["policy"])
  _base_same_adapters_moved({**before["value"], "base": {k: v for k, v in before["value"]["base"].items()
                                                         if k != "score"}},
                            {**state.params["value"], "base": {k: v for k, v in state.params["value"]["base"].items()
                                                               if k != "score"}})
  assert _changed(before["value"]["base"]["score"], state.params["value"]["base"]["score"])
  assert float(metrics["objective/kl"]) != 0.0  # the merged policy moved away from the reference


def test_lora_grpo_moves_only_adapters():
  from rlhfx.models import lora
  from rlhfx.optim import make_optimizer

  policy = init_params(CFG, jax.random.key(0))
  cfg = _lora_cfg()
  params = lora.wrap(policy, cfg, jax.random.key(1))
  optim = _optim("grpo")
  optimizer = make_optimizer(optim, 10, params, frozen=lora.frozen(cfg))
  fn = rewards.character_fraction("abcdefghijklmnopqrstuvwxyz", byte_tokenizer())
  s = grpo.Settings(model=Transformer(CFG), scorer=rollout.Scorer(fn=fn), sampling=_sampling(group_size=4),
                    optimizer=optimizer, beta=0.1, lora_scale=lora.scale(cfg))
  state = grpo.init_state(params, optimizer=optimizer)
  before = _copy(params)
  step = jax.jit(functools.partial(grpo.iteration, s=s))
  for _ in range(2):
    state, metrics, _, _ = step(state, _prompts(), {"reference": _copy(policy), "reward": None})
  _base_same_adapters_moved(before, state.params)
