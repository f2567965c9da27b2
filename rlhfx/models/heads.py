"""Scalar heads on the decoder: reward models (one score per sequence) and value models (one per token)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhfx.models.config import ModelConfig
from rlhfx.models.transformer import Transformer


def last_token_index(mask_BxT: jax.Array) -> jax.Array:
  """Index of the last real token of each row (right or left padding)."""
  length = mask_BxT.shape[1]
  return length - 1 - jnp.argmax(mask_BxT[:, ::-1], axis=-1)


class ScoreModel(nn.Module):
  """Backbone + linear score head: `per_token=False` -> rewards_B at the last real token, True -> values_BxT."""

  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.backbone = Transformer(cfg)
    self.score = nn.Dense(1, use_bias=False, dtype=jnp.float32, param_dtype=cfg.jnp_param_dtype,
                          kernel_init=nn.with_logical_partitioning(
                              nn.initializers.normal(1 / (cfg.d_model + 1) ** 0.5), ("embed", None)),
                          )

  def __call__(self, tokens_BxT, mask_BxT=None, *, per_token: bool = False):
    mask_BxT = jnp.ones(tokens_BxT.shape, bool) if mask_BxT is None else mask_BxT
    if per_token:
      hidden_BxTxD = self.backbone(tokens_BxT, mask_BxT, return_hidden=True)
      return self.score(hidden_BxTxD.astype(jnp.float32))[..., 0]
    # only the last real token's state is computed in the last layer and goes through the head
    last_Bx1xD = self.backbone(tokens_BxT, mask_BxT, return_hidden=True,
                               select_BxQ=last_token_index(mask_BxT)[:, None])
    return self.score(last_Bx1xD[:, 0].astype(jnp.float32))[..., 0]


def from_lm_params(lm_params: dict, score_params: dict) -> dict:
  """A ScoreModel tree from a language model's params (its LM head dropped) and head params."""
  return {"backbone": {k: v for k, v in lm_params.items() if k != "lm_head"}, "score": score_params}
