"""DPO on Anthropic HH preference pairs, from an SFT model, with a frozen reference copy.

  python -m rlhfx.main --config=configs/dpo_hh.py:tiny --workdir=/tmp/dpo_hh                # CPU
  python -m rlhfx.main --config=configs/dpo_hh.py --workdir=/gcs/bucket/dpo \\
      --config.model.init_from=/path/to/sft/hf --config.dpo.loss=ipo --config.dpo.beta=0.5

Variants: "" (GPT-2-size SFT checkpoint, bf16 compute), "tiny" (CPU: tiny random model, GPT-2 BPE).
Other losses: --config.dpo.loss=sigmoid|robust|ipo|hinge|simpo|orpo; reference modes:
--config.dpo.reference=frozen|precomputed (see configs/dpo_lora.py for lora_base).
"""

from rlhfx.config import HH_HARMLESS_TEST, base_config, use_hh_pairs, use_tiny_cpu_model


def get_config(arg=None):
  config = base_config("dpo")
  use_hh_pairs(config, [HH_HARMLESS_TEST])  # data.* fields: see rlhfx/config.py
  config.data.eval_fraction = 0.135  # about 312 held-out pairs
  config.model.init_from = "openai-community/gpt2"  # ideally the SFT model's Hugging Face export
  config.model.dtype = "bfloat16"  # compute dtype
  config.dpo.loss = "sigmoid"  # DPO
  config.dpo.beta = 0.1  # KL strength
  config.dpo.reference = "frozen"  # a frozen copy of the initial policy
  config.model.lm_head_chunk = 128  # LM head over 128 positions at a time
  config.train.global_batch_size = 32  # pairs per step
  config.train.num_steps = 1000  # optimizer steps
  config.train.log_every = 20  # console and metrics
  config.train.eval_every = 200  # held-out rewards/accuracies
  config.train.checkpoint_every = 500  # checkpoints
  config.optim.learning_rate = 5e-7  # DPO's usual rate
  config.optim.warmup_steps = 100  # linear warmup
  config.optim.schedule = "constant"  # after warmup
  if arg == "tiny":
    use_tiny_cpu_model(config, max_length=192)  # model.* and data.* for CPU
    config.model.lm_head_chunk = 64  # LM-head chunks
    config.train.global_batch_size = 16  # pairs per step
    config.train.num_steps = 100  # a few CPU minutes
    config.train.log_every = 10  # console and metrics
    config.train.eval_every = 50  # held-out rewards/accuracies
    config.train.checkpoint_every = 50  # checkpoints
    config.optim.learning_rate = 1e-3  # a random tiny model moves fast
    config.optim.warmup_steps = 10  # linear warmup
  elif arg:
    raise ValueError(f"configs/dpo_hh.py: unknown variant {arg!r}; expected '' or 'tiny'")
  return config.lock()


def sweep():
  """beta x loss."""
  return [{"dpo.beta": b, "dpo.loss": loss} for b in (0.05, 0.1, 0.3) for loss in ("sigmoid", "ipo")]
