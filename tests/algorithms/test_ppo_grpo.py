"""One PPO / GRPO iteration as a pure function on a tiny model: what changes, what must not, and the scores."""

import functools
import string

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhfx import reward_functions, rollout, scoring
from rlhfx.reward_functions import RewardFunction
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
  scorer = scoring.Scorer(module=ScoreModel(CFG), mean=0.3, std=2.0)
  params = {"policy": policy, "value": from_lm_params(_copy(policy), {"kernel": np.zeros((CFG.d_model, 1),
                                                                                          np.float32)})}
  optimizer = optax.adam(1e-3)
  s = ppo.Settings(model=Transformer(CFG), critic=ScoreModel(CFG), scorer=scorer, sampling=_sampling(),
                   optimizer=optimizer, epochs=2, minibatches=2)
  state = jax.device_put(ppo.PPOState(step=jnp.zeros((), jnp.int32), params=params,
                                      opt_state=optimizer.init(params), kl_coef=jnp.float32(0.05)))
  frozen = jax.device_put({"reference": _copy(policy), "reward": reward})
  # the program a run executes: the state donated, the frozen trees passed as arguments
  step = ppo.jit_programs(s, jax.tree.map(lambda x: x.sharding, state)).fused
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
  # the frozen trees, device arguments of the donating program, are alive and bit-identical after it
  assert not any(x.is_deleted() for x in jax.tree.leaves(ppo_setup["frozen"]))
  assert not _changed(frozen0["reference"], ppo_setup["frozen"]["reference"])
  assert not _changed(frozen0["reward"], ppo_setup["frozen"]["reward"])


def test_ppo_kl_is_exactly_zero_before_the_first_update(ppo_setup):
  m = ppo_setup["metrics"]
  assert m["objective/kl"] == 0.0 and m["objective/non_score_reward"] == 0.0
  assert m["objective/rlhf_reward"] == pytest.approx(m["objective/scores"], abs=1e-6)
  # objective/entropy is the sampled completions' summed -log p (mean over rows): here from the sampler's own
  # log-probs, an independent computation of the same numbers (the loss metrics are checked against NumPy in
  # test_combined_minibatch_losses_equal_numpy_with_every_knob and test_ppo_update_with_whitened_rewards_equals_numpy)
  r = ppo_setup["rollout"]
  want = np.mean(np.sum(np.where(r.mask_BxC, -np.asarray(r.sample_logps_BxC), 0.0), axis=-1))
  np.testing.assert_allclose(m["objective/entropy"], want, rtol=1e-5)
  # the second iteration starts from an updated policy: its KL to the reference is no longer 0
  policy1 = jax.tree.map(jnp.copy, ppo_setup["state"].params["policy"])
  state, metrics, r2, _ = ppo_setup["step"](jax.tree.map(jnp.copy, ppo_setup["state"]), _prompts(),
                                            ppo_setup["frozen"])
  # objective/kl is sum over sampled tokens of log pi_1 - log pi_ref, recomputed here from the returned rollout, the
  # policy after iteration 1 and the initial policy (the reference): a reference that moved or was replaced by the
  # policy breaks it. Same arithmetic outside the program: float32 round-off.
  model, ref = ppo_setup["s"].model, ppo_setup["before"][0]["policy"]
  logps = rollout.completion_stats(model, policy1, r2, temperature=1.0)[0]
  ref_logps = rollout.completion_stats(model, ref, r2, temperature=1.0)[0]
  want = np.mean(np.sum(np.where(r2.mask_BxC, logps - ref_logps, 0.0), axis=-1))
  assert abs(want) > 1e-3
  np.testing.assert_allclose(metrics["objective/kl"], want, rtol=1e-4, atol=1e-6)


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


def _scorer(fn) -> scoring.Scorer:
  return scoring.Scorer(functions=(RewardFunction("fraction", fn),))


def test_missing_eos_penalty_and_stop_token():
  tokens = jnp.array([[5, 6, EOS, 0], [5, 6, 7, 8]])
  mask = jnp.array([[True, True, True, False], [True, True, True, True]])
  r = rollout.Rollout(prompt_BxP=jnp.ones((2, 1), jnp.int32), prompt_mask_BxP=jnp.ones((2, 1), bool),
                       tokens_BxC=tokens, mask_BxC=mask, sample_logps_BxC=jnp.zeros((2, 4)))
  scores, has_eos = scoring.finish_scores(jnp.array([1.0, 1.0]), r, EOS, 0.5)
  np.testing.assert_array_equal(has_eos, [True, False])
  np.testing.assert_allclose(scores, [1.0, 0.5])


def test_value_head_on_the_policy():
  policy = init_params(CFG, jax.random.key(0))
  params = {"policy": policy, "value_head": {"kernel": jnp.zeros((CFG.d_model, 1), jnp.float32)}}
  optimizer = optax.adam(1e-3)
  # a set that a random byte model hits often: with every score 0 and KL 0 at the first iteration, every
  # return is 0 and a zero value head gets no gradient ("abc" alone left 32 sampled tokens scoreless by chance)
  chars = string.ascii_letters + string.digits
  fn = reward_functions.character_fraction(chars, byte_tokenizer())
  s = ppo.Settings(model=Transformer(CFG), critic=None, scorer=_scorer(fn), sampling=_sampling(),
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
  fn = reward_functions.character_fraction("abcdefghijklmnopqrstuvwxyz", byte_tokenizer())
  s = grpo.Settings(model=Transformer(CFG), scorer=_scorer(fn), sampling=_sampling(group_size=4),
                    optimizer=optimizer, beta=beta)
  params = _copy(policy)
  state = jax.device_put(grpo.GRPOState(step=jnp.zeros((), jnp.int32), params=params,
                                        opt_state=optimizer.init(params)))
  reference = jax.device_put(_copy(policy))
  new, m, r, scores = grpo.jit_programs(s, jax.tree.map(lambda x: x.sharding, state)).fused(
      state, _prompts(), {"reference": reference, "reward": None})
  assert r.tokens_BxC.shape[0] == 16  # 4 prompts x 4 samples, one prompt's samples consecutive
  np.testing.assert_array_equal(r.prompt_BxP[0], r.prompt_BxP[3])
  assert _changed(params, new.params)
  assert not any(x.is_deleted() for x in jax.tree.leaves(reference)) and not _changed(reference, policy)
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
  params = {"policy": lora.wrap(policy, cfg, 1), "value": lora.wrap(value, cfg, 2)}
  optim = _optim("ppo")
  optimizer = make_optimizer(optim, 10, params, frozen=lora.frozen(cfg))
  scorer = scoring.Scorer(module=ScoreModel(CFG), mean=0.3, std=2.0)
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
  params = lora.wrap(policy, cfg, 1)
  optim = _optim("grpo")
  optimizer = make_optimizer(optim, 10, params, frozen=lora.frozen(cfg))
  fn = reward_functions.character_fraction("abcdefghijklmnopqrstuvwxyz", byte_tokenizer())
  s = grpo.Settings(model=Transformer(CFG), scorer=_scorer(fn), sampling=_sampling(group_size=4),
                    optimizer=optimizer, beta=0.1, lora_scale=lora.scale(cfg))
  state = grpo.init_state(params, optimizer=optimizer)
  before = _copy(params)
  step = jax.jit(functools.partial(grpo.iteration, s=s))
  for _ in range(2):
    state, metrics, _, _ = step(state, _prompts(), {"reference": _copy(policy), "reward": None})
  _base_same_adapters_moved(before, state.params)


def _np_aggregate(x, m, how, normaliser):
  x = np.where(m, x, 0.0)
  if how == "token_mean":
    return x.sum() / max(m.sum(), 1)
  if how == "sequence_mean":
    return np.mean(x.sum(-1) / np.maximum(m.sum(-1), 1))
  return x.sum() / (x.shape[0] * normaliser)


def _np_k3(logps, ref):
  log_r = ref - logps
  return np.expm1(log_r) - log_r


def _np_surrogate(logps, old, adv, m, how, n, *, low, high, dual=None):
  ratio = np.exp(logps - old)
  pg = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - low, 1 + high))
  if dual is not None:
    pg = np.where(adv < 0, np.minimum(pg, -dual * adv), pg)
  clipfrac = np.where(m, -adv * np.clip(ratio, 1 - low, 1 + high) > -adv * ratio, 0).sum() / m.sum()
  return _np_aggregate(pg, m, how, n), clipfrac


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "fixed"])
def test_combined_minibatch_losses_equal_numpy_with_every_knob(aggregation):
  """PPO's loss (dual clip, value clip, vf_coef, entropy bonus, k3 KL in the loss) and GRPO's (clip-higher, beta x
  k3 KL) recomputed in float64 NumPy from the same per-token log-probs, entropies and values; only the reduction
  order differs, so float32 round-off (rtol 1e-5) is the tolerance."""
  policy = init_params(CFG, jax.random.key(0))
  value = from_lm_params(_copy(policy), {"kernel": np.asarray(jax.random.normal(jax.random.key(5), (CFG.d_model, 1)))
                                         * 0.1})
  params = {"policy": policy, "value": value}
  r = rollout.rollout(policy, _prompts(), jax.random.key(3), _sampling())
  m = np.asarray(r.mask_BxC)
  s = ppo.Settings(model=Transformer(CFG), critic=ScoreModel(CFG), scorer=scoring.Scorer(),
                   sampling=_sampling(), optimizer=optax.sgd(0.0), clip_eps=0.2, dual_clip=3.0, value_clip=0.1,
                   vf_coef=0.7, entropy_coef=0.05, kl_in="loss", kl_estimator="k3", aggregation=aggregation)
  logps, ent, values = (np.asarray(x, np.float64) for x in ppo.policy_and_values(params, r, s, entropy=True))
  rng = np.random.default_rng(0)
  shape = m.shape
  old, ref = logps + rng.normal(0, 0.3, shape), logps + rng.normal(0, 0.5, shape)
  adv, old_v, ret = rng.normal(0, 1, shape), values + rng.normal(0, 0.2, shape), rng.normal(0, 1, shape)
  mb = {"rollout": r, **{k: jnp.asarray(v, jnp.float32) for k, v in dict(
      old_logps_BxC=old, ref_logps_BxC=ref, advantages_BxC=adv, old_values_BxC=old_v, returns_BxC=ret).items()}}
  loss, metrics = ppo.minibatch_loss(params, mb, s=s, kl_coef=jnp.float32(0.3))
  n = s.sampling.max_new_tokens
  pg, clipfrac = _np_surrogate(logps, old, adv, m, aggregation, n, low=0.2, high=0.2, dual=3.0)
  v_clipped = old_v + np.clip(values - old_v, -0.1, 0.1)
  vf = 0.5 * _np_aggregate(np.maximum((values - ret) ** 2, (v_clipped - ret) ** 2), m, aggregation, n)
  entropy = np.where(m, ent, 0).sum() / m.sum()
  kl = _np_aggregate(_np_k3(logps, ref), m, aggregation, n)
  np.testing.assert_allclose(loss, pg + 0.7 * vf - 0.05 * entropy + 0.3 * kl, rtol=1e-5)
  np.testing.assert_allclose([metrics["policy_loss"], metrics["value_loss"], metrics["entropy"], metrics["clipfrac"]],
                             [pg, vf, entropy, clipfrac], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics["approxkl"], np.where(m, 0.5 * (logps - old) ** 2, 0).sum() / m.sum(), rtol=1e-5)

  g = grpo.Settings(model=Transformer(CFG), scorer=scoring.Scorer(), sampling=_sampling(),
                    optimizer=optax.sgd(0.0), clip_eps=0.2, clip_eps_high=0.28, beta=0.04, aggregation=aggregation)
  adv_B = rng.normal(0, 1, shape[0])
  gmb = {"rollout": r, "old_logps_BxC": mb["old_logps_BxC"], "ref_logps_BxC": mb["ref_logps_BxC"],
         "advantages_B": jnp.asarray(adv_B, jnp.float32)}
  gloss, gm = grpo.minibatch_loss(policy, gmb, s=g)
  gpg, _ = _np_surrogate(logps, old, np.broadcast_to(adv_B[:, None], shape), m, aggregation, n, low=0.2, high=0.28)
  np.testing.assert_allclose(gloss, gpg + 0.04 * kl, rtol=1e-5)
  np.testing.assert_allclose([gm["policy_loss"], gm["kl"]], [gpg, kl], rtol=1e-5)


def _np_gae(rewards, values, m, gamma, lam):
  adv = np.zeros_like(rewards)
  for b in range(rewards.shape[0]):
    next_value = next_adv = 0.0
    for c in reversed(range(rewards.shape[1])):
      if not m[b, c]:
        continue
      delta = rewards[b, c] + gamma * next_value - values[b, c]
      next_adv = delta + gamma * lam * next_adv
      adv[b, c], next_value = next_adv, values[b, c]
  return adv, np.where(m, adv + values, 0.0)


def _np_whiten(x, m, shift_mean=True):
  mean = x[m].mean()
  out = (x - mean) / np.sqrt(x[m].var(ddof=1) + 1e-8) + (0 if shift_mean else mean)
  return np.where(m, out, 0.0)


def test_ppo_update_with_whitened_rewards_equals_numpy():
  """One PPO update at learning rate 0 (so the ratio is 1 and values equal the rollout's): per-token rewards
  -kl_coef x k1 KL plus the score at the last token, whitened keeping their mean (whiten_rewards), GAE written as a
  loop, whitened advantages, and the value loss 0.5 mean (V - R)^2, all in float64 NumPy."""
  policy = init_params(CFG, jax.random.key(0))
  reference = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(7), x.shape), policy)
  value = from_lm_params(_copy(policy), {"kernel": np.asarray(jax.random.normal(jax.random.key(5), (CFG.d_model, 1)))
                                         * 0.1})
  params = {"policy": policy, "value": value}
  optimizer = optax.sgd(0.0)
  s = ppo.Settings(model=Transformer(CFG), critic=ScoreModel(CFG), scorer=scoring.Scorer(),
                   sampling=_sampling(), optimizer=optimizer, epochs=1, minibatches=1, gamma=0.9, lam=0.8,
                   whiten_rewards=True)
  state = ppo.init_state(params, optimizer=optimizer, kl_coef=0.2)
  r = rollout.rollout(policy, _prompts(), jax.random.key(3), _sampling())
  scores_B = jnp.asarray([0.5, -1.0, 2.0, 0.25], jnp.float32)
  new, metrics = jax.jit(functools.partial(ppo.update_step, s=s))(state, r, scores_B, {"reference": reference})
  m = np.asarray(r.mask_BxC)
  logps, _, values = (np.asarray(x, np.float64) for x in ppo.policy_and_values(params, r, s))
  ref = np.asarray(rollout.completion_stats(s.model, reference, r, temperature=1.0)[0], np.float64)
  has_eos = np.any((np.asarray(r.tokens_BxC) == EOS) & m, axis=-1)
  assert has_eos.sum() < 4, "precondition: some completion runs to max_new_tokens (no penalty configured anyway)"
  rewards = np.where(m, -0.2 * (logps - ref), 0.0)
  last = m.sum(-1) - 1
  rewards[np.arange(4), last] += np.asarray(scores_B)
  rewards = _np_whiten(rewards, m, shift_mean=False)
  adv, returns = _np_gae(rewards, values, m, 0.9, 0.8)
  adv = _np_whiten(adv, m)
  np.testing.assert_allclose(metrics["loss/value_avg"], 0.5 * np.where(m, (values - returns) ** 2, 0).sum() / m.sum(),
                             rtol=1e-4)  # float32 GAE scan and whitening against float64: accumulated round-off
  np.testing.assert_allclose(metrics["loss/policy_avg"], -np.where(m, adv, 0).sum() / m.sum(), atol=1e-6)
  np.testing.assert_allclose(metrics["objective/kl"], np.mean(np.where(m, logps - ref, 0).sum(-1)), rtol=1e-5)
  assert float(metrics["policy/approxkl_avg"]) == 0.0 and float(metrics["policy/clipfrac_avg"]) == 0.0
  assert float(metrics["val/clipfrac_avg"]) == 0.0  # values equal the rollout's: nothing to clip
  assert not _changed(params, new.params)  # learning rate 0


def test_grpo_says_when_no_group_ever_had_a_learning_signal(tmp_path):
  """configs/grpo_math.py:tiny's case: every iteration's groups scored alike, so every advantage was 0."""
  import json

  from rlhfx.algorithms.grpo import no_signal

  def write(values):
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i + 1, "objective/zero_std_groups": v}) + "\n" for i, v in enumerate(values)))

  write([1.0, 1.0, 1.0])
  (line,) = no_signal(tmp_path)
  assert line.startswith("no learning signal: in all 3 logged iterations every group's completions scored alike")
  write([1.0, 0.75, 1.0])  # one group with different scores once: a signal
  assert no_signal(tmp_path) == []
  assert no_signal(tmp_path / "nothing") == []
