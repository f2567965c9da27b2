"""PPO on a programmatic reward: make completions consist of lowercase letters (no downloads, CPU minutes).

  python -m rlhfx.main --config=configs/ppo_letters.py:tiny --workdir=/tmp/ppo_letters

The policy is a small random byte-level model; prompts are the built-in "reverse: abcd ="
task's prompts; the score of a completion is the share of its bytes in a-z
(`scoring.functions = ("fraction:abc...z",)`, computed inside the compiled iteration).
A random policy starts near 26/256 = 10%; the KL penalty keeps the policy near the
reference while the score rises.
"""

from rlhfx.config import base_config, use_letters_task


def get_config(arg=None):
  config = base_config("ppo")
  use_letters_task(config)  # model, data, scoring, rollout, schedule: see rlhfx/config.py
  config.train.global_batch_size = 32  # prompts per iteration
  config.ppo.epochs = 2  # passes over each rollout
  config.ppo.minibatches = 2  # updates per pass
  config.ppo.kl_coef = 0.02  # per-token KL penalty
  if arg == "tiny":
    config.train.num_steps = 30  # the test suite's budget
  elif arg:
    raise ValueError(f"configs/ppo_letters.py: unknown variant {arg!r}; expected '' or 'tiny'")
  return config.lock()


def sweep():
  """KL coefficient x learning rate."""
  return [{"ppo.kl_coef": k, "optim.learning_rate": lr} for k in (0.01, 0.05, 0.2) for lr in (1e-3, 3e-3)]
