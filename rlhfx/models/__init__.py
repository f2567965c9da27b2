"""Models: one Linen decoder family, its config and presets, checkpoint conversion."""

from rlhfx.models.config import PRESETS, ModelConfig, get_preset
from rlhfx.models.transformer import Cache, Transformer, init_cache, init_params

__all__ = ["PRESETS", "Cache", "ModelConfig", "Transformer", "get_preset", "init_cache", "init_params"]
