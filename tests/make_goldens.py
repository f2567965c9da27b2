"""Regenerate tests/goldens/: tiny random Hugging Face models and their PyTorch logits.

torch is never a dependency of rlhfx or its tests; this script is the only place it
runs. In a separate virtualenv:

  python3 -m venv /tmp/venv-torch
  /tmp/venv-torch/bin/pip install torch==2.13.0 'transformers>=5' safetensors numpy
  /tmp/venv-torch/bin/python tests/make_goldens.py [name ...]    # all, or only these

Each golden is a directory with config.json + model.safetensors (save_pretrained)
and expected.npz holding `tokens`, `mask` and `logits` from transformers' own
forward pass, fp32, eager attention.
"""

import pathlib
import sys
import zlib

import numpy as np
import torch
import transformers

OUT = pathlib.Path(__file__).parent / "goldens"
COMMON = dict(vocab_size=96, tie_word_embeddings=False)
LLAMA_LIKE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, rms_norm_eps=1e-6)

MODELS = {
    "gpt2": transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=96,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    # GQA (4 query heads over 2 kv heads) and Llama-3 rope scaling with a short original context, so the
    # scaled, smoothed and unscaled frequency bands all occur.
    "llama": transformers.LlamaConfig(
        **COMMON, **LLAMA_LIKE, num_key_value_heads=2,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16)),
    "qwen2": transformers.Qwen2Config(**COMMON, **LLAMA_LIKE, num_key_value_heads=2),
    "qwen3": transformers.Qwen3Config(**{**COMMON, "tie_word_embeddings": True}, **LLAMA_LIKE,
                                      num_key_value_heads=2, head_dim=24),
    # A window shorter than the sequence, so the sliding-window mask matters.
    "mistral": transformers.MistralConfig(**COMMON, **LLAMA_LIKE, num_key_value_heads=1, sliding_window=5),
    # Gemma: (1 + w) norms, embeddings x sqrt(d), GeGLU, tied embeddings, head_dim != d / heads.
    "gemma": transformers.GemmaConfig(**{**COMMON, "tie_word_embeddings": True}, **LLAMA_LIKE, num_key_value_heads=1,
                                      head_dim=24),
    # Gemma 2: post-norms, sliding and full layers (window 5), query_pre_attn_scalar, and soft-caps small enough
    # to bend these scores and logits.
    "gemma2": transformers.Gemma2Config(
        **{**COMMON, "tie_word_embeddings": True}, **{**LLAMA_LIKE, "num_hidden_layers": 3}, num_key_value_heads=2,
        head_dim=24, query_pre_attn_scalar=32, sliding_window=5, attn_logit_softcapping=0.5,
        final_logit_softcapping=2.0, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    # Gemma 3: q/k norms, sliding layers with their own rope theta, linear rope scaling on the full layer.
    "gemma3": transformers.Gemma3TextConfig(
        **{**COMMON, "tie_word_embeddings": True}, **{**LLAMA_LIKE, "num_hidden_layers": 3}, num_key_value_heads=2,
        head_dim=24, query_pre_attn_scalar=24, sliding_window=5,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1000000.0),
                         "sliding_attention": dict(rope_type="default", rope_theta=10000.0)}),
}
SEEDED_BY_NAME = ("gemma", "gemma2", "gemma3")  # added later: each seeded by its name, made alone by name


def main(names):
  torch.manual_seed(0)
  gen = np.random.default_rng(0)
  for name, config in MODELS.items():
    if name in SEEDED_BY_NAME:
      torch.manual_seed(zlib.crc32(name.encode()))
      gen = np.random.default_rng(zlib.crc32(name.encode()))
    if names and name not in names:
      continue
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # random init is small; widen it so errors would show
      for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    directory = OUT / name
    model.save_pretrained(directory)
    (directory / "generation_config.json").unlink(missing_ok=True)  # not read by rlhfx
    # long rows (GPT-2: its 64 learned positions; the others 224 of 256), so that rope's slow frequencies turn far
    # enough for a rope_theta off by one to move logits past round-off, and far past mistral's window of 5
    length = 64 if name == "gpt2" else 224
    tokens = gen.integers(3, config.vocab_size, size=(2, length))
    mask = np.ones_like(tokens)
    mask[1, length * 3 // 4:] = 0  # right padding on the second row
    with torch.no_grad():
      logits = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
    np.savez(directory / "expected.npz", tokens=tokens.astype(np.int32), mask=mask.astype(bool), logits=logits)
    print(name, logits.shape, sum(f.stat().st_size for f in directory.iterdir()), "bytes")


if __name__ == "__main__":
  main(sys.argv[1:])
