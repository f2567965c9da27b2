"""The DPO paper's controlled-sentiment experiment (Rafailov et al. 2023, sec. 6.1) in miniature, on CPU.

  python benchmarks/sentiment_study.py --out-dir /tmp/study              # full: reward vs KL, PNG + tables
  python benchmarks/sentiment_study.py --variant quick --out-dir /tmp/q  # the test suite's smaller run

Real artifacts, none made by this project:
  policy = reference = the pretrained llama2.c stories260K (TinyStories), its tok512 tokenizer (the hub's
           karpathy/tinyllamas, through the Hugging Face cache);
  reward = a ScoreModel on the stories260K backbone trained (Bradley-Terry, rlhfx.algorithms.reward)
           on the 1,000 labelled IMDb sentences (UCI Sentiment Labelled Sentences), each pair one
           positive and one negative sentence (--imdb: imdb_labelled.txt); held-out pairwise accuracy is reported;
  prompts = story openings ("One day, Lily went to the park."), disjoint train / eval sets.
Methods:
  best-of-N  N samples of the reference, keep the highest-scoring (KL = log N - (N-1)/N);
  PPO        rlhfx.algorithms.ppo against the reward model, one run per (KL coefficient, learning rate);
  DPO        rlhfx.algorithms.dpo on pairs of reference samples ranked by the reward model,
             one run per (beta, learning rate).
Every PPO and DPO run is evaluated at `eval_points` checkpoints along training (its policy restored
from the run's Orbax checkpoint), so each traces a curve from the reference (KL 0). Every policy is
evaluated the same way: `eval_samples` samples for each eval prompt (fixed seeds), at temperature 1,
mean normalised reward-model score, and KL(policy || reference) estimated from the same samples as the
mean over completions of the sum over their sampled tokens of log pi - log pi_ref (the k1 estimator of
the sequence-level KL, unbiased under samples of pi; `rlhfx.rollout.sequence_kl`). Writes results.json
(every point), study.md (the points and each method's reward at matched KL, read from its upper
envelope) and study.png (all points, each method's envelope, best-of-N) to --out-dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import pathlib
import random
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
STORIES = "hf://karpathy/tinyllamas/stories260K"  # llama2.c's stories260K on the Hugging Face hub (rlhfx.hub)
IMDB = ROOT.parent / "shared" / "data" / "sentiment" / "imdb_labelled.txt"  # the default --imdb, where it is


@dataclasses.dataclass(frozen=True)
class Variant:
  rm_steps: int = 300
  ppo_runs: tuple = ((0.5, 3e-4), (0.2, 3e-4), (0.05, 3e-4), (0.2, 1e-4), (0.2, 3e-5), (0.2, 1e-5))  # (kl_coef, lr)
  ppo_iterations: int = 80
  dpo_runs: tuple = ((1.0, 3e-4), (0.3, 3e-4), (0.1, 3e-4), (0.3, 1e-4), (0.3, 3e-5))  # (beta, learning rate)
  dpo_steps: int = 150
  eval_points: int = 8  # checkpoints evaluated along each run, besides its start (the reference)
  best_of: tuple = (1, 2, 4, 8, 16, 64, 256)
  eval_prompts: int = 64
  eval_samples: int = 4
  dpo_samples: int = 4  # reference samples per train prompt ranked into pairs
  max_new_tokens: int = 32


VARIANTS = {"full": Variant(),
            # a learning rate of 0 checks the accounting: its checkpoints are the reference, KL 0, the same reward
            "quick": Variant(rm_steps=80, ppo_runs=((0.2, 3e-4), (0.2, 0.0)), ppo_iterations=16,
                             dpo_runs=((0.3, 3e-4), (0.3, 0.0)), dpo_steps=30, eval_points=2, best_of=(1, 4),
                             eval_samples=4, dpo_samples=2)}
MATCHED_KL = (1.0, 2.0, 4.0, 8.0)  # nats: where the table reads each method's envelope

STARTS = ["Once upon a time,", "One day,", "Yesterday,", "In the morning,", "After lunch,", "Last summer,"]
CHARACTERS = ["Lily", "Tim", "Sue", "Ben", "Max", "Anna", "a little dog", "a small bird", "the old man", "Mia"]
ACTIONS = ["went to the park.", "found a box.", "saw a big tree.", "met a new friend.", "played with a ball.",
           "looked at the sky."]


def story_openings() -> tuple[list[str], list[str]]:
  """(train, eval) story openings: all start x character x action combinations, split 2:1 by a fixed shuffle."""
  openings = [f"{s} {c} {a}" for s, c, a in itertools.product(STARTS, CHARACTERS, ACTIONS)]
  random.Random(0).shuffle(openings)
  cut = len(openings) * 2 // 3
  return openings[:cut], openings[cut:]


def imdb_pairs(path: pathlib.Path) -> list[dict]:
  """Each labelled sentence in exactly one pair: (positive, negative), in a fixed shuffled order."""
  pos, neg = [], []
  # split on "\n" only: a review contains U+0085 (NEXT LINE), which str.splitlines() would break at
  for line_number, line in enumerate(path.read_text(encoding="utf-8").rstrip("\n").split("\n"), 1):
    text, _, label = line.rpartition("\t")
    if label.strip() not in ("0", "1") or not text.strip():
      raise ValueError(f"{path}:{line_number}: expected 'sentence<TAB>0|1'")
    (pos if label.strip() == "1" else neg).append(text.strip())
  rng = random.Random(0)
  rng.shuffle(pos), rng.shuffle(neg)
  return [{"prompt": "", "chosen": " " + p, "rejected": " " + n} for p, n in zip(pos, neg)]


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def common(config, *, steps: int, batch: int) -> None:
  config.model.init_from = f"llama2c:{STORIES}/stories260K.bin"  # the pretrained policy
  config.data.tokenizer = f"{STORIES}/tok512.bin"  # its tokenizer
  config.train.num_steps = steps
  config.train.global_batch_size = batch
  config.train.log_every = max(1, steps // 4)
  config.train.checkpoint_every = steps
  config.train.eval_every = 0


def along_training(config, points: int) -> None:
  """Checkpoint `points` times, evenly, and keep them all (each is a point of the run's curve)."""
  config.train.checkpoint_every = max(1, config.train.num_steps // points)
  config.train.keep_checkpoints = points + 1


def reward_config(pairs_file, steps):
  from rlhfx.config import base_config

  c = base_config("reward")
  common(c, steps=steps, batch=16)
  c.data.train_files = (str(pairs_file),)
  c.data.input_format = "pairs"
  c.data.eval_fraction = 0.2  # about 100 held-out pairs (200 sentences)
  c.data.max_length, c.data.max_prompt_length, c.data.buckets = 96, 8, (64, 96)
  c.optim.learning_rate, c.optim.warmup_steps, c.optim.weight_decay = 3e-3, 20, 0.01
  c.train.export_hf = False
  return c


def ppo_config(prompts_file, rm_dir, kl_coef, learning_rate, v: Variant, **ppo_changes):
  from rlhfx.config import base_config

  c = base_config("ppo")
  common(c, steps=v.ppo_iterations, batch=32)
  along_training(c, v.eval_points)
  c.data.train_files, c.data.eval_fraction = (str(prompts_file),), 0.0
  c.data.max_length, c.data.max_prompt_length, c.data.buckets = 64, 24, (24,)
  c.scoring.model = str(rm_dir)
  c.rollout.max_new_tokens = v.max_new_tokens
  c.train.log_samples_every = 0
  c.optim.learning_rate, c.optim.warmup_steps, c.optim.schedule = learning_rate, 0, "constant"
  c.ppo.kl_coef, c.ppo.epochs, c.ppo.minibatches = kl_coef, 4, 2
  c.ppo.update(ppo_changes)  # an ablation's change (benchmarks/study_ablation.py)
  return c


def dpo_config(pairs_file, beta, learning_rate, v: Variant):
  from rlhfx.config import base_config

  c = base_config("dpo")
  common(c, steps=v.dpo_steps, batch=16)
  along_training(c, v.eval_points)
  c.data.train_files, c.data.input_format, c.data.eval_fraction = (str(pairs_file),), "pairs", 0.0
  c.data.max_length, c.data.max_prompt_length, c.data.buckets = 64, 24, (64,)
  c.dpo.beta = beta
  c.optim.learning_rate, c.optim.warmup_steps, c.optim.schedule = learning_rate, 10, "constant"
  return c


class Evaluator:
  """Samples, reward-model scores and KL to the reference, the same way for every policy."""

  def __init__(self, rm_dir: pathlib.Path, prompts: list[str], v: Variant):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from rlhfx import rollout, scoring
    from rlhfx.data.tokenize import encode_prompt, load_tokenizer
    from rlhfx.models import Transformer
    from rlhfx.models.llama2c import from_llama2c
    from rlhfx.models.heads import ScoreModel
    from rlhfx.sampling import pad_prompts

    self.tokenizer = load_tokenizer(f"{STORIES}/tok512.bin")
    self.model_config, self.reference = from_llama2c(f"{STORIES}/stories260K.bin")
    rm_config = scoring.reward_model_config(rm_dir)
    module = ScoreModel(rm_config)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    init = lambda: nn.meta.unbox(module.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])  # noqa: E731
    shapes = jax.eval_shape(init)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
    rm = scoring.load_reward_model(rm_dir, target)
    self.reward_params = rm.params
    self.scorer = scoring.Scorer(module=module, mean=rm.mean, std=rm.std)
    ids = [encode_prompt(self.tokenizer, p, []) for p in prompts]
    tokens, mask = pad_prompts(ids, pad_id=self.tokenizer.pad_token_id or 0)
    self.batch = {"prompt_BxP": jnp.asarray(tokens), "prompt_mask_BxP": jnp.asarray(mask)}
    self.prompts = prompts
    model = Transformer(self.model_config)

    def sample(policy, n, seed):
      s = rollout.SamplingSettings(self.model_config, max_new_tokens=v.max_new_tokens, group_size=n,
                                    eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id or 0)
      r = rollout.rollout(policy, self.batch, jax.random.key(seed), s)
      scores_B = scoring.scores(r, self.reward_params, self.scorer)[0]
      logps = rollout.completion_stats(model, policy, r, temperature=1.0)[0]
      ref = rollout.completion_stats(model, self.reference, r, temperature=1.0)[0]
      return r, scores_B, rollout.sequence_kl(logps, ref, r.mask_BxC)

    self._sample = jax.jit(sample, static_argnums=(1, 2))
    self.v = v

  def samples(self, policy, n: int, seed: int = 0):
    import jax

    return jax.device_get(self._sample(policy, n, seed))

  def evaluate(self, policy) -> dict:
    import numpy as np

    _, scores, kl = self.samples(policy, self.v.eval_samples, seed=1)
    return {"reward": float(scores.mean()), "reward_sem": float(scores.std() / math.sqrt(scores.size)),
            "kl": float(kl.mean()), "kl_sem": float(kl.std() / math.sqrt(kl.size)), "samples": int(scores.size),
            "negative_kl_share": float(np.mean(kl < 0))}

  def best_of_n(self, ns) -> list[dict]:
    """Best-of-N of reference samples: reward of the top-scoring of N; KL = log N - (N-1)/N (Stiennon et al.).
    Sampled in chunks of at most 64 per prompt (the KV cache of N = 256 x 4 samples at once would not fit)."""
    import numpy as np

    n_max = max(ns)
    total, chunk = n_max * self.v.eval_samples, min(n_max * self.v.eval_samples, 64)
    scores = np.concatenate([self.samples(self.reference, chunk, seed=100 + i)[1].reshape(len(self.prompts), chunk)
                             for i in range(total // chunk)], axis=1)
    scores_PxKxN = scores.reshape(len(self.prompts), self.v.eval_samples, n_max)
    out = []
    for n in ns:
      best = scores_PxKxN[..., :n].max(-1)
      out.append({"n": n, "reward": float(best.mean()), "reward_sem": float(best.std() / math.sqrt(best.size)),
                  "kl": math.log(n) - (n - 1) / n, "samples": int(best.size)})
    return out

  def ranked_pairs(self, prompts: list[str], n: int) -> list[dict]:
    """Reference samples of `prompts`, n per prompt, ranked by the reward model into pairs (best vs worst, ...)."""
    import numpy as np

    saved = self.batch, self.prompts
    from rlhfx.data.tokenize import encode_prompt
    from rlhfx.sampling import pad_prompts
    import jax.numpy as jnp

    tokens, mask = pad_prompts([encode_prompt(self.tokenizer, p, []) for p in prompts],
                               pad_id=self.tokenizer.pad_token_id or 0)
    self.batch, self.prompts = {"prompt_BxP": jnp.asarray(tokens), "prompt_mask_BxP": jnp.asarray(mask)}, prompts
    try:
      r, scores, _ = self.samples(self.reference, n, seed=3)
    finally:
      self.batch, self.prompts = saved
    texts = [self.tokenizer.decode(t[m], skip_special_tokens=True) for t, m in zip(r.tokens_BxC, r.mask_BxC)]
    pairs = []
    for i, prompt in enumerate(prompts):
      order = np.argsort(-scores[i * n:(i + 1) * n])
      for a, b in zip(order[: n // 2], order[::-1][: n // 2]):
        if scores[i * n + a] > scores[i * n + b] and texts[i * n + a].strip() and texts[i * n + b].strip():
          pairs.append({"prompt": prompt, "chosen": texts[i * n + a], "rejected": texts[i * n + b]})
    return pairs


def checkpointed_policies(workdir: pathlib.Path, method: str) -> list[tuple[int, dict]]:
  """(step, policy params) of every checkpoint a run kept, restored from Orbax without a target."""
  import orbax.checkpoint as ocp

  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  out = []
  with ocp.StandardCheckpointer() as ckpt:
    for step in steps:
      state = ckpt.restore(workdir / "checkpoints" / str(step) / "state")
      out.append((step, state["params"]["policy"] if method == "ppo" else state["params"]))
  return out


def curve(evaluator, workdir: pathlib.Path, method: str, setting: dict, reference: dict) -> list[dict]:
  """The run's points: step 0 (the reference, evaluated once for all runs) and each kept checkpoint."""
  points = [{"method": method, **setting, "step": 0, **reference}]
  for step, policy in checkpointed_policies(workdir, method):
    points.append({"method": method, **setting, "step": step, **evaluator.evaluate(policy)})
  return points


def envelope(points: list[dict]) -> list[dict]:
  """The upper envelope of (KL, reward): the points no other point beats with less or equal KL, by KL."""
  out = []
  for p in sorted(points, key=lambda p: (p["kl"], -p["reward"])):
    if not out or p["reward"] > out[-1]["reward"]:
      out.append(p)
  return out


def at_kl(points: list[dict], kl: float) -> dict | None:
  """The envelope's best point with KL <= `kl` (None when no point is that close to the reference)."""
  inside = [p for p in envelope(points) if p["kl"] <= kl]
  return inside[-1] if inside else None


def run(variant: str, out: pathlib.Path, imdb: pathlib.Path = IMDB) -> dict:
  from rlhfx.algorithms import dpo, ppo, reward

  v = VARIANTS[variant]
  out.mkdir(parents=True, exist_ok=True)
  t_start = time.perf_counter()
  train_prompts, eval_prompts = story_openings()
  eval_prompts = eval_prompts[:v.eval_prompts]
  timings = {}

  t0 = time.perf_counter()
  rm_dir = out / "reward_model"
  rm_final = reward.train(reward_config(write_jsonl(out / "inputs" / "imdb_pairs.jsonl",
                                                    imdb_pairs(imdb)),
                                        v.rm_steps), rm_dir)
  timings["reward_model_s"] = time.perf_counter() - t0
  evaluator = Evaluator(rm_dir, eval_prompts, v)
  from compare_trl import machine  # the CPU and flags the times were measured on (benchmarks/compare_trl.py)

  results = {"variant": variant, "config": dataclasses.asdict(v),
             "measured": {"date": time.strftime("%Y-%m-%d"), **machine()},
             "reward_model": {k: rm_final[k] for k in ("eval/accuracy", "eval/accuracy_low95", "eval/accuracy_high95",
                                                       "eval/pairs")},
             "reference": evaluator.evaluate(evaluator.reference), "best_of_n": evaluator.best_of_n(v.best_of),
             "ppo": [], "dpo": []}

  prompts_file = write_jsonl(out / "inputs" / "train_prompts.jsonl", [{"prompt": p} for p in train_prompts])
  t0 = time.perf_counter()
  for kl_coef, lr in v.ppo_runs:
    workdir = out / f"ppo_kl{kl_coef}_lr{lr}"
    ppo.train(ppo_config(prompts_file, rm_dir, kl_coef, lr, v), workdir)
    results["ppo"] += curve(evaluator, workdir, "ppo", {"kl_coef": kl_coef, "lr": lr}, results["reference"])
  timings["ppo_s"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  pairs = evaluator.ranked_pairs(train_prompts, v.dpo_samples)
  pairs_file = write_jsonl(out / "inputs" / "ranked_pairs.jsonl", pairs)
  results["dpo_pairs"] = len(pairs)
  for beta, lr in v.dpo_runs:
    workdir = out / f"dpo_beta{beta}_lr{lr}"
    dpo.train(dpo_config(pairs_file, beta, lr, v), workdir)
    results["dpo"] += curve(evaluator, workdir, "dpo", {"beta": beta, "lr": lr}, results["reference"])
  timings["dpo_s"] = time.perf_counter() - t0
  timings["total_s"] = time.perf_counter() - t_start
  results["timings"] = timings
  (out / "results.json").write_text(json.dumps(results, indent=2))
  (out / "study.md").write_text(table(results))
  plot(results, out / "study.png")
  return results


def best_of_points(results: dict) -> list[dict]:
  """Best-of-N's points as a curve (exact KL: no standard error)."""
  return [{**b, "kl_sem": 0.0} for b in results["best_of_n"]]


def matched_kl_table(curves: dict[str, list[dict]], label: str = "method") -> list[str]:
  """Markdown rows: each curve's envelope point at KL <= 1, 2, 4, 8 nats, its KL in brackets."""
  lines = [f"| {label} | " + " | ".join(f"KL <= {k:g}" for k in MATCHED_KL) + " |", "|---|" + "---|" * len(MATCHED_KL)]
  for name, points in curves.items():
    cells = [f"{p['reward']:.3f} ± {p['reward_sem']:.3f} ({p['kl']:.2f})" if p else "no point"
             for p in (at_kl(points, k) for k in MATCHED_KL)]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return lines


def table(results: dict) -> str:
  rm = results["reward_model"]
  lines = [f"Reward model: held-out pairwise accuracy {rm['eval/accuracy']:.1%} "
           f"(95% interval {rm['eval/accuracy_low95']:.1%}-{rm['eval/accuracy_high95']:.1%}, "
           f"{int(rm['eval/pairs'])} IMDb pairs).", "",
           "Reward at matched KL, read from each method's upper envelope (the best point with KL(policy || "
           "reference) at most the budget; its KL in brackets):", ""]
  lines += matched_kl_table({"best-of-N": best_of_points(results), "PPO": results["ppo"], "DPO": results["dpo"]})
  lines += ["", "Every point (KL: mean over completions of the summed log pi - log pi_ref of their sampled tokens, "
            "± its standard error; best-of-N: exact):", "",
            "| method | setting | step | reward (normalised RM score) | KL(policy \\|\\| reference), nats |",
            "|---|---|---|---|---|"]
  for b in results["best_of_n"]:
    lines.append(f"| best-of-N | N = {b['n']} | | {b['reward']:.3f} ± {b['reward_sem']:.3f} | {b['kl']:.2f} (exact) |")
  for name, key in (("PPO", "kl_coef"), ("DPO", "beta")):
    for r in results[name.lower()]:
      lines.append(f"| {name} | {key} = {r[key]}, lr = {r['lr']:g} | {r['step']} | {r['reward']:.3f} ± "
                   f"{r['reward_sem']:.3f} | {r['kl']:.2f} ± {r['kl_sem']:.2f} |")
  t = results["timings"]
  lines += ["", f"Wall time on this machine: {t['total_s'] / 60:.1f} min (reward model {t['reward_model_s']:.0f} s, "
            f"PPO {t['ppo_s']:.0f} s, DPO {t['dpo_s']:.0f} s incl. ranking {results.get('dpo_pairs', 0)} pairs and "
            "evaluating the checkpoints)."]
  return "\n".join(lines) + "\n"


def plot(results: dict, path: pathlib.Path) -> None:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: no PNG", file=sys.stderr)
    return
  fig, ax = plt.subplots(figsize=(7, 4.8))
  best_of = sorted(results["best_of_n"], key=lambda p: p["kl"])
  ax.errorbar([p["kl"] for p in best_of], [p["reward"] for p in best_of], yerr=[p["reward_sem"] for p in best_of],
              marker="o", capsize=3, color="black", label="best-of-N")
  for name, color in (("ppo", "tab:blue"), ("dpo", "tab:red")):
    points = results[name]
    ax.scatter([p["kl"] for p in points], [p["reward"] for p in points], s=12, alpha=0.45, color=color,
               label=f"{name.upper()} checkpoints (all runs)")
    hull = envelope(points)
    ax.step([p["kl"] for p in hull], [p["reward"] for p in hull], where="post", color=color,
            label=f"{name.upper()} envelope")
  ax.set_xscale("symlog", linthresh=1.0)
  ax.set_xlabel("KL(policy || reference), nats per completion")
  ax.set_ylabel("reward (normalised reward-model score)")
  ax.set_title("Controlled sentiment on stories260K (IMDb reward model)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variant", default="full", choices=sorted(VARIANTS))
  p.add_argument("--out-dir", default="/tmp/sentiment_study")
  p.add_argument("--imdb", type=pathlib.Path, default=IMDB,
                 help="imdb_labelled.txt of the UCI Sentiment Labelled Sentences (archive.ics.uci.edu, dataset 331)")
  args = p.parse_args()
  if not args.imdb.is_file():
    p.error(f"--imdb {args.imdb}: not found; download 'Sentiment Labelled Sentences' from the UCI repository "
            "(https://archive.ics.uci.edu/dataset/331) and pass its imdb_labelled.txt")
  sys.path.insert(0, str(ROOT))
  results = run(args.variant, pathlib.Path(args.out_dir), args.imdb)
  print(table(results))
  print(json.dumps({k: results[k] for k in ("reward_model", "reference", "timings")}))


if __name__ == "__main__":
  main()
