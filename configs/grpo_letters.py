"""GRPO on a programmatic reward: make completions consist of lowercase letters (no downloads, CPU minutes).

  python -m rlhfx.main --config=configs/grpo_letters.py:tiny --workdir=/tmp/grpo_letters

The policy is a small random byte-level model; prompts are the built-in "reverse: abcd ="
task's prompts; the score of a completion is the share of its bytes in a-z
(`scoring.function = "fraction:abc...z"`, computed inside the compiled iteration).
A random policy starts near 26/256 = 10%; 4 samples per prompt give the group
baseline, and the k3 KL term keeps the policy near the reference.
"""

import string

from rlhfx.config import base_config


def get_config(arg=None):
  config = base_config("grpo")
  config.model.preset = "tiny"  # 2 layers, width 64
  config.model.vocab_size = 259  # the byte tokenizer
  config.data.builtin = "reverse"  # prompts "reverse: abcd =" generated in code
  config.data.tokenizer = "builtin:bytes"  # one token per byte
  config.data.eval_fraction = 0.05  # held-out prompts for eval/scores and eval/kl
  config.data.max_length = 40  # prompt + completion bytes
  config.data.max_prompt_length = 24  # prompt bytes
  config.data.buckets = (24,)  # one prompt shape, one compilation
  config.scoring.function = "fraction:" + string.ascii_lowercase  # share of completion bytes in a-z
  config.rollout.max_new_tokens = 16  # completion bytes
  config.train.global_batch_size = 8  # prompts per iteration
  config.rollout.group_size = 4  # completions per prompt: 32 rows per iteration
  config.train.num_steps = 60  # iterations
  config.train.log_every = 5  # console and metrics
  config.train.eval_every = 20  # held-out score and KL
  config.train.eval_batches = 2  # 64 held-out prompts
  config.train.checkpoint_every = 30  # checkpoints
  config.train.log_samples_every = 20  # sample completions
  config.train.export_hf = False  # a toy policy
  config.optim.learning_rate = 3e-3  # small random model
  config.optim.warmup_steps = 0  # no warmup
  config.optim.schedule = "constant"  # constant rate
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
