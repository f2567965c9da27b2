"""Reward and KL curves of PPO and GRPO on the programmatic letters reward; writes JSON (and a PNG when
matplotlib is installed) and prints one JSON summary line.

  python benchmarks/rl_curves.py --out-dir /tmp/rl_curves        # about 2 CPU minutes

Runs configs/ppo_letters.py and configs/grpo_letters.py through `python -m rlhfx.main`
(each in its own work directory under --out-dir) and collects, per iteration, the
training scores and KL (objective/scores, objective/kl) and, every eval, the held-out
mean score and KL(policy || reference).
"""

import argparse
import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNS = {"ppo": "configs/ppo_letters.py", "grpo": "configs/grpo_letters.py"}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out-dir", default="/tmp/rl_curves")
  p.add_argument("--variant", default="", help="config variant, e.g. tiny")
  p.add_argument("--eval-every", type=int, default=10)
  args = p.parse_args()
  out = pathlib.Path(args.out_dir)
  curves = {}
  for name, config in RUNS.items():
    workdir = out / name
    if workdir.exists():
      raise SystemExit(f"{workdir} exists; pass an empty --out-dir")
    t0 = time.perf_counter()
    spec = f"{config}:{args.variant}" if args.variant else config
    subprocess.run([sys.executable, "-m", "rlhfx.main", f"--config={spec}", f"--workdir={workdir}",
                    "--config.train.log_every=1", f"--config.train.eval_every={args.eval_every}"],
                   cwd=ROOT, check=True, capture_output=True, text=True)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    curves[name] = {
        "seconds": time.perf_counter() - t0,
        "train": [{"step": r["step"], "scores": r["objective/scores"], "kl": r["objective/kl"]}
                  for r in records if "objective/scores" in r and "objective/kl" in r],
        "eval": [{"step": r["step"], "scores": r["eval/scores"], "kl": r["eval/kl"]} for r in records
                 if "eval/scores" in r],
    }
  (out / "curves.json").write_text(json.dumps(curves, indent=1))
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_k) = plt.subplots(1, 2, figsize=(10, 4))
    for name, c in curves.items():
      ax_r.plot([e["step"] for e in c["train"]], [e["scores"] for e in c["train"]], label=f"{name} (train)")
      ax_r.plot([e["step"] for e in c["eval"]], [e["scores"] for e in c["eval"]], "o--", label=f"{name} (held-out)")
      ax_k.plot([e["step"] for e in c["train"]], [e["kl"] for e in c["train"]], label=name)
    ax_r.set(xlabel="iteration", ylabel="mean score (share of a-z bytes)")
    ax_k.set(xlabel="iteration", ylabel="KL(policy || reference), nats per completion")
    ax_r.legend(), ax_k.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
  except ImportError:
    pass
  summary = {name: {"seconds": round(c["seconds"], 1), "eval_start": c["eval"][0], "eval_end": c["eval"][-1]}
             for name, c in curves.items()}
  print(json.dumps({"curves": str(out / "curves.json"), **summary}), flush=True)


if __name__ == "__main__":
  main()
