"""Every benchmark script runs at its smallest size and prints what it promises, so none rots unseen.

Not run here, and why: compare_trl.py (needs a TRL virtualenv with torch, which is never a test
dependency), gpu.sh (a lent GPU), faults.py (its 26 cases are tests/test_faults.py's, and it takes
minutes), sentiment_study.py (tests/test_study.py runs its quick variant), study_ablation.py (needs a
study's output; its PPO settings go through the same ppo_config as the study's), plan_rows.py
(compiles the 8B and 70B configs for minutes; tests/test_plan.py and tests/test_sampling_layout.py
compile the same programs of smaller configs), rl_curves.py and reward_accuracy.py (minutes of
training; the same configs train in tests/test_rl_runs.py and tests/test_preference_runs.py).
"""

import gzip
import json
import os
import pathlib
import subprocess
import sys

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--vocab", "128"]


def _run(script, *args, timeout=600) -> dict:
  proc = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, env=dict(os.environ),
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  start = proc.stdout.rfind("\n{") + 1  # the last JSON object (one line, or indented over several)
  return json.loads(proc.stdout[start:])


def test_dpo_and_reward_steps():
  for script in ("dpo_step.py", "reward_step.py"):
    record = _run(script, *TINY, "--seq", "16", "--batch", "2", "--steps", "2", "--warmup", "1")
    assert record["tokens_per_s"] > 0, (script, record)


def test_generate():
  record = _run("generate.py", *TINY, "--batch", "2", "--prompt-len", "4", "--new-tokens", "4", "--repeats", "1")
  assert record["config"]["new_tokens"] == 4 and record["tokens_per_s"] > 0


def test_ppo_and_grpo_iterations():
  for algo in ("ppo", "grpo"):
    record = _run("ppo_iteration.py", "--algo", algo, *TINY, "--batch", "2", "--prompt-len", "4",
                  "--new-tokens", "4", "--epochs", "1", "--minibatches", "1", "--iterations", "1")
    assert record["algo"] == f"{algo}_iteration" and record["iteration_s"] > 0


def test_rollout_engine_against_static():
  record = _run("rollout.py", "--size", "tiny", "--prompts", "4", "--group-size", "2", "--new-tokens", "16",
                "--repeats", "1")
  for key in ("static_uniform", "engine_uniform", "static_mix", "engine_mix"):
    assert record[key] > 0, key
  assert record["mean_length_uniform"] == 16 and record["mean_length_mix"] < 16
  assert set(record["machine"]["flags"]) == {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}


def test_profile_dpo():
  record = _run("profile_dpo.py", *TINY, "--seq", "16", "--batch", "2", "--steps", "2", "--warmup", "1")
  assert record


def test_trl_parity():
  record = _run("trl_parity.py")
  assert record


def test_data_pipeline(shared_data):
  record = _run("data.py", "--data", str(shared_data("hh_rlhf/harmless-base-test.jsonl.gz")),
                "--tokenizer", str(shared_data("gpt2_tokenizer/vocab.bpe").parent), "--epochs", "1")
  assert record


@pytest.mark.slow  # two sweeps of two tiny DPO runs: about a minute and a half
def test_members_together_against_separate(tmp_path, shared_data):
  pairs = tmp_path / "hh100.jsonl"
  with gzip.open(shared_data("hh_rlhf/harmless-base-test.jsonl.gz"), "rt") as f:
    pairs.write_text("".join(line for _, line in zip(range(100), f)))
  record = _run("members.py", "--steps", "2", "--betas", "0.1", "--lrs", "1e-3,3e-3", "--keep", str(tmp_path / "runs"),
                "--", f"--config.data.train_files=('{pairs}',)", "--config.data.tokenizer=builtin:bytes",
                "--config.model.vocab_size=259", "--config.data.max_length=128", "--config.data.buckets=128,",
                "--config.data.max_prompt_length=96", "--config.train.global_batch_size=8",
                "--config.data.eval_fraction=0.1", "--config.train.export_hf=False")
  assert record["members"] == 2 and record["steps"] == 2
  assert record["together_s"] > 0 and record["separate_s"] > 0 and record["together_peak_rss_gib"] > 0
  assert record["speedup"] == pytest.approx(record["separate_s"] / record["together_s"], rel=0.01)
  for side in ("together", "separate"):
    assert all((tmp_path / "runs" / side / name / "sweep_done.json").exists()
               for name in ("00-beta=0.1-learning_rate=0.001", "01-beta=0.1-learning_rate=0.003"))
