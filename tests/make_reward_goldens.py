"""Regenerate tests/goldens/reward_<family>/: tiny random `*ForSequenceClassification` reward models and
transformers' own scores.

torch is never a dependency of rlhfx or its tests; this script runs in the virtualenv of
tests/make_goldens.py:

  /tmp/venv-torch/bin/python tests/make_reward_goldens.py

Each golden is a directory with config.json + model.safetensors (save_pretrained; num_labels=1,
pad_token_id=0) and expected.npz holding `tokens`, `mask` (right padding with the pad id) and
`scores` [B] from transformers' forward pass, fp32, eager attention.
"""

import copy
import pathlib

import numpy as np
import torch
import transformers

from make_goldens import MODELS

OUT = pathlib.Path(__file__).parent / "goldens"
FAMILIES = {"gpt2": transformers.GPT2ForSequenceClassification, "llama": transformers.LlamaForSequenceClassification,
            "qwen2": transformers.Qwen2ForSequenceClassification}
PAD = 0


def main():
  torch.manual_seed(1)
  gen = np.random.default_rng(1)
  for name, cls in FAMILIES.items():
    config = copy.deepcopy(MODELS[name])
    config.num_labels, config.pad_token_id, config._attn_implementation = 1, PAD, "eager"
    model = cls(config).float().eval()
    with torch.no_grad():  # random init is small; widen it (the score head too) so errors would show
      for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    directory = OUT / f"reward_{name}"
    model.save_pretrained(directory)
    (directory / "generation_config.json").unlink(missing_ok=True)
    lengths = [48, 31, 17, 5]
    tokens = np.full((len(lengths), max(lengths)), PAD)
    for b, n in enumerate(lengths):
      tokens[b, :n] = gen.integers(3, config.vocab_size, size=n)
    mask = (tokens != PAD).astype(np.int64)
    with torch.no_grad():
      scores = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
    np.savez(directory / "expected.npz", tokens=tokens, mask=mask, scores=scores)
    print(name, scores)


if __name__ == "__main__":
  main()
