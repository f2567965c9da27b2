"""rlhfx against Hugging Face TRL on this machine: the same shapes, interleaved runs, medians and ratios.

  python benchmarks/compare_trl.py --trl-venv /tmp/venv-trl                  # tiny and small, 3 runs each
  python benchmarks/compare_trl.py --trl-venv /tmp/venv-trl --size tiny --runs 5 --work dpo reward

For each row, rlhfx's script (benchmarks/) and TRL's (../shared/bench/trl/, run with the
--trl-venv interpreter; see its README for the set-up) alternate A B A B ... --runs times, so
drift of this noisy 2-core machine hits both sides alike. Each run is a fresh process that
prints one JSON line; the table has the medians of tokens/s over the runs, the ratio
rlhfx / TRL, the target of the Performance issue, peak RSS, and for training steps the
achieved GFLOP/s next to the matmul peak measured in the same run. Compile time is reported
separately (rlhfx's first step); it is never inside the timed steps.

The table, the machine, the versions and every command go to BENCHMARKS.md between the
`compare_trl:<size>` markers (the rest of that file - profiles, notes - is kept).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import shlex
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRL = ROOT.parent / "shared" / "bench" / "trl"

def markers(size: str) -> tuple[str, str]:
  """The lines around one size's generated block in BENCHMARKS.md."""
  return f"<!-- compare_trl:{size}:begin -->", f"<!-- compare_trl:{size}:end -->"


SIZES = {
    "tiny": {"model": ["--n-layer", "2", "--n-embd", "128", "--n-head", "4", "--vocab", "1024"],
             "train": ["--seq", "128", "--batch", "4"], "train_steps": "30",
             "generate": ["--batch", "4", "--prompt-len", "64", "--new-tokens", "64"],
             "shape": {"train": "2 layers, 128 wide, vocab 1024; 4 pairs x 128", "generate": "batch 4, 64 + 64"}},
    "small": {"model": ["--n-layer", "12", "--n-embd", "768", "--n-head", "12", "--vocab", "50257"],
              "train": ["--seq", "256", "--batch", "2"], "train_steps": "5",
              "generate": ["--batch", "2", "--prompt-len", "128", "--new-tokens", "128"],
              "shape": {"train": "GPT-2 small; 2 pairs x 256", "generate": "GPT-2 small; batch 2, 128 + 128"}},
}
# (work, size, bf16) -> target ratio rlhfx / TRL of tokens/s (from the Performance issue)
TARGETS = {("dpo", "small", False): 1.5, ("dpo", "tiny", False): 2.0, ("dpo", "small", True): 1.5,
           ("reward", "small", False): 1.0, ("reward", "tiny", False): 2.0, ("generate", "small", False): 1.5,
           ("generate", "tiny", False): 5.0}
SCRIPTS = {"dpo": ("dpo_step.py", "dpo_step.py"), "reward": ("reward_step.py", "rm_step.py"),
           "generate": ("generate.py", "generate.py")}


def commands(work: str, size: str, bf16: bool, trl_python: str, rlhfx_flags: list[str]) -> tuple[list, list]:
  s = SIZES[size]
  mine, theirs = SCRIPTS[work]
  if work == "generate":
    flags = s["model"] + s["generate"]
  else:
    flags = s["model"] + s["train"] + ["--steps", s["train_steps"]] + (["--bf16"] if bf16 else [])
  return ([sys.executable, str(ROOT / "benchmarks" / mine), *flags, *rlhfx_flags],
          [trl_python, str(TRL / theirs), *flags])


def run_json(command: list[str], timeout: int) -> dict:
  proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                        cwd=ROOT if "benchmarks" in command[1] else TRL)
  if proc.returncode != 0:
    raise RuntimeError(f"{shlex.join(command)} failed:\n{proc.stderr[-2000:]}")
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  return json.loads(lines[-1])


def median(records: list[dict], key: str):
  values = [r[key] for r in records if r.get(key) is not None]
  return statistics.median(values) if values else None


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what bf16 and f32 matmul speed depend on


def machine() -> dict:
  """The CPU model, its cores and which of CPU_FLAGS it has (a ratio measured here is a fact about this CPU)."""
  cpu, flags = "", set()
  try:
    lines = open("/proc/cpuinfo").read().splitlines()
    cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    flags = set(next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags")))
  except (OSError, StopIteration):
    pass
  return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "os": platform.platform(),
          "python": platform.python_version(), "flags": {f: f in flags for f in CPU_FLAGS}}


def versions(trl_python: str) -> dict:
  import flax
  import jax

  theirs = subprocess.run([trl_python, "-c", "import json, torch, trl, transformers; print(json.dumps("
                           "{'torch': torch.__version__, 'trl': trl.__version__, "
                           "'transformers': transformers.__version__}))"], capture_output=True, text=True)
  out = {"jax": jax.__version__, "flax": flax.__version__}
  if theirs.returncode == 0:
    out.update(json.loads(theirs.stdout.strip().splitlines()[-1]))
  return out


def fmt(x, spec=",.0f"):
  return "-" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
  lines = ["| work | shape | rlhfx tokens/s | TRL tokens/s | ratio | target | met | rlhfx / TRL peak RSS (MB) "
           "| rlhfx GFLOP/s (matmul peak) | rlhfx compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    target = r["target"]
    met = "-" if target is None or r["ratio"] is None else ("yes" if r["ratio"] >= target else "no")
    gflops = "-" if r["gflops"] is None else f"{r['gflops']:.0f} ({r['peak']:.0f})"
    lines.append(f"| {r['work']}{' bf16' if r['bf16'] else ''} | {r['shape']} | {fmt(r['rlhfx'])} | {fmt(r['trl'])} "
                 f"| {fmt(r['ratio'], '.2f')}x | {'-' if target is None else f'>= {target}x'} | {met} "
                 f"| {fmt(r['rlhfx_rss'])} / {fmt(r['trl_rss'])} | {gflops} | {fmt(r['compile'], '.1f')} |")
  return "\n".join(lines)


def flag_words(m: dict) -> str:
  """"avx2 yes, avx512f yes, avx512_bf16 yes, amx_bf16 no"."""
  return ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in m.get("flags", {}).items())


def display(command: list[str], trl_python: str) -> str:
  """A command as a reader would type it: relative paths, `python` for this interpreter."""
  words = [w.replace(str(ROOT) + "/", "").replace(str(TRL), "../shared/bench/trl") for w in command[1:]]
  python = {sys.executable: "python", trl_python: "<trl-venv>/bin/python"}.get(command[0], command[0])
  return f"{python} {shlex.join(words)}"


def write_markdown(path: pathlib.Path, size: str, rows, cmds, info, args_line: str, trl_python: str) -> None:
  begin, end = markers(size)
  block = [begin, f"## rlhfx vs TRL, {size} ({datetime.date.today().isoformat()})", "",
           f"Machine: {info['machine']['cpu']}, {info['machine']['cores']} cores "
           f"({flag_words(info['machine'])}), "
           f"{info['machine']['os']}. "
           f"Versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + ".", "",
           f"Made by `python benchmarks/compare_trl.py {args_line}`: medians of {info['runs']} interleaved runs "
           "(A B A B), fp32 unless the row says bf16; tokens/s counts chosen + rejected rows for training steps "
           "and generated tokens for generation.", "", table(rows), "", "Commands (one run of each side):", "",
           "```"] + [display(c, trl_python) for c in cmds] + ["```", end]
  text = path.read_text() if path.exists() else "# Benchmarks\n\n"
  if begin in text and end in text:
    text = text[:text.index(begin)] + "\n".join(block) + text[text.index(end) + len(end):]
  else:
    text = text.rstrip("\n") + "\n\n" + "\n".join(block) + "\n"
  path.write_text(text)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--trl-venv", required=True, help="virtualenv with torch==2.13.0 and trl (../shared/bench/trl)")
  p.add_argument("--size", default="all", choices=["tiny", "small", "all"])
  p.add_argument("--work", nargs="+", default=["dpo", "reward", "generate"], choices=sorted(SCRIPTS))
  p.add_argument("--bf16", action="store_true", help="also the small DPO step with bf16 compute on both sides")
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--rlhfx-flags", default="", help="extra flags for rlhfx's scripts, e.g. '--eigen-threads off'")
  p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
  p.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
  p.add_argument("--jsonl", default=None, help="also append every run's JSON line here")
  args = p.parse_args()
  trl_python = str(pathlib.Path(args.trl_venv) / "bin" / "python")
  sizes = ["tiny", "small"] if args.size == "all" else [args.size]
  plan = [(w, s, False) for s in sizes for w in args.work]
  if args.bf16 and "small" in sizes and "dpo" in args.work:
    plan.append(("dpo", "small", True))
  rows, cmds = [], []
  for work, size, bf16 in plan:
    mine, theirs = commands(work, size, bf16, trl_python, shlex.split(args.rlhfx_flags))
    cmds += [mine, theirs]
    a, b = [], []
    for i in range(args.runs):
      for side, command, sink in (("rlhfx", mine, a), ("trl", theirs, b)):
        record = run_json(command, args.timeout)
        sink.append(record)
        print(f"{work:8s} {size:5s}{' bf16' if bf16 else ''} run {i + 1}/{args.runs} {side:5s} "
              f"{record['tokens_per_s']:,.0f} tokens/s", file=sys.stderr, flush=True)
        if args.jsonl:
          with open(args.jsonl, "a") as f:
            f.write(json.dumps({"side": side, "work": work, "size": size, "bf16": bf16, **record}) + "\n")
    ours, theirs_tps = median(a, "tokens_per_s"), median(b, "tokens_per_s")
    rows.append({"work": work, "size": size, "bf16": bf16,
                 "shape": SIZES[size]["shape"]["generate" if work == "generate" else "train"],
                 "rlhfx": ours, "trl": theirs_tps, "ratio": ours / theirs_tps if ours and theirs_tps else None,
                 "target": TARGETS.get((work, size, bf16)), "rlhfx_rss": median(a, "peak_rss_mb"),
                 "trl_rss": median(b, "peak_rss_mb"), "gflops": median(a, "achieved_gflops"),
                 "peak": median(a, "matmul_peak_gflops"), "compile": median(a, "compile_s")})
  info = {"machine": machine(), "versions": versions(trl_python), "runs": args.runs}
  args_line = " ".join(shlex.quote(x) for x in sys.argv[1:])
  args_line = re.sub(r"--trl-venv \S+", "--trl-venv <venv>", args_line)
  args_line = re.sub(r" ?--(jsonl|markdown) \S+", "", args_line)  # where the records went is not how they were made
  print(table(rows))
  print(json.dumps({"rows": rows, **info}))
  write_markdown(pathlib.Path(args.markdown), args.size, rows, cmds, info, args_line, trl_python)


if __name__ == "__main__":
  main()
