"""Time rlhfx's reward-model step (Bradley-Terry loss, AdamW, clipping); one JSON line.

Same flags and fields as ../shared/bench/trl/rm_step.py:

  python benchmarks/reward_step.py --n-layer 2 --n-embd 128 --n-head 4 --vocab 1024 --seq 128 --batch 4 --steps 50

One step = forward+backward of backbone and score head over the 2B concatenated
rows, loss, clipping and AdamW, as one jitted program with the state donated. The
last layer computes queries, attention output and MLP only at each row's scored
(last) token, and the FLOP count says so (rlhfx.flops.sequence_train_flops).
"""

import functools
import sys

from _train_bench import emit, model_config, optim_config, pairs, parse, time_steps


def main():
  args = parse(__doc__, dpo=False)
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from rlhfx.algorithms import reward
  from rlhfx.flops import sequence_train_flops
  from rlhfx.models.heads import ScoreModel
  from rlhfx.optim import learning_rate_schedule, make_optimizer
  from rlhfx.train_state import init_state

  config = model_config(args)
  model = ScoreModel(config)
  params = nn.meta.unbox(model.init(jax.random.key(args.seed), jnp.zeros((1, 4), jnp.int32))["params"])
  optimizer = make_optimizer(optim_config(args), args.steps + args.warmup, params)
  step = jax.jit(functools.partial(reward.train_step, model=model, optimizer=optimizer,
                                   schedule=learning_rate_schedule(optim_config(args), 10)), donate_argnums=0)
  batch = jax.tree.map(jnp.asarray, pairs(args))
  times, _ = time_steps(step, init_state(params, optimizer), batch, args)
  emit(args, "reward", times, sequence_train_flops(config, args.seq, kept=1, lm_head=False) * 2 * args.batch,
       {"n_params": config.num_params()})


if __name__ == "__main__":
  sys.exit(main())
