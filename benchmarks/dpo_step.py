"""Time rlhfx's DPO step (sigmoid loss, frozen reference tree, AdamW, clipping); one JSON line.

Same flags and fields as ../shared/bench/trl/dpo_step.py:

  python benchmarks/dpo_step.py --n-layer 2 --n-embd 128 --n-head 4 --vocab 1024 --seq 128 --batch 4 --steps 50
  python benchmarks/dpo_step.py --n-layer 12 --n-embd 768 --n-head 12 --vocab 50257 --seq 256 --batch 2 --steps 10

One step = policy forward+backward over the 2B concatenated rows, reference forward
over the same rows, loss, clipping and AdamW, as one jitted program with the state
donated. compile_s is the first step minus the median. Like TRL, the LM head sees
only the completion positions (`--window`, default seq - prompt: rlhfx's
`data.max_completion_length`); `--window 0` projects every position.
"""

import functools
import sys

from _train_bench import emit, model_config, optim_config, pairs, parse, time_steps


def main():
  args = parse(__doc__, dpo=True)
  import jax
  import jax.numpy as jnp

  from rlhfx.algorithms import dpo
  from rlhfx.losses import preference
  from rlhfx.flops import sequence_train_flops
  from rlhfx.models import Transformer, init_params
  from rlhfx.optim import learning_rate_schedule, make_optimizer
  from rlhfx.train_state import init_state

  config = model_config(args)
  prompt = args.prompt_len if args.prompt_len is not None else args.seq // 2
  window = args.seq - prompt if args.window is None else args.window
  params = init_params(config, jax.random.key(args.seed))
  reference = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
  optimizer = make_optimizer(optim_config(args), args.steps + args.warmup, params)
  loss = preference.LOSSES[args.loss_type](beta=args.beta)
  s = dpo.Settings(model=Transformer(config), loss=loss, chunk_size=args.chunk_size or None, window=window or None)
  step = jax.jit(functools.partial(dpo.train_step, s=s, optimizer=optimizer,
                                   schedule=learning_rate_schedule(optim_config(args), 10)), donate_argnums=0)
  batch = jax.tree.map(jnp.asarray, pairs(args))
  times, _ = time_steps(lambda s, b: step(s, b, reference), init_state(params, optimizer), batch, args)
  train = sequence_train_flops(config, args.seq, kept=window + 1 if window else None) * 2 * args.batch
  emit(args, "dpo", times, train * 4 / 3,  # + the reference forward (a third of forward + backward)
       {"loss_type": args.loss_type, "beta": args.beta, "reference": "frozen tree, forward each step",
        "chunk_size": args.chunk_size, "lm_head_window": window, "n_params": config.num_params()})


if __name__ == "__main__":
  sys.exit(main())
