"""Shared driver of benchmarks/dpo_step.py and reward_step.py: the same flags and JSON fields as
../shared/bench/trl/{dpo_step,rm_step}.py, on a random GPT-2-shaped model and fixed-length synthetic pairs."""

import argparse
import json
import os
import platform
import resource
import statistics
import time


def add_model_flags(p: argparse.ArgumentParser) -> None:
  """The GPT-2-shaped model flags of ../shared/bench/trl's scripts, plus --preset."""
  p.add_argument("--n-layer", type=int, default=2)
  p.add_argument("--n-embd", type=int, default=128)
  p.add_argument("--n-head", type=int, default=4)
  p.add_argument("--vocab", type=int, default=1024)
  p.add_argument("--n-positions", type=int, default=None)
  p.add_argument("--preset", default=None, help="an rlhfx preset (e.g. llama3.2-1b) instead of the GPT-2 flags")


def print_record(record: dict, out: str | None) -> None:
  """Print one JSON line (and append it to `out`)."""
  line = json.dumps(record)
  print(line, flush=True)
  if out:
    with open(out, "a") as f:
      f.write(line + "\n")


def parse(description: str, dpo: bool):
  p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_flags(p)
  p.add_argument("--seq", type=int, default=128, help="prompt + completion tokens")
  p.add_argument("--prompt-len", type=int, default=None, help="default seq // 2")
  p.add_argument("--batch", type=int, default=4, help="preference pairs per step")
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps (the first one compiles)")
  p.add_argument("--lr", type=float, default=1e-6)
  p.add_argument("--max-grad-norm", type=float, default=1.0)
  p.add_argument("--bf16", action="store_true", help="bf16 compute, float32 parameters")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--threads", type=int, default=None, help="accepted for parity with TRL's scripts; unused")
  p.add_argument("--grad-ckpt", action="store_true", help="remat every layer (TRL: gradient checkpointing)")
  p.add_argument("--attention", default="auto", choices=["auto", "xla", "splash", "cudnn"],  # config.model.attention
                 help="whole-sequence attention (auto: splash on TPU, cudnn on GPU, xla on CPU)")
  p.add_argument("--eigen-threads", default="on", choices=["on", "off"])
  p.add_argument("--out", default=None)
  if dpo:
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--loss-type", default="sigmoid")
    p.add_argument("--chunk-size", type=int, default=0, help="LM-head chunk (0 = whole sequence)")
    p.add_argument("--window", type=int, default=None,
                   help="LM-head positions per row (default: the completion length; 0 = every position)")
  args = p.parse_args()
  if args.eigen_threads == "off":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
  return args


def compute_dtype(args) -> str:
  """What a config asking for bf16 computes in on this backend (rlhfx.models.load.compute_dtype)."""
  import jax

  from rlhfx.models.load import compute_dtype

  return compute_dtype("bfloat16" if args.bf16 else "float32", jax.default_backend())


def attention(args) -> str:
  import jax

  from rlhfx.models.load import resolve_attention

  return resolve_attention(args.attention, jax.default_backend())


def model_config(args):
  from rlhfx.models import ModelConfig, get_preset

  if args.preset:
    config = get_preset(args.preset, dtype=compute_dtype(args), attention=attention(args),
                        remat="full" if args.grad_ckpt else "none", max_seq_len=max(args.seq, 1024))
    args.vocab, args.n_layer = config.vocab_size, config.n_layers
    args.n_embd, args.n_head = config.d_model, config.n_heads
    return config
  return ModelConfig(vocab_size=args.vocab, d_model=args.n_embd, n_layers=args.n_layer, n_heads=args.n_head,
                     max_seq_len=args.n_positions or max(1024, args.seq), norm="layernorm", mlp="gelu",
                     positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True,
                     dtype=compute_dtype(args), remat="full" if args.grad_ckpt else "none", arch="gpt2",
                     attention=attention(args))


def pairs(args):
  """Fixed-shape batch: every row is `seq` tokens, the completion is the second half."""
  import numpy as np

  rng = np.random.default_rng(args.seed)
  prompt = args.prompt_len if args.prompt_len is not None else args.seq // 2
  batch = {}
  shared_prompt = rng.integers(3, args.vocab, size=(args.batch, prompt))
  for side in ("chosen", "rejected"):
    completion = rng.integers(3, args.vocab, size=(args.batch, args.seq - prompt))
    batch[f"{side}_tokens_BxT"] = np.concatenate([shared_prompt, completion], 1).astype(np.int32)
    batch[f"{side}_mask_BxT"] = np.ones((args.batch, args.seq), bool)
    batch[f"{side}_loss_mask_BxT"] = np.arange(args.seq)[None].repeat(args.batch, 0) >= prompt
  return batch


def optim_config(args):
  from rlhfx.config import base_config

  cfg = base_config("dpo").optim
  cfg.learning_rate, cfg.warmup_steps, cfg.schedule = args.lr, 0, "constant"
  cfg.clip_norm, cfg.weight_decay = args.max_grad_norm, 0.0
  return cfg


def time_steps(step, state, batch, args):
  """(times of all steps, final state); each step waits for its result."""
  import jax

  times = []
  for _ in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  return times, state


def matmul_peak_gflops(dtype):
  """A 2048 x 2048 matmul in JAX on this machine, as the roofline for MFU."""
  import jax
  import jax.numpy as jnp

  a = jnp.ones((2048, 2048), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(5):
    f(a).block_until_ready()
  return 5 * 2 * 2048**3 / (time.perf_counter() - t0) / 1e9


def emit(args, algo: str, times, flops_per_step: float, extra: dict):
  import jax
  import jax.numpy as jnp

  measured = times[args.warmup:]
  med = statistics.median(measured)
  tokens_per_step = 2 * args.batch * args.seq
  record = {
      "impl": "rlhfx", "algo": algo,
      "config": {"model": "gpt2", "n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head,
                 "vocab": args.vocab, "seq": args.seq, "batch": args.batch, "steps": args.steps,
                 "warmup": args.warmup, "dtype": "bf16-compute" if args.bf16 else "float32",
                 "compute_dtype": compute_dtype(args), "attention": attention(args),
                 "device": jax.devices()[0].platform, "tokens_per_step": tokens_per_step,
                 "eigen_threads": args.eigen_threads, "remat": "full" if args.grad_ckpt else "none", **extra},
      "step_s_median": med,
      "pairs_per_s": args.batch / med,
      "tokens_per_s": tokens_per_step / med,
      "compile_s": times[0] - med,
      "achieved_gflops": flops_per_step / med / 1e9,
      "matmul_peak_gflops": matmul_peak_gflops(jnp.dtype(compute_dtype(args))),
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
      "step_s_all": [round(t, 6) for t in times],
      "versions": {"python": platform.python_version(), "jax": jax.__version__},
  }
  print_record(record, args.out)
