"""Time rlhfx's KV-cache sampler on a random GPT-2-shaped model; prints one JSON line.

Same flags and shapes as ../shared/bench/trl/generate.py, so the two compare directly:

  python benchmarks/generate.py --n-layer 2 --n-embd 128 --n-head 4 --vocab 1024 \\
      --batch 4 --prompt-len 64 --new-tokens 64

Pure sampling (temperature 1, no top-k/top-p), no EOS, so every call makes exactly
batch * new_tokens tokens. The first call compiles and is reported as compile_s;
then the median of --repeats timed calls. `--eigen-threads off` sets
`--xla_cpu_multi_thread_eigen=false` (small shapes on CPU are often faster single-threaded).
"""

import argparse
import os
import platform
import resource
import statistics
import sys
import time

from _train_bench import add_model_flags, print_record


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_flags(p)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--prompt-len", type=int, default=64)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--eigen-threads", default="on", choices=["on", "off"])
  p.add_argument("--out", default=None, help="also append the JSON line to this file")
  args = p.parse_args()
  if args.eigen_threads == "off":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

  import jax
  import jax.numpy as jnp

  from rlhfx import sampling
  from rlhfx.models import ModelConfig, get_preset, init_params

  total = args.prompt_len + args.new_tokens
  if args.preset:
    config = get_preset(args.preset, dtype=args.dtype)
    args.vocab, args.n_layer = config.vocab_size, config.n_layers
    args.n_embd, args.n_head = config.d_model, config.n_heads
  else:
    config = ModelConfig(vocab_size=args.vocab, d_model=args.n_embd, n_layers=args.n_layer, n_heads=args.n_head,
                         max_seq_len=args.n_positions or max(1024, total), norm="layernorm", mlp="gelu",
                         positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True,
                         dtype=args.dtype, arch="gpt2")
  params = init_params(config, jax.random.key(args.seed))
  prompt = jax.random.randint(jax.random.key(args.seed + 1), (args.batch, args.prompt_len), 3, args.vocab)
  mask = jnp.ones_like(prompt, bool)

  def call(n_new, seed):
    out = sampling.generate(params, config, prompt, mask, jax.random.key(seed), max_new_tokens=n_new)
    return jax.block_until_ready(out)

  def timed(n_new):
    t0 = time.perf_counter()
    call(n_new, 0)
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(args.repeats):
      t0 = time.perf_counter()
      out = call(n_new, i + 1)
      times.append(time.perf_counter() - t0)
      assert int(out.mask_BxC.sum()) == args.batch * n_new
    return compile_s, times

  compile_s, gen_times = timed(args.new_tokens)
  first_compile_s, first_times = timed(1)
  med, first_med = statistics.median(gen_times), statistics.median(first_times)
  record = {
      "impl": "rlhfx", "algo": "generate", "backend": "rlhfx.sampling.generate (lax.while_loop, KV cache)",
      "config": {"model": "gpt2", "n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head,
                 "vocab": args.vocab, "batch": args.batch, "prompt_len": args.prompt_len,
                 "new_tokens": args.new_tokens, "repeats": args.repeats, "n_params": config.num_params(),
                 "dtype": args.dtype, "device": jax.devices()[0].platform, "eigen_threads": args.eigen_threads},
      "gen_s_median": med,
      "tokens_per_s": args.batch * args.new_tokens / med,
      "gen_s_all": [round(t, 6) for t in gen_times],
      "compile_s": compile_s - med,
      "first_token_s_median": first_med,
      "first_token_compile_s": first_compile_s - first_med,
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
      "versions": {"python": platform.python_version(), "jax": jax.__version__},
  }
  if args.new_tokens > 1 and med > first_med:
    record["decode_tokens_per_s_est"] = args.batch * (args.new_tokens - 1) / (med - first_med)
  print_record(record, args.out)


if __name__ == "__main__":
  sys.exit(main())
