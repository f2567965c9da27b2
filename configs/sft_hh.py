"""SFT on the chosen replies of Anthropic HH (the usual first stage before a reward model and DPO/PPO).

  python -m rlhfx.main --config=configs/sft_hh.py:tiny --workdir=/tmp/sft_hh            # CPU, random tiny model
  python -m rlhfx.main --config=configs/sft_hh.py --workdir=/gcs/bucket/sft_hh \\
      --config.model.init_from=openai-community/gpt2 --config.data.train_files=train.jsonl.gz

Variants: "" (GPT-2 small from a Hugging Face checkpoint, bf16 compute), "tiny" (CPU smoke run).
"""

from rlhfx.config import HH_HARMLESS_TEST, base_config, use_hh_pairs, use_tiny_cpu_model


def get_config(arg=None):
  config = base_config("sft")
  use_hh_pairs(config, [HH_HARMLESS_TEST], input_format="hh_chosen")  # prompt + chosen reply; data.* in rlhfx/config.py
  config.model.init_from = "openai-community/gpt2"  # Hugging Face dir or hub id
  config.model.dtype = "bfloat16"  # compute dtype (params stay float32)
  config.train.global_batch_size = 32  # rows per step
  config.train.num_steps = 2000  # optimizer steps
  config.train.log_every = 20  # console and metrics
  config.train.eval_every = 200  # eval loss
  config.train.checkpoint_every = 500  # checkpoints
  config.optim.learning_rate = 2e-5  # fine-tuning rate
  config.optim.warmup_steps = 100  # linear warmup
  config.optim.weight_decay = 0.01  # AdamW decay on matrices
  if arg == "tiny":
    use_tiny_cpu_model(config)  # model.* and data.* for CPU
    config.train.global_batch_size = 8  # rows per step
    config.train.num_steps = 50  # a smoke run
    config.train.log_every = 10  # console and metrics
    config.train.eval_every = 25  # eval loss
    config.train.checkpoint_every = 25  # checkpoints
    config.optim.learning_rate = 1e-3  # a tiny random model learns fast
    config.optim.warmup_steps = 5  # linear warmup
  elif arg:
    raise ValueError(f"configs/sft_hh.py: unknown variant {arg!r}; expected '' or 'tiny'")
  return config.lock()


def sweep():
  """Learning rate x batch size."""
  return [{"optim.learning_rate": lr, "train.global_batch_size": b} for lr in (1e-5, 2e-5, 5e-5) for b in (32, 64)]
