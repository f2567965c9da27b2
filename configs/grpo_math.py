"""GRPO with verifiable rewards: math answers checked by math-verify, plus a format reward (RLVR).

  pip install 'rlhfx[math]'
  python -m rlhfx.main --config=configs/grpo_math.py --workdir=/tmp/grpo_math          # Qwen2.5-0.5B-Instruct
  python -m rlhfx.main --config=configs/grpo_math.py:tiny --workdir=/tmp/grpo_math_tiny  # CPU, a minute

`:tiny` runs the plumbing only (sampling, math-verify, think_format, the update, evaluation,
checkpoints): a random byte-level policy never writes a right answer or the format, so every
score is 0, every group ties, and its summary says there was no learning signal.

Prompts come with a gold `answer` column; every text reward function receives that column
(and any other) as a keyword argument, one value per completion (rlhfx.reward_functions).
The score is 1.0 x math_answer (1 when the final answer, or the text inside
<answer>...</answer>, equals the gold answer) + 0.2 x think_format (1 when the completion is
<think>...</think><answer>...</answer>); each is logged as rewards/<name>/mean.

The built-in "arithmetic" task ("What is 12 + 7? Think inside <think></think>, then answer
inside <answer></answer>.", answer "19") needs no download. Your own
data: JSONL/Parquet records such as {"prompt": [{"role": "user", "content": "..."}],
"answer": "42"} (GSM8K's final answers, say):
  --config.data.builtin= --config.data.train_files="('gsm8k_train.jsonl',)"
"""

from rlhfx.config import base_config

def get_config(arg=None):
  config = base_config("grpo")
  config.data.builtin = "arithmetic"  # prompts with a gold `answer` column, generated in code
  config.data.eval_fraction = 0.02  # held-out prompts for eval/scores and eval/rewards/*
  config.scoring.functions = ("math_answer", "think_format")  # rlhfx.reward_functions
  config.scoring.weights = (1.0, 0.2)  # the answer counts most
  config.rollout.group_size = 8  # completions per prompt
  config.rollout.temperature = 1.0  # sampling temperature
  config.grpo.beta = 0.0  # no KL term, no reference forward pass (DAPO / Dr.GRPO practice for RLVR)
  config.grpo.aggregation = "token_mean"  # DAPO's token-level mean
  if arg == "tiny":
    config.model.preset = "tiny"  # a random byte-level 2-layer model: the plumbing, not the learning
    config.model.vocab_size = 259  # the byte tokenizer
    config.data.tokenizer = "builtin:bytes"  # one token per byte
    config.data.max_length = 112  # prompt + completion bytes
    config.data.max_prompt_length = 96  # prompt bytes
    config.data.buckets = (96,)  # one prompt shape
    config.rollout.max_new_tokens = 16  # completion bytes
    config.rollout.group_size = 4  # completions per prompt
    config.train.global_batch_size = 4  # prompts per iteration
    config.train.num_steps = 6  # iterations
    config.train.log_every = 1  # every iteration in metrics.jsonl
    config.train.eval_every = 3  # held-out scores and rewards
    config.train.eval_batches = 1  # one batch of held-out prompts
    config.train.checkpoint_every = 3  # checkpoints
    config.train.log_samples_every = 3  # sample completions
    config.train.export_hf = False  # a toy policy
    config.optim.learning_rate = 1e-3  # small random model
    config.optim.warmup_steps = 0  # no warmup
  elif not arg:
    config.model.init_from = "Qwen/Qwen2.5-0.5B-Instruct"  # hub id or a local copy
    config.model.dtype = "bfloat16"  # compute dtype
    config.data.max_length = 512  # prompt + completion tokens
    config.data.max_prompt_length = 128  # prompt tokens
    config.data.buckets = (128,)  # one prompt shape
    config.rollout.max_new_tokens = 384  # room to think
    config.train.global_batch_size = 16  # prompts per iteration (128 completions)
    config.train.num_steps = 200  # iterations
    config.optim.learning_rate = 1e-6  # a pretrained policy
  else:
    raise ValueError(f"configs/grpo_math.py: unknown variant {arg!r}; expected '' or 'tiny'")
  return config.lock()


def sweep():
  """Format-reward weight x group size."""
  return [{"scoring.weights": (1.0, w), "rollout.group_size": g} for w in (0.0, 0.2) for g in (4, 8)]
