"""The controlled-sentiment study's :quick variant: real artifacts, and the qualitative result it claims."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_study_ppo_and_dpo_beat_best_of_one(tmp_path, shared_data):
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
  for method in ("ppo", "dpo"):
    for run in results[method]:
      # moved away from the reference, and scores higher than sampling the reference (best-of-1)
      assert run["kl"] > 0.0
      assert run["reward"] - 2 * run["reward_sem"] > best_of[1]["reward"] + 2 * best_of[1]["reward_sem"], (method, run)
  assert "| PPO |" in (tmp_path / "study.md").read_text()
