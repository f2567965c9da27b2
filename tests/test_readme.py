"""The outputs README.md quotes are what the commands print today.

Each quoted block is run here and compared line by line: paths of the run's own folders are put back to the
README's, and what varies from machine to machine (times, speeds, MFU, ETA) is masked. Figures the README quotes
from commands too long for the suite (the planner at scale, the RL curves, the study) carry their date and
machine in the README instead.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TIMEOUT = 300

# what a machine changes: durations ("0.5 s", "took 1.8 s"), speeds, MFU, ETA
VARYING = [(re.compile(r"\b\d+(\.\d+)? s\b"), "<t> s"), (re.compile(r"[\d,]+ tok/s"), "<n> tok/s"),
           (re.compile(r"MFU [\d.]+%"), "MFU <p>%"), (re.compile(r"ETA \d+m\d+s"), "ETA <t>")]


def quoted_block(after: str) -> list[str]:
  """The indented block that follows the first README line containing `after` (blank lines inside kept)."""
  lines = README.splitlines()
  start = next(i for i, line in enumerate(lines) if after in line) + 1
  while not lines[start].startswith("    "):
    start += 1
  block = []
  for line in lines[start:]:
    if line and not line.startswith("    "):
      break
    block.append(line[4:])
  while block and not block[-1]:
    block.pop()
  return block


def masked(lines) -> list[str]:
  out = []
  for line in lines:
    for pattern, replacement in VARYING:
      line = pattern.sub(replacement, line)
    out.append(line)
  return out


def _cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                        env={**os.environ, **(env or {})})


def test_the_quickstart_prints_what_the_readme_shows_and_learns_the_task(tmp_path):
  """The README's first command, its whole output (here in the test environment; .ci/run also runs it in a fresh
  virtualenv), and what it learns: exact match from 0% to >= 80%, held-out samples that are the references."""
  workdir = tmp_path / "quickstart"
  proc = _cli("rlhfx.main", "--config=configs/quickstart.py", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = masked(proc.stdout.replace(str(workdir), "/tmp/rlhfx-quickstart").splitlines())
  want = masked(quoted_block("trains a 2-layer model (107k parameters"))
  if "tensorboard --logdir /tmp" in got[-1]:  # the viewer installed here: the line a fresh install prints differs
    got[-1] = want[-1]
  assert got == want
  summary = proc.stdout.split("== summary ==")[1]
  before, after = summary.split("exact-match accuracy on held-out prompts ")[1].split("\n")[0].split(" -> ")
  assert int(after.rstrip("%")) >= 80 > int(before.rstrip("%"))
  assert (workdir / "hf" / "config.json").exists() and (workdir / "hf" / "tokenizer.json").exists()
  # held-out samples at each evaluation: the last ones are the references (the task is learnt), the first not
  samples = [json.loads(line) for line in (workdir / "samples.jsonl").read_text().splitlines()]
  steps = sorted({s["step"] for s in samples})
  assert len(steps) >= 2 and all(len([s for s in samples if s["step"] == k]) == 4 for k in steps)
  last = [s for s in samples if s["step"] == steps[-1]]
  assert sum(s["completion"] == s["reference"] for s in last) >= 3
  assert all(s["prompt"].startswith("reverse: ") for s in last)


def test_the_config_error_examples_print_what_the_readme_shows(tmp_path):
  """`$ command` / output pairs: the README cuts long lines with "...", so the output starts with what it shows."""
  block = quoted_block("checkpoints, a diverged run — exit 1, also in one line):")
  command = None
  for line in block:
    if line.startswith("$ "):
      words = line[2:].split()
      command = words if words[0] == "python" else command[:5] + words[1:]  # "$ ... --x" adds to the first
      continue
    args = [a if not a.startswith("--workdir=") else f"--workdir={tmp_path}" for a in command[2:]]
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith(line.removesuffix("...").rstrip()), (line, proc.stderr)


def test_the_offline_line_is_what_the_readme_shows(tmp_path):
  want = quoted_block("Without a network and with nothing cached a run stops in one line:")
  cache = tmp_path / "cache"
  proc = _cli("rlhfx.main", "--config=configs/dpo_hh.py:tiny", f"--workdir={tmp_path / 'run'}",
              env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
  assert proc.returncode == 1
  assert [proc.stderr.strip().replace(str(cache), "/root/.cache/huggingface/hub")] == want
