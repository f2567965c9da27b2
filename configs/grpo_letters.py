"""GRPO on a programmatic reward: make completions consist of lowercase letters (no downloads, CPU minutes).

  python -m rlhfx.main --config=configs/grpo_letters.py:tiny --workdir=/tmp/grpo_letters

The policy is a small random byte-level model; prompts are the built-in "reverse: abcd ="
task's prompts; the score of a completion is the share of its bytes in a-z
(`scoring.functions = ("fraction:abc...z",)`, computed inside the compiled iteration).
A random policy starts near 26/256 = 10%; 4 samples per prompt give the group
baseline, and the k3 KL term keeps the policy near the reference.
"""

from rlhfx.config import base_config, use_letters_task


def get_config(arg=None):
  config = base_config("grpo")
  use_letters_task(config)  # model, data, scoring, rollout, schedule: see rlhfx/config.py
  config.train.global_batch_size = 8  # prompts per iteration
  config.rollout.group_size = 4  # completions per prompt: 32 rows per iteration
  config.grpo.advantage = "grpo"  # (r - group mean) / group std
  config.grpo.beta = 0.02  # k3 KL term weight
  if arg == "tiny":
    config.train.num_steps = 30  # the test suite's budget
  elif arg:
    raise ValueError(f"configs/grpo_letters.py: unknown variant {arg!r}; expected '' or 'tiny'")
  return config.lock()


def sweep():
  """Advantage estimator x KL weight."""
  return [{"grpo.advantage": a, "grpo.beta": b} for a in ("grpo", "dr_grpo", "rloo") for b in (0.0, 0.04)]
