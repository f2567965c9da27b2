"""A sweep in one program against the same sweep as separate runs: wall-clock and peak memory, one JSON line.

  python benchmarks/members.py [--steps 50] [--betas 0.05,0.1,0.3,0.5] [--lrs 1e-3,3e-3] [-- --config.a.b=v ...]

The sweep is 4 betas x 2 learning rates of configs/dpo_hh.py:tiny (8 DPO runs, 50 steps each), run twice
through launch/sweep.py: `--together` (one program of 8 members, python -m rlhfx.together) and as 8 separate
runs one after another (python -m rlhfx.main each), each side in a fresh root, timed from the command's start
to its end (start-up, the dataset, compilation, every evaluation and export included). Peak RSS is the largest
resident set of the command or any process it ran (getrusage of the waited child). Overrides after `--` go to
every run (this machine has no network: point data.train_files and data.tokenizer at local copies).
"""

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhfx import members  # noqa: E402



def cpu() -> dict:
  """The CPU model and the flags the step time depends on."""
  model, flags = platform.processor(), set()
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
      elif line.startswith("flags"):
        flags = set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return {"cpu": model, "cores": os.cpu_count(), "flags": sorted(flags & {"avx512f", "avx512_bf16", "amx_bf16"})}


def timed(command: list[str], log: pathlib.Path) -> tuple[float, float, int]:
  """(seconds, peak RSS in GiB, exit status) of a command run to its end."""
  began = time.perf_counter()
  with open(log, "w") as out:
    proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
  return time.perf_counter() - began, usage.ru_maxrss / 2**20, os.waitstatus_to_exitcode(status)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--betas", default="0.05,0.1,0.3,0.5")
  p.add_argument("--lrs", default="1e-3,3e-3")
  p.add_argument("--keep", default="", help="keep the sweeps' roots under this folder (default: a temporary one)")
  p.add_argument("overrides", nargs="*", help="after --: overrides for every run")
  args = p.parse_args()
  betas = tuple(float(b) for b in args.betas.split(","))
  lrs = tuple(float(x) for x in args.lrs.split(","))
  work = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="rlhfx-members-"))
  work.mkdir(parents=True, exist_ok=True)
  config = work / "dpo_sweep.py"
  config.write_text(members.sweep_file(ROOT / "configs" / "dpo_hh.py",
                                      [{"dpo.beta": b, "optim.learning_rate": lr} for b in betas for lr in lrs]))
  extra = ["--", f"--config.train.num_steps={args.steps}", *args.overrides]
  record = {"benchmark": "members", "config": "configs/dpo_hh.py:tiny", "members": len(betas) * len(lrs),
            "betas": betas, "learning_rates": lrs, "steps": args.steps, **cpu()}
  for side, flag in (("together", ["--together"]), ("separate", [])):
    command = [sys.executable, "launch/sweep.py", "--config", f"{config}:tiny", "--root", str(work / side), *flag,
               *extra]
    seconds, rss, status = timed(command, work / f"{side}.log")
    if status != 0:
      raise SystemExit(f"{side}: exit status {status}; see {work / f'{side}.log'}")
    record.update({f"{side}_s": round(seconds, 1), f"{side}_peak_rss_gib": round(rss, 2)})
    print(f"{side}: {seconds:.0f} s, peak RSS {rss:.2f} GiB", file=sys.stderr, flush=True)
  record["speedup"] = round(record["separate_s"] / record["together_s"], 2)
  print(json.dumps(record), flush=True)


if __name__ == "__main__":
  main()
