"""PPO on Anthropic HH prompts against a reward model trained with configs/reward_hh.py.

  python -m rlhfx.main --config=configs/reward_hh.py:tiny --workdir=/tmp/reward_hh      # first: the reward model
  python -m rlhfx.main --config=configs/ppo_hh.py:tiny --workdir=/tmp/ppo_hh            # CPU minutes
  python -m rlhfx.main --config=configs/ppo_hh.py --workdir=/gcs/bucket/ppo \\
      --config.model.init_from=/path/to/sft/hf --config.scoring.model=/gcs/bucket/rm

The prompts are the conversations of the harmless-base pairs up to the last
"Assistant:"; the reward model's scores are normalised with the mean/std its run
stored; the critic starts as a copy of the reward model (`ppo.value_model=separate`).
Variants: "" (GPT-2-size SFT policy, bf16), "tiny" (CPU: random tiny policy, GPT-2 BPE,
reward model from /tmp/reward_hh unless --config.scoring.model says otherwise).
"""

from rlhfx.config import HH_HARMLESS_TEST, base_config, use_hh_pairs, use_tiny_cpu_model


def get_config(arg=None):
  config = base_config("ppo")
  use_hh_pairs(config, [HH_HARMLESS_TEST], "hh_prompts")  # data.* fields
  config.data.eval_fraction = 0.05  # held-out prompts for eval/scores and eval/kl
  config.model.init_from = "openai-community/gpt2"  # ideally the SFT model's Hugging Face export
  config.model.dtype = "bfloat16"  # compute dtype
  config.scoring.model = "/tmp/reward_hh"  # the reward run (its reward_model/ folder)
  config.scoring.missing_eos_penalty = 1.0  # completions cut at max_new_tokens lose 1 (normalised) point
  config.rollout.max_new_tokens = 64  # reply tokens
  config.rollout.temperature = 0.7  # sampling temperature
  config.train.global_batch_size = 64  # prompts per iteration
  config.train.num_steps = 500  # iterations
  config.train.log_every = 5  # console and metrics
  config.train.eval_every = 50  # held-out score and KL
  config.train.checkpoint_every = 50  # checkpoints
  config.optim.learning_rate = 3e-6  # TRL's PPO default
  config.optim.warmup_steps = 0  # no warmup
  config.optim.schedule = "constant"  # constant rate
  config.ppo.epochs = 4  # passes over each rollout
  config.ppo.minibatches = 4  # updates per pass
  config.ppo.kl_coef = 0.05  # per-token KL penalty
  if arg == "tiny":
    use_tiny_cpu_model(config, max_length=256)  # model.* and data.* for CPU
    config.data.max_prompt_length = 128  # prompt tokens (the most recent turns)
    config.data.buckets = (128,)  # one prompt shape
    config.rollout.max_new_tokens = 24  # reply tokens
    config.rollout.temperature = 1.0  # sampling temperature
    config.train.global_batch_size = 8  # prompts per iteration
    config.train.num_steps = 20  # iterations
    config.train.eval_every = 10  # held-out score and KL
    config.train.eval_batches = 2  # 16 held-out prompts
    config.train.export_hf = False  # a toy policy
    config.optim.learning_rate = 1e-3  # random small model
    config.ppo.minibatches = 2  # updates per pass
  elif arg:
    raise ValueError(f"configs/ppo_hh.py: unknown variant {arg!r}; expected '' or 'tiny'")
  return config.lock()


def sweep():
  """KL coefficient x learning rate."""
  return [{"ppo.kl_coef": k, "optim.learning_rate": lr} for k in (0.02, 0.05, 0.1) for lr in (1e-6, 3e-6)]
