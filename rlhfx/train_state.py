"""The train state every algorithm steps, and gradient accumulation over micro-batches."""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any  # the trainable tree (a policy, a reward model, or {"base", "lora"})
  opt_state: Any


def init_state(params, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


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
