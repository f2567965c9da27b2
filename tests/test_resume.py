"""Resume equals the unbroken run, for every algorithm: SIGTERM after step 2 (tests/preempted_run.py), rerun the
same command, and every logged train metric of steps 1-4 equals the run that never stopped.

SFT's case (with the exported weights) is in test_main.py. Here: the reward model, DPO with a precomputed
reference (the cached table is rebuilt identically on resume), PPO with the adaptive KL coefficient (restored
from the state, `objective/kl_coef` compared) and GRPO (the rollout's sampling key derives from the seed and the
restored step).
"""

import gzip
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMON = ["--config.train.num_steps=4", "--config.train.log_every=1", "--config.train.eval_every=0",
          "--config.train.checkpoint_every=100", "--config.data.eval_fraction=0", "--config.train.export_hf=False"]
PAIRS = ["--config.data.max_length=128", "--config.data.max_prompt_length=96", "--config.data.buckets=128,",
         "--config.train.global_batch_size=8"]
CASES = {
    "reward": ("configs/reward_hh.py:tiny", PAIRS + ["--config.reward.stats_batches=1"]),
    "dpo_precomputed": ("configs/dpo_hh.py:tiny", PAIRS + ["--config.dpo.reference=precomputed"]),
    "ppo_adaptive_kl": ("configs/ppo_letters.py:tiny", ["--config.ppo.kl_target=0.5", "--config.ppo.kl_horizon=50",
                                                        "--config.train.log_samples_every=0"]),
    "grpo": ("configs/grpo_letters.py:tiny", ["--config.train.log_samples_every=0"]),
}

pytestmark = pytest.mark.slow  # three runs per algorithm: about 4 minutes together


def _run(config, workdir, *overrides, sigterm_at=None):
  program = ["-m", "rlhfx.main"] if sigterm_at is None else [str(ROOT / "tests" / "preempted_run.py"), str(sigterm_at)]
  proc = subprocess.run([sys.executable, *program, f"--config={config}", f"--workdir={workdir}", *COMMON,
                         *overrides], cwd=ROOT, capture_output=True, text=True, timeout=600)
  # 0: reached num_steps; 75: stopped by SIGTERM after saving (rerun to resume)
  assert proc.returncode == (0 if sigterm_at is None else 75), proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


def _train(workdir) -> dict[int, dict]:
  records = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r for r in records if "train/loss" in r}


@pytest.fixture(scope="module")
def small_pairs(tmp_path_factory, shared_data):
  """200 HH pairs: enough for 4 steps of 8, small enough that DPO's reference pass over them is quick."""
  path = tmp_path_factory.mktemp("pairs") / "hh200.jsonl"
  with gzip.open(shared_data("hh_rlhf/harmless-base-test.jsonl.gz"), "rt") as f:
    path.write_text("".join(line for _, line in zip(range(200), f)))
  return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_after_sigterm_equals_the_unbroken_run(case, tmp_path, small_pairs):
  config, overrides = CASES[case]
  if "hh" in config:
    overrides = overrides + [f"--config.data.train_files=('{small_pairs}',)"]
  _run(config, tmp_path / "straight", *overrides)
  first = _run(config, tmp_path / "resumed", *overrides, sigterm_at=2)
  assert "stopped at step 2" in first and sorted(_train(tmp_path / "resumed")) == [1, 2]
  second = _run(config, tmp_path / "resumed", *overrides)
  assert "resumed from step 2" in second
  straight, resumed = _train(tmp_path / "straight"), _train(tmp_path / "resumed")
  assert sorted(straight) == sorted(resumed) == [1, 2, 3, 4]
  names = sorted(k for k in straight[1] if not k.startswith(("perf/", "time/", "data/")))  # data/*: this run's rows
  assert len(names) >= 5
  for step in (1, 2, 3, 4):
    # the same programs on the same state and batch: equal up to float32 round-off of a recompiled program
    np.testing.assert_allclose([resumed[step][k] for k in names], [straight[step][k] for k in names], rtol=1e-6,
                               atol=1e-7, err_msg=f"{case} step {step}: {names}")
  if case == "ppo_adaptive_kl":  # the controller moved the coefficient, and the resumed run continued from there
    coefs = [straight[s]["objective/kl_coef"] for s in (1, 2, 3, 4)]
    assert len(set(coefs)) == 4
