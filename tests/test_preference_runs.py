"""Reward model and DPO end to end on the real hh-rlhf pairs (GPT-2 tokenizer, tiny random model)."""

import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--config.data.max_length=128", "--config.data.max_prompt_length=96", "--config.data.buckets=128,",
         "--config.train.global_batch_size=8", "--config.train.log_every=10", "--config.train.eval_every=0",
         "--config.train.checkpoint_every=1000"]


def _run(config, workdir, *overrides):
  proc = subprocess.run([sys.executable, "-m", "rlhfx.main", f"--config={config}", f"--workdir={workdir}", *SMALL,
                         *overrides], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return proc.stdout.split("== summary ==")[1]


@pytest.fixture(autouse=True)
def _needs_data(shared_data):
  shared_data("hh_rlhf/harmless-base-test.jsonl.gz")
  shared_data("gpt2_tokenizer/encoder.json")


def test_dpo_raises_heldout_reward_accuracy(tmp_path, shared_data):
  # stories260K's 512-token tokenizer (byte fallback reads any text) keeps the LM head small on CPU
  tok512 = shared_data("stories260k/tok512.bin")
  summary = _run("configs/dpo_hh.py:tiny", tmp_path, "--config.train.num_steps=40", f"--config.data.tokenizer={tok512}",
                 "--config.model.vocab_size=512")
  found = re.search(r"held-out rewards/accuracies ([\d.]+)% -> ([\d.]+)%; rewards/margins ([-\d.]+) -> ([-\d.]+)",
                    summary)
  before, after, margin_before, margin_after = map(float, found.groups())
  assert after > before and after > 50.0
  assert float(margin_after) > float(margin_before) == 0.0
  assert (tmp_path / "hf" / "config.json").exists()


def test_reward_model_reports_heldout_accuracy_and_stats(tmp_path):
  summary = _run("configs/reward_hh.py:tiny", tmp_path, "--config.train.num_steps=40",
                 "--config.reward.stats_batches=4", "--config.train.log_every=1")
  found = re.search(r"held-out accuracy ([\d.]+)% -> ([\d.]+)% \(95% interval ([\d.]+)%-([\d.]+)%, (\d+) pairs\)",
                    summary)
  _, after, low, high, pairs = map(float, found.groups())
  assert low <= after <= high and 250 < pairs < 400
  stats = json.loads((tmp_path / "checkpoints" / "reward_stats.json").read_text())
  assert stats["std"] > 0 and stats["count"] == 2 * 4 * 8
  # it learned: the Bradley-Terry loss of the last 10 steps below the first 10's (0.81 -> 0.71 measured; chance is
  # log 2), and the held-out margin grew from its start
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train = [r["train/loss"] for r in records if "train/loss" in r]
  assert len(train) == 40 and np.mean(train[-10:]) < np.mean(train[:10]) - 0.05
  margins = [r["eval/margin"] for r in records if "eval/margin" in r]
  assert margins[-1] > margins[0]


def test_kto_config_trains_on_the_hh_pairs_unpaired(tmp_path, shared_data):
  """configs/kto_hh.py:tiny: each HH pair a desirable and an undesirable example; the summary's held-out line."""
  tok512 = shared_data("stories260k/tok512.bin")
  summary = _run("configs/kto_hh.py:tiny", tmp_path / "run", "--config.train.num_steps=30",
                 "--config.data.eval_fraction=0.03", f"--config.data.tokenizer={tok512}",
                 "--config.model.vocab_size=512", "--config.train.log_every=1", "--config.train.export_hf=False")
  assert "kto preference tuning (frozen reference) for 30 steps" in summary
  assert "data: 2312 records read, 4478 train / 128 eval examples, 9 skipped at build" in summary  # 2 per pair
  found = re.search(r"held-out rewards: desirable ([-\d.]+) -> ([-\d.]+), undesirable ([-\d.]+) -> ([-\d.]+) "
                    r"\(gap ([-\d.]+) -> ([-\d.]+)\)", summary)
  d0, d1, u0, u1, gap0, gap1 = map(float, found.groups())
  assert d0 == u0 == gap0 == 0.0 and abs(gap1 - (d1 - u1)) < 2e-3
  assert gap1 > 0  # held out, desirable replies gained on undesirable ones
  lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  first_eval, train = lines[0], [r for r in lines if "train/loss" in r]
  assert first_eval["step"] == 0 and first_eval["eval/kl"] == 0.0  # the policy starts as the reference
  assert abs(first_eval["eval/loss"] - 0.5) < 1e-6  # w (1 - sigmoid(0)) with both weights 1
  # it learns: the last 10 steps' loss below the first 10's, desirable rewards above undesirable ones there
  assert len(train) == 30 and np.mean([r["train/loss"] for r in train[-10:]]) < np.mean(
      [r["train/loss"] for r in train[:10]])
  assert np.mean([r["rewards/chosen"] - r["rewards/rejected"] for r in train[-10:]]) > 0


@pytest.mark.slow
def test_packed_dpo_trains_exactly_like_one_pair_per_row(tmp_path, shared_data):
  """The same pairs per step, packed into fewer rows: the same losses and metrics step by step, less padding."""
  tok512 = shared_data("stories260k/tok512.bin")
  common = ["--config.train.num_steps=3", "--config.train.log_every=1", "--config.train.export_hf=False",
            f"--config.data.tokenizer={tok512}", "--config.model.vocab_size=512", "--config.data.eval_fraction=0",
            "--config.data.max_prompt_length=48", "--config.model.max_seq_len=256",
            "--config.data.buckets=64,128,256"]  # rows pad to the batch's longest (<= 128); packed rows: 256
  logs = {}
  for packing in (False, True):
    _run("configs/dpo_hh.py:tiny", tmp_path / str(packing), *common, f"--config.data.packing={packing}")
    lines = (tmp_path / str(packing) / "metrics.jsonl").read_text().splitlines()
    logs[packing] = {r["step"]: r for r in map(json.loads, lines) if "train/loss" in r}
  assert sorted(logs[True]) == sorted(logs[False]) == [1, 2, 3]
  for step in (1, 2, 3):
    for key in ("train/loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
      np.testing.assert_allclose(logs[True][step][key], logs[False][step][key], rtol=1e-5, atol=1e-6,
                                 err_msg=f"step {step} {key}")
    assert logs[True][step]["train/padding"] <= logs[False][step]["train/padding"]
  padding = {packing: sum(log[s]["train/padding"] for s in (1, 2, 3)) for packing, log in logs.items()}
  assert padding[True] < padding[False]
