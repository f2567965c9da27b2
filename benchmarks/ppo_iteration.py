"""Time one PPO (or GRPO) iteration on a random GPT-2-shaped model; prints one JSON line.

  python benchmarks/ppo_iteration.py                      # tiny: 2 layers, 128 wide, vocab 1024
  python benchmarks/ppo_iteration.py --algo grpo --group-size 4

The policy, reference, reward model and critic are the same shape (TRL's PPO
set-up); prompts are random tokens of --prompt-len, completions exactly
--new-tokens (no EOS). Reported: the fused iteration (one compiled program: the
default training path) and the same work as three programs - rollout, scoring,
update - each timed to its end; medians of --iterations after one compiling call;
compile times separately; generated tokens/s of the fused iteration.
"""

import argparse
import functools
import os
import platform
import resource
import statistics
import sys
import time

from _train_bench import print_record


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--algo", default="ppo", choices=["ppo", "grpo"])
  p.add_argument("--n-layer", type=int, default=2)
  p.add_argument("--n-embd", type=int, default=128)
  p.add_argument("--n-head", type=int, default=4)
  p.add_argument("--vocab", type=int, default=1024)
  p.add_argument("--batch", type=int, default=8, help="prompts per iteration")
  p.add_argument("--group-size", type=int, default=1, help="completions per prompt (grpo: >= 2)")
  p.add_argument("--prompt-len", type=int, default=64)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--epochs", type=int, default=4)
  p.add_argument("--minibatches", type=int, default=2)
  p.add_argument("--iterations", type=int, default=3, help="timed iterations")
  p.add_argument("--eigen-threads", default="on", choices=["on", "off"])
  p.add_argument("--out", default=None, help="also append the JSON line to this file")
  args = p.parse_args()
  if args.eigen_threads == "off":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
  if args.algo == "grpo" and args.group_size < 2:
    args.group_size = 4

  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  from rlhfx import rollout as rl, scoring
  from rlhfx.algorithms import grpo, ppo
  from rlhfx.models import ModelConfig, Transformer, init_params
  from rlhfx.models.heads import ScoreModel

  config = ModelConfig(vocab_size=args.vocab, d_model=args.n_embd, n_layers=args.n_layer, n_heads=args.n_head,
                       max_seq_len=max(1024, args.prompt_len + args.new_tokens), norm="layernorm", mlp="gelu",
                       positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True,
                       arch="gpt2")
  policy = init_params(config, jax.random.key(0))
  reward = nn.meta.unbox(ScoreModel(config).init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"])
  copy = functools.partial(jax.tree.map, lambda x: jnp.array(x, copy=True))
  sampling = rl.SamplingSettings(config, max_new_tokens=args.new_tokens, group_size=args.group_size,
                                 eos_id=None, pad_id=0)
  scorer = scoring.Scorer(module=ScoreModel(config))
  optimizer = optax.adamw(1e-6)
  if args.algo == "ppo":
    params = {"policy": policy, "value": copy(reward)}
    s = ppo.Settings(model=Transformer(config), critic=ScoreModel(config), scorer=scorer, sampling=sampling,
                     optimizer=optimizer, epochs=args.epochs, minibatches=args.minibatches)
    algorithm = ppo
    new_state = lambda p: ppo.init_state(p, optimizer=optimizer, kl_coef=0.05)  # noqa: E731
  else:
    params = policy
    s = grpo.Settings(model=Transformer(config), scorer=scorer, sampling=sampling, optimizer=optimizer,
                      epochs=args.epochs, minibatches=args.minibatches, beta=0.04)
    algorithm = grpo
    new_state = lambda p: grpo.init_state(p, optimizer=optimizer)  # noqa: E731
  frozen = {"reference": copy(policy), "reward": reward}
  prompt = jax.random.randint(jax.random.key(2), (args.batch, args.prompt_len), 3, args.vocab)
  batch = {"prompt_BxP": prompt, "prompt_mask_BxP": jnp.ones_like(prompt, bool)}

  def fresh_state():
    return new_state(copy(params))

  programs = algorithm.jit_programs(s, jax.tree.map(lambda x: x.sharding, fresh_state()))
  fused, rollout, update = programs.fused, programs.sample_rollout, programs.update

  def score(r, reward):
    return programs.score(r, reward)[0]  # (scores_B, per-function parts)

  def timed(fn, *a):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*a))
    return out, time.perf_counter() - t0

  state = fresh_state()
  (state, *_), fused_compile = timed(fused, state, batch, frozen)
  fused_s = []
  for _ in range(args.iterations):
    (state, *_), t = timed(fused, state, batch, frozen)
    fused_s.append(t)

  state = fresh_state()
  phases = {"rollout": [], "scoring": [], "update": []}
  compile_s = {}
  for i in range(args.iterations + 1):
    r, t_rollout = timed(rollout, state, batch)
    scores, t_score = timed(score, r, reward)
    (state, _), t_update = timed(update, state, r, scores, frozen)
    if i == 0:
      compile_s = {"rollout": t_rollout, "scoring": t_score, "update": t_update}
      continue
    for name, t in zip(phases, (t_rollout, t_score, t_update)):
      phases[name].append(t)

  rows = args.batch * args.group_size
  median = statistics.median(fused_s)
  record = {
      "impl": "rlhfx", "algo": f"{args.algo}_iteration",
      "config": {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head, "vocab": args.vocab,
                 "prompts": args.batch, "group_size": args.group_size, "prompt_len": args.prompt_len,
                 "new_tokens": args.new_tokens, "epochs": args.epochs, "minibatches": args.minibatches},
      "iteration_s": median, "iteration_s_all": fused_s, "compile_s": fused_compile,
      "rollout_s": statistics.median(phases["rollout"]), "scoring_s": statistics.median(phases["scoring"]),
      "update_s": statistics.median(phases["update"]), "phase_compile_s": compile_s,
      "generated_tokens_per_s": rows * args.new_tokens / median,
      "rollout_tokens_per_s": rows * args.new_tokens / statistics.median(phases["rollout"]),
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "eigen_threads": args.eigen_threads, "jax": jax.__version__, "python": sys.version.split()[0],
      "machine": platform.machine(), "cpus": os.cpu_count(), "device": jax.devices()[0].device_kind,
  }
  print_record(record, args.out)


if __name__ == "__main__":
  main()
