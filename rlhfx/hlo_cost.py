"""What a compiled program does per call, read from its HLO text with every loop's trip count applied.

  cost = hlo_cost.program_cost(compiled.as_text(), unknown_trips=511)
  cost.flops, cost.hbm_bytes, cost.collective_bytes, cost.bodies   # per chip, per call

The compiler's own cost analysis counts a loop's body once. Here the program is split into
its computations (the entry, each `while` body and condition, called computations); each
gets a multiplier, the product of the trip counts of the loops around it, and its own
figures:

- FLOPs: 2 x output elements x contracted elements of every `dot` and `convolution`,
  inside fusions included;
- HBM bytes: operands read and results written by each top-level instruction (a fusion is
  one: what happens inside it stays on chip); an operand a fusion only slices is counted
  at the slice's size (a layer's weights out of the scanned stack), and an in-place update
  (`dynamic-update-slice`, the KV cache) at the update's size;
- collective bytes: the data each chip sends or receives: an all-gather's result, a
  reduce-scatter's operand, twice an all-reduce's buffer (reduce-scatter + all-gather),
  an all-to-all's or collective-permute's result.

Each loop runs its trip count (`rlhfx.hlo.trip_count`); the bodies of a loop that may end
early are marked `decode`. A loop whose count the condition
does not give at all (the continuous-batching engine's, `rlhfx.engine`) is counted as a
batch of uniform-length rows runs it: the first such loop of a computation (the full-width
stage) `unknown_trips` times, as the caller says, the ones after it (narrower stages, which
such a batch never enters) and one inside such a loop (admission, which such a batch with a
slot per row never needs after the start) not at all.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from rlhfx import hlo

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
# instructions that move no data of their own
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
         "after-all", "partition-id", "replica-id", "opt-barrier", "copy-done", "copy-start", "iota",
         "all-gather-done", "all-reduce-done", "collective-permute-done", "send-done", "recv-done",
         "get-dimension-size", "add-dependency"}
_SLICING = {"dynamic-slice", "slice", "gather"}


def dot_flops(i: hlo.Instruction, shape_of) -> float:
  """2 x output elements x contracted elements of a dot or convolution (0 for anything else)."""
  out = hlo.shapes(i.shape)
  if not out or i.op not in ("dot", "convolution") or len(i.operands) < 2:
    return 0.0
  outputs = int(np.prod(out[0][1], dtype=np.int64))
  if i.op == "dot":
    lhs = shape_of(i.operands[0])
    m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", i.attributes)
    dims = [int(d) for d in m.group(1).split(",") if d] if m else []
    return 2.0 * outputs * int(np.prod([lhs[d] for d in dims if d < len(lhs)], dtype=np.int64))
  kernel = shape_of(i.operands[1])
  m = re.search(r"dim_labels=[^_]*_([^-]*)->", i.attributes)
  if not m or len(m.group(1)) != len(kernel):
    return 0.0
  labels = m.group(1)
  contracted = kernel[labels.index("i")]
  w = re.search(r"window=\{size=([0-9x]+)", i.attributes)
  window = [int(s) for s in w.group(1).split("x")] if w else []
  pads = re.search(r"pad=([0-9_x]+)", i.attributes)
  pads = [tuple(int(p) for p in s.split("_")) for s in pads.group(1).split("x")] if pads else [(0, 0)] * len(window)
  for size, (lo, hi) in zip(window, pads):
    # a window padded by size - 1 on both sides is XLA's encoding of a batch dimension: one tap per output
    contracted *= 1 if (lo == hi == size - 1 and size > 1) else size
  return 2.0 * outputs * contracted


@dataclasses.dataclass
class Body:
  """One computation's own figures (its nested loops apart) and how often a call runs it."""

  name: str
  trips: int  # runs per call of the program (the product of the enclosing loops' trip counts)
  flops: float
  hbm_bytes: float
  collective_bytes: float
  collectives: dict[str, dict[str, float]]  # kind -> count, bytes (per run of the body)
  loop: str = ""  # the while instruction whose body this is ("" for the entry)
  decode: bool = False  # inside a loop that may end early (a decode loop) or of unknown trip count


@dataclasses.dataclass
class ProgramCost:
  bodies: list[Body]
  unknown_loops: int  # loops whose trip count came from `unknown_trips`

  @property
  def flops(self) -> float:
    return sum(b.trips * b.flops for b in self.bodies)

  @property
  def hbm_bytes(self) -> float:
    return sum(b.trips * b.hbm_bytes for b in self.bodies)

  @property
  def collective_bytes(self) -> float:
    return sum(b.trips * b.collective_bytes for b in self.bodies)

  def decode_collective_bytes(self, steps: int) -> float:
    """Collective bytes per step of the decode loop (per generated token), `steps` its limit."""
    return sum(b.trips * b.collective_bytes for b in self.bodies if b.decode) / max(steps, 1)

  def collectives(self) -> dict[str, dict[str, float]]:
    """kind -> count and bytes per call, trip counts applied."""
    out: dict[str, dict[str, float]] = {}
    for b in self.bodies:
      for kind, v in b.collectives.items():
        o = out.setdefault(kind, {"count": 0, "bytes": 0})
        o["count"] += b.trips * v["count"]
        o["bytes"] += b.trips * v["bytes"]
    return out

  def _times(self, peak_flops, hbm_bandwidth, ici_bandwidth, flops_scale):
    """Per body: runs x (compute, memory, communication) seconds."""
    return [(b.trips * flops_scale * b.flops / peak_flops, b.trips * b.hbm_bytes / hbm_bandwidth,
             b.trips * b.collective_bytes / ici_bandwidth) for b in self.bodies]

  def seconds(self, peak_flops: float, hbm_bandwidth: float, ici_bandwidth: float,
              flops_scale: float = 1.0) -> float:
    """Per body the largest of FLOPs at peak, HBM bytes at the chip's bandwidth and collective bytes at the
    interconnect's, times its runs: a lower bound that sees communication and loops."""
    return sum(max(t) for t in self._times(peak_flops, hbm_bandwidth, ici_bandwidth, flops_scale))

  def bound(self, peak_flops: float, hbm_bandwidth: float, ici_bandwidth: float, flops_scale: float = 1.0) -> str:
    """Which of the three dominates the estimate: compute, memory or communication."""
    totals = [sum(parts) for parts in zip(*self._times(peak_flops, hbm_bandwidth, ici_bandwidth, flops_scale))]
    return ("compute", "memory", "communication")[int(np.argmax(totals))]


def _collective_bytes(i: hlo.Instruction, kind: str, shape_of) -> float:
  results = hlo.shapes(i.shape)
  if i.op.endswith("-start") and kind != "all-reduce" and len(results) > 1:
    results = results[1:2]  # async (operand, result, contexts...) -> the result; all-reduce-start is its result
  size = hlo.nbytes(results)
  if kind == "all-reduce":
    return 2.0 * size
  if kind == "reduce-scatter":  # each chip sends (n - 1) / n of its operand: about all of it
    return float(hlo.nbytes([(shape_of.dtype(o), shape_of(o)) for o in i.operands]) or size)
  return float(size)


class _Shapes:
  """Result shapes of one computation's instructions by name (the first array of a tuple)."""

  def __init__(self, computation: hlo.Computation):
    self.c = computation

  def _first(self, name):
    i = self.c.instructions.get(name)
    found = hlo.shapes(i.shape) if i else []
    return found[0] if found else ("f32", ())

  def __call__(self, name) -> tuple[int, ...]:
    return self._first(name)[1]

  def dtype(self, name) -> str:
    return self._first(name)[0]


def _params(c: hlo.Computation) -> dict[int, str]:
  """A computation's parameter names by number."""
  out = {}
  for x in c.instructions.values():
    m = re.fullmatch(r"\s*(\d+)\s*", x.args) if x.op == "parameter" else None
    if m:
      out[int(m.group(1))] = x.name
  return out


def _users(c: hlo.Computation) -> dict[str, list[hlo.Instruction]]:
  users: dict[str, list[hlo.Instruction]] = {}
  for x in c.instructions.values():
    for o in x.operands:
      users.setdefault(o, []).append(x)
  return users


def _read_bytes(c: hlo.Computation, name: str, computations: dict[str, hlo.Computation],
                depth: int = 0) -> float | None:
  """Bytes a fused computation reads of its value `name` when it only slices it (through bitcasts and nested
  fusions); None when it reads all of it."""
  use = _users(c).get(name, [])
  if not use or depth > 8:
    return None
  total = 0.0
  for u in use:
    if u.op in _SLICING and u.operands[0] == name:
      total += u.result_bytes
    elif u.op == "bitcast":
      inner = _read_bytes(c, u.name, computations, depth + 1)
      if inner is None:
        return None
      total += inner
    elif u.op == "fusion" and (u.called("calls") or [""])[0] in computations:
      fused = computations[u.called("calls")[0]]
      params = _params(fused)
      for k, o in enumerate(u.operands):
        if o != name:
          continue
        inner = _read_bytes(fused, params.get(k, ""), computations, depth + 1)
        if inner is None:
          return None
        total += inner
    else:
      return None
  return total


def _operand_bytes(i: hlo.Instruction, c: hlo.Computation, computations: dict[str, hlo.Computation]) -> float:
  """Bytes an instruction reads and writes in HBM (a fusion's sliced operands at the slices' size; an in-place
  update at the update's size)."""
  ins = c.instructions
  operand_bytes = [ins[o].result_bytes if o in ins else 0 for o in i.operands]
  result = i.result_bytes
  if i.op in _SLICING:
    return 2.0 * result
  if i.op == "dynamic-update-slice":
    update = operand_bytes[1] if len(operand_bytes) > 1 else result
    return 2.0 * update
  fused = computations.get((i.called("calls") or [""])[0]) if i.op == "fusion" else None
  if fused is None:
    return float(sum(operand_bytes) + result)
  params = _params(fused)
  users = _users(fused)
  in_place = fused.root.op == "dynamic-update-slice"
  total = 0.0
  for k, nbytes in enumerate(operand_bytes):
    name = params.get(k, "")
    if in_place and nbytes == result and all(u.op == "dynamic-update-slice" for u in users.get(name, [1])):
      continue  # the buffer updated in place: only the update moves
    sliced = _read_bytes(fused, name, computations)
    total += nbytes if sliced is None else min(sliced, nbytes)
  if in_place:
    root = fused.root
    update = fused.instructions.get(root.operands[1]) if len(root.operands) > 1 else None
    return total + (update.result_bytes if update else result)
  return total + result


def program_cost(text: str, unknown_trips: int = 1) -> ProgramCost:
  """Per-body FLOPs, HBM bytes and collective bytes of a compiled program, with each body's runs per call."""
  computations = hlo.parse(text)
  entry = next((c for c in computations.values() if c.entry), None)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  bodies: list[Body] = []
  unknown = 0

  def flops_of(c: hlo.Computation, seen: set[str]) -> float:
    """FLOPs of c and the fusions / reductions it calls (not its loops)."""
    shape_of = _Shapes(c)
    total = 0.0
    for i in c.instructions.values():
      total += dot_flops(i, shape_of)
      if i.op in ("fusion", "reduce", "map", "sort", "scatter", "select-and-scatter", "reduce-window",
                  "all-reduce", "reduce-scatter"):
        for name in i.called("calls") + i.called("to_apply"):
          if name in computations and name not in seen:
            total += flops_of(computations[name], seen | {name})
    return total

  def visit(c: hlo.Computation, trips: int, loop: str, decode: bool) -> None:
    nonlocal unknown
    shape_of = _Shapes(c)
    hbm = 0.0
    coll: dict[str, dict[str, float]] = {}
    first_unknown = True
    for i in c.instructions.values():
      base = i.op[:-len("-start")] if i.op.endswith("-start") else i.op
      if base in COLLECTIVES:
        o = coll.setdefault(base, {"count": 0, "bytes": 0.0})
        o["count"] += 1
        o["bytes"] += _collective_bytes(i, base, shape_of)
      elif i.op == "while":
        condition = computations.get((i.called("condition") or [""])[0])
        found = hlo.trip_count(condition, computations.get((i.called("body") or [""])[0])) if condition else None
        inner = decode or found is None or not found[1]  # a loop that may end early: a decode loop
        if found is None:  # the engine's loops: see the module docstring
          unknown += 1
          n = unknown_trips if first_unknown and not decode else 0
          first_unknown = False
        else:
          n = found[0]
        for name in i.called("body"):
          if name in computations:
            visit(computations[name], trips * n, i.name, inner)
        if condition:
          visit(condition, trips * (n + 1), i.name, inner)
      elif i.op in ("call", "conditional"):
        for name in i.called("to_apply") + i.called("branch_computations"):
          if name in computations:
            visit(computations[name], trips, loop, decode)
      elif i.op not in _FREE and not i.op.endswith("-done"):
        hbm += _operand_bytes(i, c, computations)
    bodies.append(Body(c.name, trips, flops_of(c, {c.name}), hbm,
                       sum(v["bytes"] for v in coll.values()), coll, loop, decode))

  visit(entry, 1, "", False)
  return ProgramCost(bodies, unknown)
