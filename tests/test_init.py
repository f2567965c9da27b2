"""One construction per algorithm: the planner's abstract state and frozen trees are a real run's.

Each algorithm's `init` makes its state and frozen trees for `train()` (arrays) and for the
planner (ShapeDtypeStructs, `rlhfx.programs`); tests/init_trees.py builds both in a process of
8 CPU devices (fsdp 4 x tensor 2) and compares them leaf by leaf: tree structure, shapes, dtypes,
shardings.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

import init_trees

SCRIPT = pathlib.Path(__file__).with_name("init_trees.py")


@pytest.fixture(scope="module")
def compared():
  env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}
  proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return {r["case"]: r for r in map(json.loads, (line for line in proc.stdout.splitlines() if line.startswith("{")))}


@pytest.mark.parametrize("case", sorted(init_trees.CASES))
def test_the_planner_builds_the_state_and_frozen_trees_a_run_makes(compared, case):
  result = compared[case]
  assert result["leaves"] > 50  # policy, optimizer moments, frozen trees: every leaf compared
  assert result["differences"] == []
