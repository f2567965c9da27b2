"""KTO on Anthropic HH, the pairs unpaired: each chosen reply a desirable example, each rejected one undesirable.

  python -m rlhfx.main --config=configs/kto_hh.py:tiny --workdir=/tmp/kto_hh                # CPU
  python -m rlhfx.main --config=configs/kto_hh.py --workdir=/gcs/bucket/kto \\
      --config.model.init_from=/path/to/sft/hf

Your own unpaired data: {"prompt", "completion", "label"} records with --config.data.input_format=unpaired.
KTO (Ethayarajh et al. 2024) needs no pairs; from pairs it sees each pair's two replies as two examples (as
TRL's `unpair_preference_dataset`), split by prompt so both stay in the same split. Its held-out line: the
mean implicit reward of desirable and of undesirable replies, and their gap.
Variants: "" (GPT-2-size SFT checkpoint, bf16 compute), "tiny" (CPU: tiny random model, GPT-2 BPE).
"""

from rlhfx.config import HH_HARMLESS_TEST, base_config, use_hh_pairs, use_tiny_cpu_model


def get_config(arg=None):
  config = base_config("dpo")
  use_hh_pairs(config, [HH_HARMLESS_TEST], "hh_unpaired")  # 2 examples per pair; data.* in rlhfx/config.py
  config.data.eval_fraction = 0.135  # about 312 held-out pairs (624 examples)
  config.model.init_from = "openai-community/gpt2"  # ideally the SFT model's Hugging Face export
  config.model.dtype = "bfloat16"  # compute dtype
  config.dpo.loss = "kto"  # KTO (rlhfx.losses.preference.kto_loss)
  config.dpo.beta = 0.1  # KL strength
  config.dpo.desirable_weight = 1.0  # weight of desirable examples (1:1 here: one of each per pair)
  config.dpo.undesirable_weight = 1.0  # weight of undesirable examples
  config.dpo.reference = "frozen"  # a frozen copy of the initial policy
  config.model.lm_head_chunk = 128  # LM head over 128 positions at a time
  config.train.global_batch_size = 32  # examples per step (KTO's KL baseline is over the batch)
  config.train.num_steps = 1000  # optimizer steps
  config.train.log_every = 20  # console and metrics
  config.train.eval_every = 200  # held-out rewards of desirable and undesirable replies
  config.train.checkpoint_every = 500  # checkpoints
  config.optim.learning_rate = 5e-7  # the DPO family's usual rate
  config.optim.warmup_steps = 100  # linear warmup
  config.optim.schedule = "constant"  # after warmup
  if arg == "tiny":
    use_tiny_cpu_model(config, max_length=192)  # model.* and data.* for CPU
    config.model.lm_head_chunk = 64  # LM-head chunks
    config.train.global_batch_size = 16  # examples per step
    config.train.num_steps = 100  # a few CPU minutes
    config.train.log_every = 10  # console and metrics
    config.train.eval_every = 50  # held-out rewards
    config.train.checkpoint_every = 50  # checkpoints
    config.optim.learning_rate = 1e-3  # a random tiny model moves fast
    config.optim.warmup_steps = 10  # linear warmup
  elif arg:
    raise ValueError(f"configs/kto_hh.py: unknown variant {arg!r}; expected '' or 'tiny'")
  return config.lock()


def sweep():
  """beta x desirable weight."""
  return [{"dpo.beta": b, "dpo.desirable_weight": w} for b in (0.05, 0.1, 0.3) for w in (1.0, 1.33)]
