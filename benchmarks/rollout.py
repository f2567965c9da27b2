"""Generated tokens/s of the static sampler and of the continuous-batching engine; prints one JSON line.

  python benchmarks/rollout.py --size tiny     # the tiny preset (2 layers, width 64): per-step overhead
  python benchmarks/rollout.py --size small    # GPT-2 small's shape (12 layers, width 768, vocab 50257)

The same random model, the same prompts (16 x 4 samples = 64 rows by default) and the same
engine settings in both workloads:
- uniform: no EOS, every completion --new-tokens long;
- mix: the final norm's bias is moved toward the EOS embedding until EOS has probability
  about 4 / --new-tokens per step, so lengths are roughly geometric with a mean near a
  quarter of the maximum (the measured mean is reported).
Keys `static_uniform`, `engine_uniform`, `static_mix`, `engine_mix`: generated tokens (EOS
included, padding not) per second, the median of --repeats timed calls after a compiling
one; the ratios engine / static; the share of rows whose tokens are the static sampler's
(1.0 but for float round-off across batch widths); the machine's CPU and the flags
matmul speed depends on.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _train_bench import print_record  # noqa: E402
from compare_trl import machine  # noqa: E402

SIZES = {"tiny": dict(n_layers=2, d_model=64, n_heads=4, vocab_size=259, new_tokens=64),
         "small": dict(n_layers=12, d_model=768, n_heads=12, vocab_size=50257, new_tokens=128)}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", default="tiny", choices=sorted(SIZES))
  p.add_argument("--prompts", type=int, default=16)
  p.add_argument("--group-size", type=int, default=4)
  p.add_argument("--prompt-len", type=int, default=32)
  p.add_argument("--new-tokens", type=int, default=None, help="default: 64 (tiny), 128 (small)")
  p.add_argument("--slots", type=int, default=0, help="engine slots (default: one per row)")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--out", default=None, help="also append the JSON line to this file")
  args = p.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np

  from rlhfx import engine, sampling
  from rlhfx.models import ModelConfig, init_params

  size = dict(SIZES[args.size])
  new_tokens = args.new_tokens or size.pop("new_tokens")
  size.pop("new_tokens", None)
  config = ModelConfig(**size, max_seq_len=max(1024, args.prompt_len + new_tokens), norm="layernorm", mlp="gelu",
                       positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True,
                       arch="gpt2")
  params = init_params(config, jax.random.key(0))
  eos = config.vocab_size - 1
  rows = args.prompts * args.group_size
  slots = args.slots or rows
  prompts_NxP = np.asarray(jax.random.randint(jax.random.key(1), (args.prompts, args.prompt_len), 3, eos))
  mask_NxP = np.ones_like(prompts_NxP, bool)
  rng = jax.random.key(2)

  def mix_params(target: float):
    """params whose final-norm bias leans toward EOS's embedding by the factor that gives it probability
    `target` at the prompts' last position (bisection on the factor)."""
    embedding = params["embed"]["embedding"][eos]

    def leaned(scale):
      return {**params, "final_norm": {**params["final_norm"],
                                       "bias": params["final_norm"]["bias"] + scale * embedding}}

    def p_eos(scale):
      from rlhfx.models import Transformer

      logits = Transformer(config).apply({"params": leaned(scale)}, jnp.asarray(prompts_NxP), jnp.asarray(mask_NxP))
      return float(jax.nn.softmax(logits[:, -1], axis=-1)[:, eos].mean())

    lo, hi = 0.0, 1.0
    while p_eos(hi) < target:
      hi *= 2
    for _ in range(30):
      mid = (lo + hi) / 2
      lo, hi = (mid, hi) if p_eos(mid) < target else (lo, mid)
    return leaned(hi)

  def timed(fn):
    out = jax.block_until_ready(fn())  # compiles
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      out = jax.block_until_ready(fn())
      times.append(time.perf_counter() - t0)
    generated = int(np.asarray(out.mask_BxC).sum())
    return generated / statistics.median(times), generated / rows, out

  record = {"impl": "rlhfx", "bench": "rollout", "size": args.size, "rows": rows, "prompts": args.prompts,
            "group_size": args.group_size, "prompt_len": args.prompt_len, "new_tokens": new_tokens,
            "slots": slots, "engine_stages": engine.STAGES}
  for workload, model_params, eos_id in (("uniform", params, None), ("mix", mix_params(4 / new_tokens), eos)):
    rows_NxP = np.repeat(prompts_NxP, args.group_size, axis=0)
    rows_mask = np.repeat(mask_NxP, args.group_size, axis=0)
    static = timed(lambda: sampling.generate(model_params, config, rows_NxP, rows_mask, rng,
                                             max_new_tokens=new_tokens, eos_id=eos_id))
    ours = timed(lambda: engine.generate(model_params, config, prompts_NxP, mask_NxP, rng,
                                         group_size=args.group_size, slots=slots, max_new_tokens=new_tokens,
                                         eos_id=eos_id))
    # the same tokens up to float round-off: a batch of another width may round a logit differently, and a
    # draw that lands that close to a CDF boundary flips (and the row goes its own way from there)
    same = np.all(np.asarray(static[2].tokens_BxC) == np.asarray(ours[2].tokens_BxC), axis=1)
    record[f"rows_equal_{workload}"] = float(same.mean())
    record[f"static_{workload}"], record[f"engine_{workload}"] = static[0], ours[0]
    record[f"ratio_{workload}"] = ours[0] / static[0]
    record[f"mean_length_{workload}"] = static[1]
  record.update(machine=machine(), jax=jax.__version__, device=jax.devices()[0].device_kind)
  print_record(record, args.out)


if __name__ == "__main__":
  main()
