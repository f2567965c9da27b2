"""A sweep's runs side by side: one row per run, its overrides, state, progress and held-out numbers.

  python launch/sweep.py report --root /tmp/sweeps/rm                       # a table on the console
  python launch/sweep.py report --root /tmp/sweeps/rm --sort eval/accuracy --format markdown
  python launch/sweep.py report --root /tmp/sweeps/rm --plot eval/accuracy  # + <root>/eval_accuracy.png
  python launch/sweep.py report --root gs://my-bucket/sweeps/rm              # a sweep on Cloud Storage

Read from <root>/sweep.json and each run's directory under --root (any folder with a config.json): the
overrides, the state (done: sweep_done.json; else sweep.json's state; else running/stopped when it has
metrics, queued when not), the steps done, the last train loss, and the algorithm's main held-out numbers,
last and best (SFT eval/loss, reward eval/accuracy, DPO eval/rewards/accuracies and margins, KTO the rewards'
gap, PPO/GRPO eval/scores and eval/kl). --sort orders by a metric's last value, best first (lowest for losses
and KL, else highest); runs without it last.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys

from rlhfx import metrics, storage

# the held-out numbers each algorithm is judged by
MAIN = {"sft": ("eval/loss",), "reward": ("eval/accuracy",),
        "dpo": ("eval/rewards/accuracies", "eval/rewards/margins"), "ppo": ("eval/scores", "eval/kl"),
        "grpo": ("eval/scores", "eval/kl")}
KTO = ("eval/rewards/chosen", "eval/rewards/rejected")
LOWER_IS_BETTER = ("loss", "kl", "perplexity")


def lower_is_better(metric: str) -> bool:
  return any(word in metric.rsplit("/", 1)[-1] for word in LOWER_IS_BETTER)


def _state(run, entry: dict, rows: list[dict]) -> str:
  if (run / "sweep_done.json").exists():
    return "done"
  if entry.get("state"):  # the TPU backend's queue (launch/queue.py)
    return entry["state"]
  status = entry.get("status")
  if status:
    return {"finished": "done"}.get(status, status)
  return "running/stopped" if rows else "queued"


def run_row(run, entry: dict | None) -> dict:
  """One run's row: name, overrides, state, steps, train loss, and last/best of its main held-out metrics (a run
  that never started, e.g. a bad override, has its sweep.json status and nothing else)."""
  config = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
  algorithm = config.get("algorithm", "")
  rows = metrics.rows(run)
  train = [r for r in rows if "train/loss" in r]
  judged_by = KTO if algorithm == "dpo" and config.get("dpo", {}).get("loss") == "kto" else MAIN.get(algorithm, ())
  row = {"run": run.name, "overrides": " ".join((entry or {}).get("overrides", [])).replace("--config.", ""),
         "algorithm": algorithm, "state": _state(run, entry or {}, rows),
         "steps": f"{train[-1]['step'] if train else 0}/{config.get('train', {}).get('num_steps', '?')}",
         "train/loss": train[-1]["train/loss"] if train else None}
  for metric in judged_by:
    values = [r[metric] for r in rows if metric in r and isinstance(r[metric], (int, float))]
    best = (min if lower_is_better(metric) else max)(values) if values else None
    row[f"{metric} last"], row[f"{metric} best"] = (values[-1] if values else None), best
  return row


def collect(root) -> list[dict]:
  """Every run of <root>/sweep.json, in its order, then any other folder under `root` with a config.json."""
  text = storage.read_text(root / "sweep.json")
  record = json.loads(text) if text else []
  listed = record.get("runs", []) if isinstance(record, dict) else record  # the TPU backend's {"runs": ...}
  entries = {e["name"]: e for e in listed}
  others = sorted(p.name for p in root.iterdir() if (p / "config.json").exists() and p.name not in entries)
  return [run_row(root / name, entries.get(name)) for name in [*entries, *others]]


def sort_rows(rows: list[dict], metric: str) -> list[dict]:
  key = metric if metric in ("train/loss",) else f"{metric} last"
  if not any(r.get(key) is not None for r in rows):
    raise SystemExit(f"--sort {metric}: no run has it (columns: {', '.join(columns(rows))})")
  sign = 1 if lower_is_better(metric) else -1
  return sorted(rows, key=lambda r: (r.get(key) is None, sign * r[key] if r.get(key) is not None else 0))


def columns(rows: list[dict]) -> list[str]:
  out: list[str] = []
  for row in rows:
    out += [k for k in row if k not in out]
  return out


def _cell(value) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.4g}" if math.isfinite(value) else str(value)
  return str(value)


def render(rows: list[dict], fmt: str) -> str:
  cols = columns(rows)
  if fmt == "json":
    return json.dumps(rows, indent=2)
  if fmt == "csv":
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().rstrip("\n")
  cells = [[_cell(r.get(c)) for c in cols] for r in rows]
  if fmt == "markdown":
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                     + ["| " + " | ".join(line) + " |" for line in cells])
  widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(cols)]
  return "\n".join("  ".join(text.ljust(w) for text, w in zip(line, widths)).rstrip() for line in [cols, *cells])


def plot(root, rows: list[dict], metric: str):
  """A PNG of each run's `metric` over steps: <root>/<metric with / as _>.png (local or gs://)."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
  fig, ax = plt.subplots(figsize=(8, 5))
  drawn = 0
  for row in rows:
    points = [(r["step"], r[metric]) for r in metrics.rows(root / row["run"]) if metric in r]
    if points:
      ax.plot(*zip(*points), marker="o" if len(points) < 20 else None, label=row["run"])
      drawn += 1
  if not drawn:
    raise SystemExit(f"--plot {metric}: no run logged it")
  ax.set_xlabel("step")
  ax.set_ylabel(metric)
  ax.set_title(f"{root.name}: {metric}")
  ax.legend(fontsize=7)
  fig.tight_layout()
  name = f"{metric.replace('/', '_')}.png"
  fig.savefig(storage.staging(root) / name, dpi=110)
  storage.publish(storage.staging(root) / name, root / name)
  return root / name


def main(argv=None, out=None) -> int:
  out = out or sys.stdout
  p = argparse.ArgumentParser(prog="launch/sweep.py report", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--root", required=True, help="the sweep's directory (launch/sweep.py --root)")
  p.add_argument("--sort", default="", help="a metric (eval/accuracy, train/loss, ...): its last value, best first")
  p.add_argument("--format", default="table", choices=["table", "markdown", "csv", "json"])
  p.add_argument("--plot", default="", help="a metric: each run's curve over steps, as <root>/<metric>.png")
  args = p.parse_args(argv)
  root = storage.path(args.root)
  if not root.is_dir():
    p.error(f"--root {root}: no such directory")
  rows = collect(root)
  if not rows:
    p.error(f"--root {root}: no runs (folders with a config.json) in it")
  if args.sort:
    rows = sort_rows(rows, args.sort)
  print(render(rows, args.format), file=out, flush=True)
  if args.plot:
    print(f"plot: {plot(root, rows, args.plot)}", file=out if args.format == "table" else sys.stderr, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
