"""The train state every algorithm steps, and gradient accumulation over micro-batches."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

Array = jax.Array


@dataclasses.dataclass
class Initial:
  """What an algorithm's `init` makes, the same for its `train()` (arrays) and for the planner (ShapeDtypeStructs)."""

  state: Any  # the trained state (TrainState, PPOState, GRPOState)
  shardings: Any  # the state's shardings
  frozen: dict[str, Any]  # name -> a frozen tree (reference, reward model) or None when the run keeps none
  jitted: Any  # the jitted step (sft, reward, dpo) or the on-policy programs (rlhfx.onpolicy.Steps)
  settings: Any = None  # the algorithm's static settings (dpo.Settings, ppo.Settings, grpo.Settings)
  flops_per_token: float = 0.0  # matmul FLOPs of one step per token it trains on (rlhfx.flops), for MFU and the planner


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any  # the trainable tree (a policy, a reward model, or {"base", "lora"})
  opt_state: Any


def init_state(params, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def state_shardings(abstract_state, param_shardings, mesh: jax.sharding.Mesh):
  """Shardings of a state (`TrainState` or any struct with `params` and `opt_state`) like its parameters'.

  Each optimizer-state leaf that mirrors a parameter (Adam's moments, per-parameter masks)
  gets that parameter's sharding; every other leaf (step, counts, scalars) is replicated.
  optax creates the moments with `zeros_like`, which carries no sharding: without these
  as `out_shardings` they come out replicated on every device.
  """
  replicated = NamedSharding(mesh, P())
  by_path = {tuple(path): (x.shape, sh) for (path, x), sh in zip(
      jax.tree_util.tree_leaves_with_path(abstract_state.params), jax.tree.leaves(param_shardings))}

  def like_its_parameter(path, leaf):
    # an optimizer-state leaf mirrors the parameter whose key path ends its own (mu/<param path>)
    for start in range(len(path)):
      shape, sh = by_path.get(tuple(path[start:]), (None, None))
      if shape == leaf.shape:
        return sh
    return replicated

  opt_state = jax.tree_util.tree_map_with_path(like_its_parameter, abstract_state.opt_state)
  everything = jax.tree.map(lambda _: replicated, abstract_state)
  return everything.replace(params=param_shardings, opt_state=opt_state)


def create_state(init: Callable, params, mesh: jax.sharding.Mesh):
  """(state, its shardings): `init(params)` (e.g. init_state with the optimizer bound) compiled with
  out_shardings from `state_shardings`, the parameters donated. Works on ShapeDtypeStructs too
  (`jax.eval_shape`), which is how the planner builds the state without allocating it."""
  abstract = jax.eval_shape(init, params)
  shardings = state_shardings(abstract, jax.tree.map(lambda x: x.sharding, params), mesh)
  if isinstance(jax.tree.leaves(params)[0], jax.ShapeDtypeStruct):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                        shardings), shardings
  return jax.jit(init, out_shardings=shardings, donate_argnums=0)(params), shardings


def apply_gradients(state: TrainState, grads, optimizer: optax.GradientTransformation) -> TrainState:
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)


def microbatches(batch: dict[str, Array], k: int) -> dict[str, Array]:
  """[B, ...] -> [k, B/k, ...]; micro-batch i holds rows i, i+k, ... so each stays spread over the batch axes."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def accumulate_gradients(loss_fn: Callable, params, batch: dict[str, Array], k: int, *, average: bool = False):
  """(gradients, metrics) of `loss_fn(params, micro_batch) -> (loss, metrics)` summed over k micro-batches.

  With `average`, both are divided by k: right for losses that are means over their
  micro-batch (all micro-batches have the same size). Losses normalised by a
  global count (SFT tokens) are summed as they are.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if k == 1:
    (loss, metrics), grads = grad_fn(params, batch)
    return grads, {"loss": loss, **metrics}

  def body(carry, micro):
    (loss, metrics), grads = grad_fn(params, micro)
    return jax.tree.map(jnp.add, carry, (grads, {"loss": loss, **metrics})), None

  micro = microbatches(batch, k)
  abstract = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro))[0]
  zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), {"loss": abstract[0], **abstract[1]})
  (grads, metrics), _ = jax.lax.scan(body, (jax.tree.map(jnp.zeros_like, params), zero_metrics), micro)
  if average:
    grads, metrics = jax.tree.map(lambda x: x / k, (grads, metrics))
  return grads, metrics


def update(state: TrainState, loss_fn: Callable, batch: dict[str, Array], optimizer: optax.GradientTransformation,
           k: int = 1, *, average: bool = False):
  """One optimizer step of `loss_fn(params, micro_batch) -> (loss, metrics)` over k micro-batches:
  (the new state, the gradients, the metrics; see `accumulate_gradients` for `average`)."""
  grads, metrics = accumulate_gradients(loss_fn, state.params, batch, k, average=average)
  return apply_gradients(state, grads, optimizer), grads, metrics
