"""Where the time of one DPO step goes: each part jitted and timed alone, plus the full step; one JSON line.

  python benchmarks/profile_dpo.py                                      # GPT-2 small, 2 pairs x 256
  python benchmarks/profile_dpo.py --n-layer 2 --n-embd 128 --n-head 4 --vocab 1024 --seq 128 --batch 4

Parts (all over the 2B concatenated rows): the decoder body forward (hidden states), the
LM head + log-softmax at every position, policy forward + backward (log-probs -> loss),
the reference forward, the AdamW update with clipping, and the whole step as training runs
it; each the median of --repeats calls after a compiling one. Compile times are listed
separately. `--chunk-size` sets the LM-head chunk of the step (0 = all positions at once).
"""

import functools
import json
import statistics
import sys
import time

from _train_bench import model_config, optim_config, pairs, parse


def main():
  sys.argv += [] if "--seq" in sys.argv else ["--n-layer", "12", "--n-embd", "768", "--n-head", "12", "--vocab",
                                              "50257", "--seq", "256", "--batch", "2"]
  args = parse(__doc__, dpo=True)
  import jax
  import jax.numpy as jnp
  import optax

  from rlhfx.algorithms import dpo
  from rlhfx.logprobs import target_logps
  from rlhfx.losses import preference
  from rlhfx.losses.common import concat_pairs
  from rlhfx.models import Transformer, init_params
  from rlhfx.optim import learning_rate_schedule, make_optimizer
  from rlhfx.train_state import init_state

  config = model_config(args)
  model = Transformer(config)
  params = init_params(config, jax.random.key(args.seed))
  reference = jax.tree.map(jnp.copy, params)
  batch = jax.tree.map(jnp.asarray, pairs(args))
  tokens, mask, _ = concat_pairs(batch)
  chunk = args.chunk_size or None
  loss = functools.partial(preference.dpo_loss, beta=args.beta)
  s = dpo.Settings(model=model, loss=loss, chunk_size=chunk)
  objective = functools.partial(dpo.dpo_objective, s=s)
  optimizer = make_optimizer(optim_config(args), 100, params)
  opt_state = optimizer.init(params)
  grads = jax.tree.map(jnp.ones_like, params)

  def hidden(p):
    return model.apply({"params": p}, tokens, mask, return_hidden=True)

  h = jax.jit(hidden)(params)
  parts = {
      "body_forward": (jax.jit(hidden), (params,)),
      "lm_head_logsoftmax": (jax.jit(lambda p, h: target_logps(model, p, h[:, :-1], tokens[:, 1:], chunk_size=chunk)),
                             (params, h)),
      "reference_forward": (jax.jit(lambda r: dpo.pair_logps(model, r, batch, chunk_size=chunk)), (reference,)),
      "policy_forward_backward": (jax.jit(jax.grad(lambda p: objective(p, batch, reference)[0])), (params,)),
      "adamw_update": (jax.jit(lambda g, s, p: optax.apply_updates(p, optimizer.update(g, s, p)[0])),
                       (grads, opt_state, params)),
  }
  step = jax.jit(functools.partial(dpo.train_step, s=s, optimizer=optimizer,
                                   schedule=learning_rate_schedule(optim_config(args), 10)))
  state = init_state(params, optimizer)
  parts["full_step"] = (lambda s: step(s, batch, reference), (state,))

  out = {"config": {"n_layer": args.n_layer, "n_embd": args.n_embd, "vocab": args.vocab, "seq": args.seq,
                    "batch": args.batch, "chunk_size": args.chunk_size, "eigen_threads": args.eigen_threads},
         "median_s": {}, "compile_s": {}}
  for name, (fn, fargs) in parts.items():
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*fargs))
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*fargs))
      times.append(time.perf_counter() - t0)
    out["median_s"][name] = statistics.median(times)
    out["compile_s"][name] = first - statistics.median(times)
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  sys.exit(main())
