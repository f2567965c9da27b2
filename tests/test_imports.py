"""The import graph of rlhfx/ has no cycle: every `import` and `from ... import` in every module, at the top or
inside a function, is an edge (a module reached through its package counts as the module)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "rlhfx"


def import_graph() -> dict[str, set[str]]:
  modules = {}
  for path in ROOT.rglob("*.py"):
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  graph = {name: set() for name in modules}
  for name, path in modules.items():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                   for a in node.names]
      else:
        continue
      for target in targets:
        while target not in modules and "." in target:
          target = target.rsplit(".", 1)[0]
        if target in modules and target != name:
          graph[name].add(target)
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
  """A cycle of `graph` as [a, b, ..., a], or [] (depth-first search)."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    state[node] = "done"
    stack.pop()
    return []

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return []


def test_the_search_finds_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_rlhfx_imports_have_no_cycle():
  graph = import_graph()
  assert {"rlhfx.rollout", "rlhfx.scoring", "rlhfx.onpolicy", "rlhfx.algorithms.dpo"} <= set(graph)
  assert "rlhfx.scoring" in graph["rlhfx.onpolicy"]  # edges are read
  assert find_cycle(graph) == [], " -> ".join(find_cycle(graph))
