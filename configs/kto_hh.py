"""KTO on Anthropic HH, the pairs unpaired: each chosen reply a desirable example, each rejected one undesirable.

  python -m rlhfx.main --config=configs/kto_hh.py:tiny --workdir=/tmp/kto_hh                # CPU
  python -m rlhfx.main --config=configs/kto_hh.py --workdir=/gcs/bucket/kto \\
      --config.model.init_from=/path/to/sft/hf

configs/dpo_hh.py (model, lengths, steps, learning rates, its `:tiny` variant) with KTO's loss and data.
Your own unpaired data: {"prompt", "completion", "label"} records with --config.data.input_format=unpaired.
KTO (Ethayarajh et al. 2024) needs no pairs; from pairs it sees each pair's two replies as two examples (as
TRL's `unpair_preference_dataset`), split by prompt so both stay in the same split, so a step's batch of
`train.global_batch_size` rows holds examples, not pairs. Its held-out line: the mean implicit reward of
desirable and of undesirable replies, and their gap.
Variants: "" (GPT-2-size SFT checkpoint, bf16 compute), "tiny" (CPU: tiny random model, GPT-2 BPE).
"""

import pathlib

from rlhfx.config import load


def get_config(arg=None):
  if arg not in (None, "", "tiny"):
    raise ValueError(f"configs/kto_hh.py: unknown variant {arg!r}; expected '' or 'tiny'")
  config = load(str(pathlib.Path(__file__).with_name("dpo_hh.py")) + (f":{arg}" if arg else ""))
  config.data.input_format = "hh_unpaired"  # 2 examples per pair, split by prompt (rlhfx.data.formats)
  config.dpo.loss = "kto"  # KTO (rlhfx.losses.preference.kto_loss)
  config.dpo.desirable_weight = 1.0  # weight of desirable examples (1:1 here: one of each per pair)
  config.dpo.undesirable_weight = 1.0  # weight of undesirable examples
  return config


def sweep():
  """beta x desirable weight."""
  return [{"dpo.beta": b, "dpo.desirable_weight": w} for b in (0.05, 0.1, 0.3) for w in (1.0, 1.33)]
