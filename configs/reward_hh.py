"""Reward model on Anthropic HH preference pairs (Bradley-Terry loss, reward read at the last token).

  python -m rlhfx.main --config=configs/reward_hh.py:tiny --workdir=/tmp/reward_hh             # CPU minutes
  python -m rlhfx.main --config=configs/reward_hh.py --workdir=/gcs/bucket/rm \\
      --config.model.init_from=/path/to/sft/hf --config.data.train_files=train.jsonl.gz

Variants: "" (from an SFT'd GPT-2-size Hugging Face checkpoint), "tiny" (CPU: a small
random model, GPT-2 tokenizer, 312 held-out pairs of the harmless-base test file).
"""

from rlhfx.config import HH_HARMLESS_TEST, base_config, use_hh_pairs, use_tiny_cpu_model


def get_config(arg=None):
  config = base_config("reward")
  use_hh_pairs(config, [HH_HARMLESS_TEST])  # data.* fields: see rlhfx/config.py
  config.data.eval_fraction = 0.135  # about 312 of the 2,303 usable pairs held out
  config.model.init_from = "openai-community/gpt2"  # ideally the SFT model's Hugging Face export
  config.model.dtype = "bfloat16"  # compute dtype
  config.train.global_batch_size = 32  # pairs per step
  config.train.num_steps = 1000  # optimizer steps
  config.train.log_every = 20  # console and metrics
  config.train.eval_every = 200  # held-out accuracy
  config.train.checkpoint_every = 500  # checkpoints
  config.train.export_hf = True  # also as a Hugging Face *ForSequenceClassification: <workdir>/reward_model/hf
  config.reward.export_pad_token = "<|pad|>"  # GPT-2 has none: a distinct one, so transformers scores as rlhfx
  config.optim.learning_rate = 1e-5  # fine-tuning rate
  config.optim.warmup_steps = 50  # linear warmup
  config.reward.center_coef = 0.01  # keep rewards near 0
  if arg == "tiny":
    use_tiny_cpu_model(config, max_length=256)  # model.* and data.* for CPU
    config.train.global_batch_size = 16  # pairs per step
    config.train.num_steps = 300  # a few CPU minutes
    config.train.log_every = 25  # console and metrics
    config.train.eval_every = 100  # held-out accuracy
    config.train.checkpoint_every = 100  # checkpoints
    config.optim.learning_rate = 1e-3  # random small model
    config.optim.warmup_steps = 20  # linear warmup
    config.optim.weight_decay = 0.01  # AdamW decay on matrices
  elif arg:
    raise ValueError(f"configs/reward_hh.py: unknown variant {arg!r}; expected '' or 'tiny'")
  return config.lock()


def sweep():
  """Learning rate x centring."""
  return [{"optim.learning_rate": lr, "reward.center_coef": c} for lr in (5e-6, 1e-5, 3e-5) for c in (0.0, 0.01)]
