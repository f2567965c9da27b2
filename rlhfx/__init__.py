"""rlhfx: preference tuning of language models in JAX/Flax (SFT, reward models, DPO, PPO, GRPO).

Key of shape letters used in array names across the package:
  B batch, T sequence, S key/cache length, P prompt, C completion, V vocab,
  D model width, N query heads, K kv heads, H head dim, F MLP width, L layers,
  G samples per prompt.
"""

import os

__version__ = "0.1.0"

# transformers (tokenizers and configs only here) says at import that PyTorch is missing, which rlhfx never needs;
# its real warnings stay.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
