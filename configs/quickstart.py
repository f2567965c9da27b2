"""Quickstart: a tiny model learns to reverse words, generated in code (no downloads), in about a minute on 2 CPUs.

  python -m rlhfx.main --config=configs/quickstart.py --workdir=/tmp/rlhfx-quickstart
"""

from rlhfx.config import base_config


def get_config(arg=None):
  del arg
  config = base_config("sft")
  config.model.preset = "tiny"  # 2 layers, width 64, 4 heads (2 kv heads)
  config.model.vocab_size = 259  # the byte tokenizer: <pad>, <s>, </s> + 256 bytes
  config.model.n_layers = 2  # depth
  config.data.builtin = "reverse"  # "reverse: abcd =" -> " dcba", 4000 examples written to <workdir>/data/raw
  config.data.tokenizer = "builtin:bytes"  # one token per byte
  config.data.eval_fraction = 0.05  # held-out prompts for the before/after accuracy
  config.data.max_length = 32  # prompt + completion bytes
  config.data.max_prompt_length = 24  # prompt bytes
  config.data.buckets = (32,)  # one shape, one compilation
  config.train.global_batch_size = 64  # rows per step
  config.train.num_steps = 300  # optimizer steps
  config.train.log_every = 25  # console and metrics
  config.train.eval_every = 100  # eval loss
  config.train.checkpoint_every = 100  # checkpoints
  config.optim.learning_rate = 3e-3  # peak learning rate
  config.optim.warmup_steps = 30  # linear warmup
  return config.lock()


def sweep():
  """Overrides for a small learning-rate x depth sweep."""
  return [{"optim.learning_rate": lr, "model.n_layers": n} for lr in (1e-3, 3e-3) for n in (2, 3)]
