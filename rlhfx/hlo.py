"""A compiled program's HLO text as computations and instructions, and each `while` loop's trip count.

  computations = hlo.parse(compiled.as_text())
  trips, early_exit = hlo.trip_count(computations[condition_name], computations[body_name])

A loop's trip count is read from its condition (`i < N`, `i + c < N`, counting from 0 by the
step its body adds, which must be a constant); a loop that may also end early (a decode loop
that stops when every row has emitted EOS) is counted at that limit. What a call costs, with
these counts applied, is `rlhfx.hlo_cost`.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
               "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8,
               "c128": 16}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->\s*(.*)\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
OPERAND = re.compile(r"%([\w.\-]+)")


def shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in ARRAY.findall(text)
          if dtype in DTYPE_BYTES]


def nbytes(shapes) -> int:
  return sum(DTYPE_BYTES[dtype] * int(np.prod(dims, dtype=np.int64)) for dtype, dims in shapes)


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str  # the result's shape text (an array or a tuple)
  op: str
  operands: list[str]
  attributes: str
  root: bool
  args: str = ""  # the text inside the parentheses (a constant's value)

  @property
  def result_bytes(self) -> int:
    return nbytes(shapes(self.shape))

  def called(self, key: str) -> list[str]:
    m = re.search(key + r"=\{?([^}]*?)\}?(?:,\s*[a-z_]+=|$)", self.attributes)
    return [n.strip().lstrip("%") for n in m.group(1).split(",")] if m else []


@dataclasses.dataclass
class Computation:
  name: str
  instructions: dict[str, Instruction]
  entry: bool = False

  @property
  def root(self) -> Instruction | None:
    return next((i for i in self.instructions.values() if i.root), None)


def parse(text: str) -> dict[str, Computation]:
  """The computations of an HLO module's text, by name."""
  out: dict[str, Computation] = {}
  current = None
  for line in text.splitlines():
    if current is None:
      m = _COMPUTATION.match(line)
      if m:
        current = Computation(m.group(1), {}, entry=line.startswith("ENTRY"))
      continue
    if line.rstrip() == "}":  # (a kernel's multi-line backend config may start a line with "}}")
      out[current.name] = current
      current = None
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    root, name, shape, op, rest = m.groups()
    depth, cut = 1, len(rest)
    for i, ch in enumerate(rest):  # the operand list ends at the matching parenthesis
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        cut = i
        break
    current.instructions[name] = Instruction(name, shape, op, OPERAND.findall(rest[:cut]), rest[cut + 1:],
                                             bool(root), rest[:cut])
  return out


def _step(body: Computation | None, index: int) -> int | None:
  """c when the loop body's tuple element `index` is that element plus a constant c > 0 (through copies and
  bitcasts, or in a fusion named after its add: c = 1); None when it is not a counter."""
  if body is None:
    return 1
  root = body.root
  if root is None or root.op != "tuple" or index >= len(root.operands):
    return None
  ins = body.instructions

  def through(name):
    x = ins.get(name)
    while x is not None and x.op in ("copy", "bitcast", "convert") and x.operands:
      x = ins.get(x.operands[0])
    return x

  def is_element(name):
    x = through(name)
    return x is not None and x.op == "get-tuple-element" and re.search(rf"index={index}\b", x.attributes)

  def value(name):
    x = through(name)
    return int(x.args) if x is not None and x.op == "constant" and re.fullmatch(r"\s*\d+\s*", x.args) else None

  new = through(root.operands[index])
  if new is not None and new.op == "add" and len(new.operands) == 2:
    a, b = new.operands
    step = value(b) if is_element(a) else value(a) if is_element(b) else None
    return step if step else None
  if new is not None and new.op == "fusion" and "add" in new.name and any(is_element(o) for o in new.operands):
    return 1
  return None


def trip_count(condition: Computation, body: Computation | None = None) -> tuple[int, bool] | None:
  """(N, exact) of a loop whose condition is `i < N` or `i + c < N` on a counter from 0 (exact: nothing else
  ends it; otherwise N is its limit, as a decode loop's that stops at EOS, the smallest of several); None when
  it is neither."""
  ins = condition.instructions

  def constant(name):
    i = ins.get(name)
    if i is None or i.op != "constant" or not re.fullmatch(r"\s*-?\d+\s*", i.args):
      return None
    return int(i.args)

  found = []
  for i in ins.values():
    if i.op != "compare" or "direction=LT" not in i.attributes or len(i.operands) != 2:
      continue
    bound = constant(i.operands[1])
    if bound is None:
      continue
    lhs = ins.get(i.operands[0])
    offset = 0
    if lhs is not None and lhs.op == "add" and len(lhs.operands) == 2:
      offset = next((c for c in map(constant, lhs.operands) if c is not None), 0)
      lhs = next((ins[o] for o in lhs.operands if o in ins and ins[o].op != "constant"), None)
    m = re.search(r"index=(\d+)", lhs.attributes) if lhs is not None and lhs.op == "get-tuple-element" else None
    step = _step(body, int(m.group(1))) if m else None
    if step is None:
      continue  # not a counter of the loop's steps (a bound on something else)
    found.append((max(-(-(bound - offset) // step), 0), condition.root is i))
  return min(found) if found else None  # several limits (a decode loop's bucket and its length): the first met
