"""DPO with LoRA adapters: the base weights stay frozen and serve as the reference (no second copy).

  python -m rlhfx.main --config=configs/dpo_lora.py:tiny --workdir=/tmp/dpo_lora             # CPU
  python -m rlhfx.main --config=configs/dpo_lora.py --workdir=/gcs/bucket/dpo_lora \\
      --config.model.init_from=Qwen/Qwen3-0.6B --config.data.input_format=sharegpt \\
      --config.data.train_files=dpo_en_demo.json

Writes the adapters to <workdir>/adapters (their own tree) and the merged policy to <workdir>/hf.
"""

from rlhfx.config import HH_HARMLESS_TEST, base_config, use_hh_pairs, use_tiny_cpu_model


def get_config(arg=None):
  config = base_config("dpo")
  use_hh_pairs(config, [HH_HARMLESS_TEST])  # data.* fields: see rlhfx/config.py
  config.data.eval_fraction = 0.135  # about 312 held-out pairs
  config.model.init_from = "openai-community/gpt2"  # the model to adapt
  config.model.dtype = "bfloat16"  # compute dtype
  config.lora.rank = 16  # adapter rank
  config.lora.alpha = 32.0  # scale = alpha / rank
  config.lora.patterns = ("attn/(q|k|v|o)_proj/kernel", "mlp/(gate|up|down)_proj/kernel")  # adapted kernels
  config.dpo.reference = "lora_base"  # the base weights without the adapter
  config.dpo.beta = 0.1  # KL strength
  config.model.lm_head_chunk = 128  # LM-head chunks
  config.train.global_batch_size = 32  # pairs per step
  config.train.num_steps = 1000  # optimizer steps
  config.train.log_every = 20  # console and metrics
  config.train.eval_every = 200  # held-out rewards/accuracies
  config.train.checkpoint_every = 500  # checkpoints
  config.optim.learning_rate = 5e-5  # adapters take larger steps than full fine-tuning
  config.optim.warmup_steps = 50  # linear warmup
  config.optim.schedule = "constant"  # after warmup
  if arg == "tiny":
    use_tiny_cpu_model(config, max_length=192)  # model.* and data.* for CPU
    config.lora.rank = 4  # adapter rank
    config.lora.alpha = 8.0  # scale 2
    config.model.lm_head_chunk = 64  # LM-head chunks
    config.train.global_batch_size = 16  # pairs per step
    config.train.num_steps = 100  # a few CPU minutes
    config.train.log_every = 10  # console and metrics
    config.train.eval_every = 50  # held-out rewards/accuracies
    config.train.checkpoint_every = 50  # checkpoints
    config.optim.learning_rate = 3e-3  # a random tiny model
    config.optim.warmup_steps = 10  # linear warmup
  elif arg:
    raise ValueError(f"configs/dpo_lora.py: unknown variant {arg!r}; expected '' or 'tiny'")
  return config.lock()


def sweep():
  """Rank x learning rate."""
  return [{"lora.rank": r, "lora.alpha": 2.0 * r, "optim.learning_rate": lr} for r in (8, 16) for lr in (2e-5, 5e-5)]
