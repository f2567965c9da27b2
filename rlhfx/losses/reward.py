"""The reward model's loss on preference pairs. A pure function of arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def bradley_terry_loss(chosen_rewards_B: Array, rejected_rewards_B: Array, *, margin_B: Array | None = None,
                       center_coef: float = 0.0):
  """Reward-model loss (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1): -log sigma(r_w - r_l - margin).

  center_coef adds c * mean((r_w + r_l)^2), which keeps rewards centred at 0 (Eisenstein et al. 2023).
  """
  diff = chosen_rewards_B - rejected_rewards_B - (0.0 if margin_B is None else margin_B)
  loss = -jax.nn.log_sigmoid(diff).mean()
  if isinstance(center_coef, jax.Array) or center_coef:  # a traced coefficient (one per sweep member) too
    loss = loss + center_coef * jnp.mean((chosen_rewards_B + rejected_rewards_B) ** 2)
  metrics = {"accuracy": (chosen_rewards_B > rejected_rewards_B).astype(jnp.float32).mean(),
             "margin": (chosen_rewards_B - rejected_rewards_B).mean(),
             "rewards/chosen": chosen_rewards_B.mean(), "rewards/rejected": rejected_rewards_B.mean()}
  return loss, metrics
