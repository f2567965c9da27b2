"""The controlled-sentiment study: its KL estimator against exact KL, and the :quick variant on real artifacts."""

import itertools
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhfx import rollout
from rlhfx.models import Transformer, get_preset, init_params

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_kl_estimator_equals_the_exact_kl_in_expectation():
  """The study's KL (rollout.sequence_kl of the sampler's completions, log-probs from completion_stats at the
  sampling temperature) averaged over samples of a policy equals KL(policy || reference) computed exactly by
  enumerating every completion of two hand-made models (8 tokens, 2 steps: 64 completions)."""
  config = get_preset("tiny", vocab_size=8, n_layers=1)
  sharpen = lambda p: {**p, "lm_head": {"kernel": p["lm_head"]["kernel"] * 60.0}}  # noqa: E731  far from uniform
  policy, reference = (sharpen(init_params(config, jax.random.key(seed))) for seed in (1, 2))
  model = Transformer(config)
  prompt = {"prompt_BxP": jnp.array([[3, 5]], jnp.int32), "prompt_mask_BxP": jnp.ones((1, 2), bool)}
  temperature = 0.7

  # exact: p(x1 x2) under softmax(logits / T), summed over all 64 completions
  completions = np.array(list(itertools.product(range(8), repeat=2)), np.int32)
  exact_r = rollout.Rollout(prompt_BxP=jnp.repeat(prompt["prompt_BxP"], 64, 0),
                            prompt_mask_BxP=jnp.ones((64, 2), bool), tokens_BxC=jnp.asarray(completions),
                            mask_BxC=jnp.ones((64, 2), bool), sample_logps_BxC=jnp.zeros((64, 2)))
  logp = rollout.completion_stats(model, policy, exact_r, temperature=temperature)[0].sum(-1)
  logq = rollout.completion_stats(model, reference, exact_r, temperature=temperature)[0].sum(-1)
  assert np.exp(logp).sum() == pytest.approx(1.0, abs=1e-5)
  exact = float(np.sum(np.exp(logp) * (logp - logq)))
  assert exact > 0.5  # a KL worth estimating

  # estimated: the study's path on 4096 samples of the policy
  s = rollout.SamplingSettings(config, max_new_tokens=2, group_size=4096, temperature=temperature, eos_id=None)

  @jax.jit
  def estimate(rng):
    r = rollout.rollout(policy, prompt, rng, s)
    logps = rollout.completion_stats(model, policy, r, temperature=temperature)[0]
    ref = rollout.completion_stats(model, reference, r, temperature=temperature)[0]
    return rollout.sequence_kl(logps, ref, r.mask_BxC)

  kl_B = np.asarray(estimate(jax.random.key(0)))
  sem = kl_B.std() / np.sqrt(kl_B.size)
  assert abs(kl_B.mean() - exact) < 3 * sem, (kl_B.mean(), exact, sem)
  assert np.asarray(estimate(jax.random.key(1))).mean() != pytest.approx(kl_B.mean())  # other draws


@pytest.mark.slow
def test_quick_study_traces_curves_from_the_reference_and_beats_best_of_one(tmp_path, shared_data):
  for name in ("stories260k/stories260K.bin", "stories260k/tok512.bin", "sentiment/imdb_labelled.txt"):
    shared_data(name)
  proc = subprocess.run([sys.executable, "benchmarks/sentiment_study.py", "--variant", "quick", "--out-dir",
                         str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  rm = results["reward_model"]
  assert rm["eval/accuracy"] > 0.6 and rm["eval/accuracy_low95"] > 0.5  # it learned sentiment, beyond chance
  best_of = {b["n"]: b for b in results["best_of_n"]}
  assert best_of[4]["reward"] > best_of[1]["reward"] and best_of[1]["kl"] == 0.0
  reference = results["reference"]
  assert reference["kl"] == 0.0
  for method in ("ppo", "dpo"):
    points = results[method]
    assert {p["lr"] for p in points} == {3e-4, 0.0}
    for lr in (3e-4, 0.0):
      run = sorted((p for p in points if p["lr"] == lr), key=lambda p: p["step"])
      assert [p["step"] for p in run][0] == 0 and len(run) == 3  # the reference, then 2 checkpoints
      assert all(set(p) >= {"method", "step", "reward", "reward_sem", "kl", "kl_sem"} for p in run)
      if lr == 0.0:  # the restored checkpoints are the reference: the estimator says 0, the reward is the same
        for p in run:
          assert abs(p["kl"]) < 1e-6 and abs(p["reward"] - reference["reward"]) <= reference["reward_sem"], p
      else:  # moved away from the reference, and somewhere scores above sampling it (best-of-1) beyond 2 SEMs
        assert run[-1]["kl"] > 0.0
        assert any(p["reward"] - 2 * p["reward_sem"] > best_of[1]["reward"] + 2 * best_of[1]["reward_sem"]
                   for p in run), (method, run)
  text = (tmp_path / "study.md").read_text()
  assert "Reward at matched KL" in text and "| PPO | kl_coef = 0.2, lr = 0.0003 | 16 |" in text
