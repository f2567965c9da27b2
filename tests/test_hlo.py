"""rlhfx.hlo: what a program compiled by the TPU compiler does per call, every loop's trip count applied.

Each program here is small and known by construction (a scan over 8 layers of sharded weights, a
decode-like loop that may end early), compiled for a v5e-4 slice by libtpu; the counts read from
its text must be the arithmetic of the construction.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhfx import hlo, hlo_cost, sharding, topology

pytest.importorskip("libtpu", reason="compiling for a TPU slice needs libtpu: pip install -e '.[test,tpu]'")

LAYERS, D, ROWS = 8, 512, 64


@pytest.fixture(scope="module")
def mesh():
  _, devices = topology.devices("v5e-4")
  return sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 1}, devices)


def _compile(fn, *structs):
  return jax.jit(fn).lower(*structs).compile().as_text()


def _layers(w_LxDxD, x_BxD):
  def layer(x_BxD, w_DxD):
    w_DxD = jax.lax.with_sharding_constraint(w_DxD, P())  # FSDP: gather the layer's weights
    return jnp.tanh(x_BxD @ w_DxD), None
  return jax.lax.scan(layer, x_BxD, w_LxDxD)[0]


def test_a_scan_counts_its_trips(mesh):
  w = jax.ShapeDtypeStruct((LAYERS, D, D), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "fsdp", None)))
  x = jax.ShapeDtypeStruct((ROWS, D), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
  with jax.set_mesh(mesh):
    cost = hlo_cost.program_cost(_compile(_layers, w, x))
  assert cost.unknown_loops == 0
  assert max(b.trips for b in cost.bodies if b.flops) == LAYERS  # (the condition runs once more)
  # every layer's matmul, the whole batch on each chip (x replicated)
  assert cost.flops == pytest.approx(2 * ROWS * D * D * LAYERS, rel=0.01)
  # each layer gathers its D x D bf16 weights: the all-gather's result, once per layer
  gathered = cost.collectives()["all-gather"]
  assert gathered["count"] == LAYERS and gathered["bytes"] == LAYERS * D * D * 2
  # HBM per layer: its gathered weights are read by the matmul; the stacked shards it slices are counted at
  # the slice's size (were the whole stack counted each trip, a trip would exceed weights + stack)
  (layer,) = [b for b in cost.bodies if b.flops]
  stack_per_chip = LAYERS * D * D // 4 * 2
  assert D * D * 2 <= layer.hbm_bytes < D * D * 2 + stack_per_chip


def test_a_loop_that_may_end_early_is_counted_at_its_limit_and_marked_decode(mesh):
  steps = 16

  def decode(w_DxD, x_BxD):
    def cond(carry):
      t, x_BxD = carry
      return (t + 1 < steps) & jnp.any(x_BxD < 10.0)  # a limit, or every row done
    def body(carry):
      t, x_BxD = carry
      w = jax.lax.with_sharding_constraint(w_DxD, P())
      return t + 1, jnp.tanh(x_BxD @ w)
    return jax.lax.while_loop(cond, body, (jnp.int32(0), x_BxD))[1]

  w = jax.ShapeDtypeStruct((D, D), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp", None)))
  x = jax.ShapeDtypeStruct((ROWS, D), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
  with jax.set_mesh(mesh):
    cost = hlo_cost.program_cost(_compile(decode, w, x))
  loop = [b for b in cost.bodies if b.decode and b.flops]
  assert loop and all(b.trips == steps - 1 for b in loop)
  assert cost.flops == pytest.approx(2 * ROWS * D * D * (steps - 1), rel=0.01)
  # the weights are gathered inside the loop: D x D x 2 bytes per step, per generated token
  assert cost.decode_collective_bytes(steps - 1) == pytest.approx(D * D * 2, rel=0.01)
  chip = topology.CHIPS["v5e"]
  seconds = cost.seconds(chip.peak_flops, chip.hbm_bandwidth, chip.ici_bandwidth)
  assert seconds >= (steps - 1) * D * D * 2 / chip.ici_bandwidth
  assert cost.bound(chip.peak_flops, chip.hbm_bandwidth, chip.ici_bandwidth) == "communication"


def test_trip_counts_from_conditions():
  text = """HloModule m

%cond (p: (s32[], f32[4])) -> pred[] {
  %p = (s32[], f32[4]{0}) parameter(0)
  %c = s32[] constant(32)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%cond2 (p: (s32[], f32[4])) -> pred[] {
  %p = (s32[], f32[4]{0}) parameter(0)
  %one = s32[] constant(1)
  %c = s32[] constant(512)
  %i = s32[] get-tuple-element(%p), index=0
  %next = s32[] add(%i, %one)
  %lt = pred[] compare(%next, %c), direction=LT
  %flag = pred[] constant(true)
  ROOT %and = pred[] and(%lt, %flag)
}
"""
  computations = hlo.parse(text)
  assert hlo.trip_count(computations["cond"]) == (32, True)
  assert hlo.trip_count(computations["cond2"]) == (511, False)
  assert np.prod(computations["cond"].instructions["p"].shape.count("f32")) == 1
