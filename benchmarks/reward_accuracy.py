"""Held-out accuracy of a reward model trained on the hh-rlhf harmless-base pairs, with its 95% interval.

  python benchmarks/reward_accuracy.py [--variant tiny] [--steps 300] [--workdir /tmp/rlhfx-reward-accuracy]

Trains configs/reward_hh.py:<variant> (tiny: a 2-layer random model with the GPT-2
tokenizer, ~1,980 train / ~323 held-out pairs split by content hash) and prints one
JSON line: held-out accuracy before and after, its Wilson 95% interval, and the run time.
"""

import argparse
import contextlib
import json
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variant", default="tiny")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--workdir", default=None)
  args = p.parse_args()

  from rlhfx.config import load

  config = load(f"{ROOT / 'configs' / 'reward_hh.py'}:{args.variant or ''}")
  config.train.num_steps = args.steps
  config.train.eval_every = 0

  from rlhfx.algorithms import reward

  workdir = args.workdir or tempfile.mkdtemp(prefix="rlhfx-reward-accuracy-")
  t0 = time.perf_counter()
  with contextlib.redirect_stdout(sys.stderr):
    final = reward.train(config, workdir)
  stats = json.loads((pathlib.Path(workdir) / "checkpoints" / "reward_stats.json").read_text())
  print(json.dumps({"impl": "rlhfx", "algo": "reward_accuracy", "variant": args.variant, "steps": args.steps,
                    "heldout_pairs": final.get("eval/pairs"), "heldout_accuracy": final.get("eval/accuracy"),
                    "accuracy_low95": final.get("eval/accuracy_low95"),
                    "accuracy_high95": final.get("eval/accuracy_high95"), "reward_stats": stats,
                    "wall_s": time.perf_counter() - t0, "workdir": workdir}))


if __name__ == "__main__":
  main()
