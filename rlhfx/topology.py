"""Cloud TPU slices by the names users write (`v5e-64`, `v5p-128`, `v6e-256`, `v4-32`), their devices for the
TPU compiler on any host, and each chip's published figures.

  chip, devices = topology.devices("v5e-64")   # 64 "TPU v5 lite" devices of a v5e 8x8 slice

The devices come from `jax.experimental.topologies.get_topology_desc` (libtpu, `pip install
'rlhfx[tpu]'`): they compile programs and report memory and cost, they never run anything,
so a CPU host can plan for a slice it does not have.

Naming, as Cloud TPU's accelerator types: the number after v5e / v6e counts chips; after v4 /
v5p it counts TensorCores, two per chip (v5p-128 is 64 chips, 4x4x4). A compiler name
(`v5e:8x8`, `v5p:4x4x4`) is taken as it is.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

import rlhfx

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One chip's published figures (Cloud TPU system architecture pages); `hbm_bytes` is what a program may use."""

  generation: str
  device_kind: str  # jax Device.device_kind
  hbm_bytes: int
  peak_flops: float  # dense bf16 FLOP/s
  hbm_bandwidth: float  # bytes/s
  cores_per_chip: int  # TensorCores a chip counts for in the accelerator type's name
  dims: int  # 2-D (v5e, v6e) or 3-D (v4, v5p) torus
  ici_bandwidth: float  # bytes/s one chip moves over the inter-chip interconnect, all links, both directions
  dcn_bandwidth: float | None  # bytes/s per chip across slices (data-center network), where published


# Published per chip: v5e 400 GB/s bidirectional ICI (4 ports), DCN 6.4 Tbps per 256-chip pod (25 Gbps per
# chip); v5p 1,200 GB/s ICI, DCN 50 Gbps; v6e 800 GB/s ICI (4 ports), DCN not given per chip. v4's page gives
# no per-chip ICI figure: six links (3-D torus) at 45 GB/s each way, 540 GB/s, as "How to Scale Your Model"
# (Austin et al., 2025) tabulates it.
CHIPS = {
    # v5e: 16 GiB per chip, of which the TPU compiler lets a program use 15.75 GiB (its own out-of-memory message)
    "v5e": Chip("v5e", "TPU v5 lite", int(15.75 * GiB), 197e12, 819e9, 1, 2, 400e9, 25e9 / 8),
    "v5p": Chip("v5p", "TPU v5", 95 * GiB, 459e12, 2765e9, 2, 3, 1200e9, 50e9 / 8),
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GiB, 918e12, 1640e9, 1, 2, 800e9, None),
    "v4": Chip("v4", "TPU v4", 32 * GiB, 275e12, 1228e9, 2, 3, 540e9, None),
}


class TopologyError(ValueError):
  """A topology name that names no slice."""


def _grid(chips: int, dims: int) -> str:
  """The most cubic power-of-two grid of `chips` chips, smallest axes first (16 -> 4x4, 32 -> 2x4x4)."""
  if chips < 1 or chips & (chips - 1):
    raise TopologyError(f"{chips} chips is not a power of two")
  exponent = int(math.log2(chips))
  sizes = [2 ** (exponent // dims + (i >= dims - exponent % dims)) for i in range(dims)]
  if dims == 3 and chips == 4:  # Cloud TPU's 4-chip v4/v5p host is 2x2x1
    sizes = [2, 2, 1]
  return "x".join(str(s) for s in sizes)


def compiler_name(name: str) -> tuple[Chip, str]:
  """(chip, compiler topology name) for `v5e-64` (-> v5e:8x8), `v5p-128` (-> v5p:4x4x4) or `v5e:8x8`."""
  m = re.fullmatch(r"(v4|v5e|v5p|v6e)([-:])([0-9x]+)", name.strip().lower().replace("v5litepod", "v5e"))
  if not m:
    raise TopologyError(f"--topology={name!r}: expected <generation>-<size> with generation one of "
                        f"{sorted(CHIPS)} (e.g. v5e-64, v5p-128, v6e-256, v4-32) or a compiler name like v5e:8x8")
  chip = CHIPS[m.group(1)]
  if m.group(2) == ":":
    return chip, f"{chip.generation}:{m.group(3)}"
  size = int(m.group(3))
  if size % chip.cores_per_chip:
    raise TopologyError(f"--topology={name!r}: {chip.generation} sizes count TensorCores, "
                        f"{chip.cores_per_chip} per chip; {size} is not a multiple")
  try:
    grid = _grid(size // chip.cores_per_chip, chip.dims)
  except TopologyError as e:
    raise TopologyError(f"--topology={name!r}: {e}") from None
  return chip, f"{chip.generation}:{grid}"


def devices(name: str) -> tuple[Chip, list]:
  """(chip, the slice's devices, one per chip) for the TPU compiler; needs libtpu."""
  # compiling only: several planners (or a planner beside a test session) may load libtpu at once
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # Off a TPU VM, what libtpu would otherwise ask the metadata server for (printing errors when there is none),
  # set while libtpu loads and removed after: processes this one starts must not read it as a TPU pod's
  # (`rlhfx.sharding` initialises jax.distributed when it sees TPU_WORKER_HOSTNAMES). The compiler's results
  # depend on neither.
  added = {} if rlhfx.tpu_chips_here() else {k: v for k, v in (("TPU_WORKER_HOSTNAMES", "localhost"),
                                                                ("TPU_ACCELERATOR_TYPE", name)) if k not in os.environ}
  try:
    from jax.experimental import topologies
  except ImportError as e:  # pragma: no cover
    raise TopologyError(f"planning for a TPU needs jax.experimental.topologies: {e}") from None
  chip, compiler = compiler_name(name)
  grid = [int(s) for s in compiler.split(":")[1].split("x")]
  per_host = tuple(min(g, b) for g, b in zip(grid + [1] * (3 - len(grid)), (2, 2, 1)))
  os.environ.update(added)
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=compiler, chip_config_name="default",
                                        chips_per_host_bounds=per_host, num_slices=1)
  except Exception as e:  # noqa: BLE001 (no libtpu, or a grid the compiler does not know)
    hint = "" if importlib.util.find_spec("libtpu") else " (libtpu is not installed: pip install 'rlhfx[tpu]')"
    raise TopologyError(f"--topology={name!r} ({compiler}): the TPU compiler could not describe it: "
                        f"{str(e).splitlines()[0]}{hint}") from None
  finally:
    for key in added:
      os.environ.pop(key, None)
  found = list(desc.devices)
  chips = math.prod(grid)
  if len(found) != chips:  # one device per TensorCore (v4's default chip config): keep one per chip
    found = [d for d in found if getattr(d, "core_on_chip", 0) == 0][:chips]
  return chip, found
