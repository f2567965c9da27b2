"""rlhfx: preference tuning of language models in JAX/Flax (SFT, reward models, DPO, PPO, GRPO).

Key of shape letters used in array names across the package:
  B batch, T sequence, S key/cache length, P prompt, C completion, V vocab,
  D model width, N query heads, K kv heads, H head dim, F MLP width, L layers,
  G samples per prompt.
"""

import glob
import importlib.util
import os

__version__ = "0.1.0"

# transformers (tokenizers and configs only here) says at import that PyTorch is missing, which rlhfx never needs;
# its real warnings stay.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def tpu_chips_here() -> bool:
  """This machine has TPU chips (a TPU VM: /dev/accel*, or /dev/vfio/<n> on v5e and later)."""
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _no_tpu_platform_without_a_tpu() -> None:
  """With libtpu installed (the `tpu` extra, for the planner) on a machine without TPU chips, JAX would load it at
  start-up and print its errors about TPU metadata it cannot find before anything else. There, JAX's platforms are
  the others present (a GPU's plugin and device, then the CPU); a JAX_PLATFORMS set by the user is kept, and a TPU
  VM is left alone. The planner loads libtpu itself (`rlhfx.topology.devices`)."""
  if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
    return
  if tpu_chips_here():
    return
  gpu = os.path.exists("/dev/nvidiactl") and any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin",
                                                                                         "jax_cuda13_plugin"))
  os.environ["JAX_PLATFORMS"] = "cuda,cpu" if gpu else "cpu"


_no_tpu_platform_without_a_tpu()
