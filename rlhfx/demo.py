"""Generation demo: sample from a model with the jit-compiled KV-cache sampler.

  python -m rlhfx.demo                                   # built-in tiny model, random weights
  python -m rlhfx.demo --llama2c=hf://karpathy/tinyllamas/stories260K/stories260K.bin \
      --tokenizer=hf://karpathy/tinyllamas/stories260K/tok512.bin --prompt="Once upon a time"
  python -m rlhfx.demo --hf=path/to/hf_model_dir --prompt="Hello"
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from rlhfx import errors, sampling
from rlhfx.data.tokenize import TokenizerError, encode_prompt, llama2c_tokenizer
from rlhfx.models import get_preset, init_params
from rlhfx.models.convert import from_hf
from rlhfx.models.llama2c import from_llama2c

_LLAMA2C = flags.DEFINE_string("llama2c", None, "llama2.c checkpoint (.bin): a path or an hf:// file")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "llama2.c tokenizer (.bin) for --llama2c: a path or an hf:// file")
_HF = flags.DEFINE_string("hf", None, "Hugging Face model directory or hub id (tokenizer files alongside)")
_PROMPT = flags.DEFINE_string("prompt", "", "prompt text (needs a tokenizer); empty: start from BOS")
_NEW = flags.DEFINE_integer("max_new_tokens", 60, "tokens to generate per sample")
_SAMPLES = flags.DEFINE_integer("samples", 3, "number of samples (one batch)")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "softmax temperature; 0 = greedy")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "nucleus sampling mass")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")


def _load():
  """(config, params, tokenizer or None) for the chosen model."""
  if _LLAMA2C.value:
    config, params = from_llama2c(_LLAMA2C.value)
    return config, params, llama2c_tokenizer(_TOKENIZER.value) if _TOKENIZER.value else None
  if _HF.value:
    from transformers import AutoTokenizer

    config, params = from_hf(_HF.value)
    try:
      tokenizer = AutoTokenizer.from_pretrained(_HF.value)
    except (OSError, ValueError, TypeError) as e:  # no or damaged tokenizer files
      raise TokenizerError(f"--hf={_HF.value}: no usable tokenizer there ({type(e).__name__}: "
                           f"{(str(e).splitlines() or [''])[0][:150]})") from None
    return config, params, tokenizer
  config = get_preset("tiny")
  return config, init_params(config, jax.random.key(0)), None


def main(argv):
  del argv
  try:
    _demo()
  except errors.USER_ERRORS as e:  # a model directory, tokenizer or checkpoint that cannot be used: one line
    errors.report("rlhfx-demo", e)


def _demo():
  config, params, tokenizer = _load()
  prompt = [config.bos_token_id if config.bos_token_id is not None else 0]
  if _PROMPT.value:
    if tokenizer is None:
      raise app.UsageError("--prompt needs a tokenizer (--tokenizer with --llama2c, or --hf)")

    prompt = encode_prompt(tokenizer, _PROMPT.value, [])  # BOS first where the model was trained with it
  tokens, mask = sampling.pad_prompts([prompt] * _SAMPLES.value)
  kwargs = dict(max_new_tokens=_NEW.value, temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
                eos_id=config.eos_token_id)
  t0 = time.perf_counter()
  result = jax.block_until_ready(sampling.generate(params, config, jnp.asarray(tokens), jnp.asarray(mask),
                                                   jax.random.key(_SEED.value), **kwargs))
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  result = jax.block_until_ready(sampling.generate(params, config, jnp.asarray(tokens), jnp.asarray(mask),
                                                   jax.random.key(_SEED.value + 1), **kwargs))
  second = time.perf_counter() - t0
  n_tokens = int(result.mask_BxC.sum())
  print(f"model: {config.n_layers} layers, width {config.d_model}, {config.num_params():,} parameters "
        f"({'random weights' if not (_LLAMA2C.value or _HF.value) else 'pretrained'})")
  for i in range(_SAMPLES.value):
    ids = np.asarray(result.tokens_BxC[i])[np.asarray(result.mask_BxC[i])].tolist()
    text = tokenizer.decode(prompt + ids, skip_special_tokens=True) if tokenizer else f"token ids {ids}"
    print(f"sample {i}: {text}")
  print(f"compile + first call {first:.2f}s; compiled call {second * 1e3:.1f} ms for {n_tokens} tokens "
        f"({n_tokens / second:,.0f} tokens/s)")


def run():
  app.run(main)


if __name__ == "__main__":
  run()
