"""SFT on the chosen replies of Anthropic HH (the usual first stage before a reward model and DPO/PPO).

  python -m rlhfx.main --config=configs/sft_hh.py:tiny --workdir=/tmp/sft_hh            # CPU, random tiny model
  python -m rlhfx.main --config=configs/sft_hh.py --workdir=gs://bucket/sft_hh \\
      --config.model.init_from=openai-community/gpt2 --config.data.train_files=train.jsonl.gz

Variants: "" (GPT-2 small from a Hugging Face checkpoint, bf16 compute), "tiny" (CPU smoke run).
"""

import pathlib

from rlhfx.config import base_config

HH = str(pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh_rlhf" /
         "harmless-base-test.jsonl.gz")


def get_config(arg=None):
  config = base_config("sft")
  config.data.train_files = (HH,)  # Anthropic HH JSONL(.gz) transcripts
  config.data.input_format = "hh_chosen"  # prompt = transcript up to the last "\n\nAssistant:", completion = chosen
  config.data.on_error = "skip"  # HH has a few unsplittable pairs and empty replies: count and skip them
  config.data.max_length = 512  # prompt + completion tokens
  config.data.max_prompt_length = 384  # prompt tokens (the most recent turns are kept)
  config.data.buckets = (128, 256, 512)  # padded lengths
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
    config.model.init_from = ""  # random init of a preset
    config.model.preset = "tiny"  # 2 layers, width 64
    config.model.vocab_size = 50257  # GPT-2's vocabulary
    config.model.dtype = "float32"  # CPU: f32
    config.data.tokenizer = str(pathlib.Path(HH).parents[1] / "gpt2_tokenizer")  # GPT-2 BPE files
    config.data.max_length = 256  # shorter rows on CPU
    config.data.max_prompt_length = 192  # prompt tokens
    config.data.buckets = (128, 256)  # padded lengths
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
