"""FLOP counts used for achieved GFLOP/s and MFU, against XLA's own count of the compiled program."""

import jax
import jax.numpy as jnp
import pytest

from rlhfx.metrics import sequence_train_flops
from rlhfx.models import Transformer, get_preset, init_params


@pytest.mark.parametrize("kept", [None, 1, 33])
def test_sequence_train_flops_matches_xla_cost_analysis(kept):
  """Forward + backward of 2 rows of 128 tokens, all positions or only `kept` through the last layer's
  queries and MLP: our formula is within 10% of the FLOPs XLA counts (which include elementwise work)."""
  config = get_preset("tiny", d_model=256, n_layers=2, vocab_size=512)
  params = init_params(config, jax.random.key(0))
  tokens_BxT = jnp.ones((2, 128), jnp.int32)
  select_BxQ = None if kept is None else jnp.tile(jnp.arange(kept)[None], (2, 1))

  def forward(p, select):
    return Transformer(config).apply({"params": p}, tokens_BxT, select_BxQ=select).sum()

  cost = jax.jit(jax.grad(forward)).lower(params, select_BxQ).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  xla_per_row = cost["flops"] / 2
  assert abs(sequence_train_flops(config, 128, kept=kept) / xla_per_row - 1) < 0.1
