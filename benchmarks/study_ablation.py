"""Why PPO stays below best-of-N in the sentiment study: PPO ablations traced along training, like the study.

  python benchmarks/sentiment_study.py --out-dir /tmp/study           # first: the reward model and the study
  python benchmarks/study_ablation.py --study-dir /tmp/study --out-dir /tmp/ablation

Every arm is the study's PPO run (the same reward model, prompts, evaluator, checkpoints along
training) at one KL coefficient and learning rate, with one change:
  baseline          the study's settings: per-token k1 KL penalty in the reward, advantages whitened
  whiten_rewards    per-token rewards whitened (mean kept) before GAE
  kl_loss_k3        the KL as a per-token k3 loss term instead of a reward penalty (GRPO's form)
  kl_sequence       the KL penalty of a completion summed onto its last token (per-sequence, not per-token)
The learning rate is the study's own axis (its runs at 3e-4 ... 1e-5); a value-function warm-up is not
an rlhfx option and is not measured.
Writes ablation.json (every point) and ablation.md (each arm's reward at matched KL, from its envelope).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import sentiment_study as study  # noqa: E402

ARMS = {
    "baseline": {},
    "whiten_rewards": {"whiten_rewards": True},
    "kl_loss_k3": {"kl_in": "loss", "kl_estimator": "k3"},
    "kl_sequence": {"kl_penalty": "sequence"},
}


def run(study_dir: pathlib.Path, out: pathlib.Path, kl_coef: float, lr: float) -> dict:
  from rlhfx.algorithms import ppo

  v = study.VARIANTS["full"]
  out.mkdir(parents=True, exist_ok=True)
  train_prompts, eval_prompts = study.story_openings()
  rm_dir = study_dir / "reward_model"
  evaluator = study.Evaluator(rm_dir, eval_prompts[:v.eval_prompts], v)
  reference = evaluator.evaluate(evaluator.reference)
  prompts_file = study.write_jsonl(out / "inputs" / "train_prompts.jsonl", [{"prompt": p} for p in train_prompts])
  results = {"kl_coef": kl_coef, "lr": lr, "reference": reference, "arms": {}, "timings": {}}
  for arm, changes in ARMS.items():
    t0 = time.perf_counter()
    workdir = out / arm
    ppo.train(study.ppo_config(prompts_file, rm_dir, kl_coef, lr, v, **changes), workdir)
    results["arms"][arm] = study.curve(evaluator, workdir, "ppo", {"arm": arm, "kl_coef": kl_coef, "lr": lr},
                                       reference)
    results["timings"][arm] = time.perf_counter() - t0
  best_of = json.loads((study_dir / "results.json").read_text())["best_of_n"]
  results["best_of_n"] = best_of
  (out / "ablation.json").write_text(json.dumps(results, indent=2))
  (out / "ablation.md").write_text(table(results))
  return results


def table(results: dict) -> str:
  lines = [f"PPO ablations at kl_coef = {results['kl_coef']}, lr = {results['lr']:g}: reward at matched KL from each "
           "arm's envelope (its KL in brackets).", ""]
  lines += study.matched_kl_table({"best-of-N": study.best_of_points(results), **results["arms"]}, label="arm")
  last = {arm: max(points, key=lambda p: p["step"]) for arm, points in results["arms"].items()}
  lines += ["", "Last checkpoints: " + "; ".join(f"{arm} {p['reward']:.3f} at KL {p['kl']:.2f} (step {p['step']})"
                                                for arm, p in last.items()) + ".",
            "", "Wall time per arm: " + ", ".join(f"{k} {v:.0f} s" for k, v in results["timings"].items()) + "."]
  return "\n".join(lines) + "\n"


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--study-dir", default="/tmp/study")
  p.add_argument("--out-dir", default="/tmp/ablation")
  p.add_argument("--kl-coef", type=float, default=0.2)
  p.add_argument("--lr", type=float, default=3e-5)
  args = p.parse_args()
  results = run(pathlib.Path(args.study_dir), pathlib.Path(args.out_dir), args.kl_coef, args.lr)
  print(table(results))


if __name__ == "__main__":
  main()
