"""Metrics: TensorBoard event files (tensorboardX, no TensorFlow), a JSONL file, console progress.

Everything lands in the work directory:
  <workdir>/metrics.jsonl     one JSON object per logged step: {"step": n, "train/loss": ...}
  <workdir>/tensorboard/      event files: tensorboard --logdir <workdir>/tensorboard
  <workdir>/wandb/            with config.logging.wandb.project set: a Weights & Biases run (online or offline)
On gs:// (objects cannot be appended to) these are written to `storage.staging(workdir)` and uploaded whole
(`MetricsWriter.publish`: at logged steps at most every `storage.UPLOAD_EVERY_S`, before every save, at the end).
Only process 0 writes. A train loop records each step's device metrics with `StepLog.record`,
which reads them one step late, so the host never waits on the device except to save.
"""

from __future__ import annotations

import collections
import html
import json
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import jax
import numpy as np

from rlhfx import flops, sharding, storage


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
  """95% (z=1.96) Wilson score interval of a binomial proportion (Wilson 1927)."""
  if n == 0:
    return 0.0, 1.0
  p = successes / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return centre - half, centre + half


def _fmt_time(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# the algorithm's own key numbers on the progress line, when its metrics have them
PROGRESS = {"train/accuracy": "acc", "rewards/accuracies": "acc", "rewards/margins": "margin",
            "objective/scores": "score", "objective/kl": "KL"}


def start_wandb(workdir, run_config, local: Path):
  """A Weights & Biases run per `config.logging.wandb` (None when its project is empty): named by
  `logging.wandb.name` or the work directory's name (a sweep's runs are named by their overrides), the whole
  config attached, resumed by id when the work directory is resumed."""
  if run_config is None or not run_config.logging.wandb.project:
    return None
  cfg = run_config.logging.wandb
  import wandb

  run_id = workdir / "wandb_run_id"
  if not run_id.exists():
    run_id.write_text(uuid.uuid4().hex[:8])
  return wandb.init(project=cfg.project, entity=cfg.entity or None, name=cfg.name or workdir.name,
                    group=cfg.group or None, mode=cfg.mode, dir=str(local), id=run_id.read_text(),
                    resume="allow", config=run_config.to_dict())


def _drop_rows_after(path: Path, step: int) -> None:
  """Keep the rows of steps up to `step` (the checkpoint a run resumes from): the steps after it run again and
  log again, so metrics.jsonl keeps one row per step (and evaluation) whatever the restarts."""
  if not path.exists():
    return
  kept = [row for row in rows(path.parent) if step and row["step"] <= step]  # from step 0 all is written again
  tmp = path.with_suffix(".tmp")
  tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
  os.replace(tmp, path)


LOGS = ("metrics.jsonl", "samples.jsonl")  # appended to as a run goes


class MetricsWriter:
  """Writes metrics of a run to TensorBoard, JSONL, the console and, when configured, Weights & Biases."""

  def __init__(self, workdir, *, total_steps: int, peak_flops: float | None = None, run_config=None,
               start_step: int = 0):
    self.workdir = storage.path(workdir)
    self.local = storage.staging(self.workdir)  # the work directory itself, or its local stand-in (gs://)
    self.total_steps = total_steps
    self.peak_flops = peak_flops
    self.is_main = jax.process_index() == 0
    self.label = ""  # a sweep member's name: the start of its console lines (rlhfx.together)
    self._jsonl = self._tb = self._wandb = None
    self._published = 0.0
    if self.is_main:
      from tensorboardX import SummaryWriter

      self.local.mkdir(parents=True, exist_ok=True)
      if storage.is_remote(self.workdir):  # the logs go on from the bucket's copies, not from a stale local one
        for name in LOGS:
          (self.local / name).unlink(missing_ok=True)
          storage.download(self.workdir / name, self.local / name)
      _drop_rows_after(self.local / "metrics.jsonl", start_step)
      self._jsonl = open(self.local / "metrics.jsonl", "a")
      self._tb = SummaryWriter(str(self.local / "tensorboard"))
      self._wandb = start_wandb(self.workdir, run_config, self.local)

  def publish(self, force: bool = True) -> None:
    """gs://: the logs uploaded whole (when `force`, or when UPLOAD_EVERY_S has passed since the last upload)."""
    if not (self.is_main and storage.is_remote(self.workdir)):
      return
    if not force and time.monotonic() - self._published < storage.UPLOAD_EVERY_S:
      return
    if not self._jsonl.closed:
      self._jsonl.flush()
      self._tb.flush()
    for name in (*LOGS, "tensorboard"):
      if (self.local / name).exists():
        storage.publish(self.local / name, self.workdir / name)
    self._published = time.monotonic()

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.is_main:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
    self._jsonl.flush()
    for k, v in clean.items():
      if math.isfinite(v):
        self._tb.add_scalar(k, v, step)
    if self._wandb is not None:
      self._wandb.log(clean, step=step)
    self.publish(force=False)

  def write_text(self, step: int, name: str, text: str) -> None:
    if self.is_main:
      self._tb.add_text(name, text, step)
      if self._wandb is not None:
        import wandb

        self._wandb.log({name: wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

  def progress(self, step: int, metrics: dict[str, float], loss_key: str, eta_s: float | None) -> None:
    """One console line: step, loss, tokens/s, MFU, ETA (from the steady-state step time; none before it)."""
    if not self.is_main:
      return
    parts = [f"step {step}/{self.total_steps}", f"{loss_key} {metrics.get(loss_key, float('nan')):.4f}"]
    parts += [f"{label} {metrics[k]:.3f}" for k, label in PROGRESS.items() if k in metrics]
    if "perf/tokens_per_s" in metrics:
      parts.append(f"{metrics['perf/tokens_per_s']:,.0f} tok/s")
    if "perf/mfu" in metrics:
      parts.append(f"MFU {100 * metrics['perf/mfu']:.1f}%")
    if eta_s is not None:
      parts.append(f"ETA {_fmt_time(eta_s)}")
    line = f"{self.label}: " * bool(self.label) + " | ".join(parts)
    logging.info(line)
    print(line, flush=True)

  def close(self) -> None:
    if self.is_main:
      self._jsonl.close()
      self._tb.close()
      if self._wandb is not None:
        self._wandb.finish()
      self.publish()


def to_host(metrics) -> dict[str, float]:
  """Device scalars -> Python floats (the only place the loop waits for the device)."""
  return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


class TrainingDiverged(RuntimeError):
  """A metric became NaN or Inf, the loss rose by orders of magnitude, or the gradient vanished for good."""


class Divergence:
  """What a degenerating run looks like (config.train): the loss above `divergence_factor` x (|first loss| + 1)
  (`watch_loss`: losses with a scale, SFT / reward / DPO; RL losses start near 0 and move with the rewards), or
  a gradient norm that was not 0 and has been exactly 0 for `vanished_steps` steps in a row. `check` returns why,
  or None."""

  def __init__(self, train_config, *, watch_loss: bool):
    self.factor, self.patience = train_config.divergence_factor, train_config.vanished_steps
    self.watch_loss = watch_loss
    self.first_loss, self.had_gradient, self.zero_for = None, False, 0

  def check(self, host: dict[str, float], loss_key: str) -> str | None:
    loss, grad = host.get(loss_key), host.get("train/grad_norm")
    if self.watch_loss and loss is not None:
      if self.first_loss is None:
        self.first_loss = loss
      elif loss > self.factor * (abs(self.first_loss) + 1):
        return (f"{loss_key} rose from {self.first_loss:.4g} to {loss:.4g} (over {self.factor:g} x (|first| + 1); "
                f"config.train.divergence_factor)")
    if grad is not None:
      self.zero_for = self.zero_for + 1 if grad == 0 and self.had_gradient else 0
      self.had_gradient |= grad != 0
      if self.zero_for >= self.patience:
        return (f"train/grad_norm has been exactly 0 for {self.zero_for} steps after it was not "
                f"(config.train.vanished_steps): the model no longer learns")
    return None


class StepLog:
  """Step metrics of a train loop, read one step late: `record(step n)` dispatches nothing and reads step n-1's
  metrics (by then computed), checks they are finite, adds perf/* (step time, tokens/s, MFU) and the data counts
  (`counts()`, e.g. rows skipped as over-long) and writes them every `log_every` steps and at the last.
  `flush()` reads the pending step now (before a save or an eval). A NaN/Inf raises TrainingDiverged naming the
  step and the last checkpoint, which the loop never overwrote.

  Step time: from the later of the previous step's end and this iteration's start (`steps` marks it, so a save
  or an evaluation between steps is not counted) to this step's end, which is when `record` finds its metrics
  ready or, if they are not, when they are read. The ETA is the median of the last 20 step times after the
  first one of the run (which includes compilation) times the steps left, plus the evaluations left times the
  last one's time (`evaluation`)."""

  def __init__(self, workdir: Path, train_config, *, flops_per_token: float, checkpointer, start_step: int,
               loss_key: str = "train/loss", counts: Callable[[], dict] = dict, run_config=None,
               evaluates: bool = True):
    self.t = train_config
    self.evaluates = evaluates  # the run has held-out data (else evaluations are empty: not said, not in the ETA)
    self.writer = MetricsWriter(workdir, total_steps=train_config.num_steps, peak_flops=flops.peak_flops_per_device(),
                                run_config=run_config, start_step=start_step)
    self.flops_per_token, self.checkpointer, self.start = flops_per_token, checkpointer, start_step
    self.loss_key, self.counts = loss_key, counts
    self.divergence = Divergence(train_config, watch_loss=run_config is None or run_config.algorithm in (
        "sft", "reward", "dpo"))
    self.warnings: list[str] = []
    self.announces = True  # says when the first step compiled (one of a program's members says it for all)
    self.last: dict[str, float] = {}
    self._pending = None
    self._ended = self._began = time.perf_counter()
    self._recent: collections.deque = collections.deque(maxlen=20)
    self._eval_s: float | None = None  # the last evaluation's time

  @classmethod
  def of_run(cls, config, workdir: Path, data, checkpointer, start_step: int, flops_per_token: float) -> "StepLog":
    """A training run's log: its data's counts in the metrics, evaluations when it has held-out data."""
    return cls(workdir, config.train, flops_per_token=flops_per_token, checkpointer=checkpointer,
               start_step=start_step, counts=data.report, run_config=config, evaluates=data.eval is not None)

  def steps(self, first: int, last: int) -> Iterator[int]:
    """first, ..., last, marking when each iteration begins."""
    for step in range(first, last + 1):
      self._began = time.perf_counter()
      if step == first and self.writer.is_main:
        print(f"train: compiling step {first} (the first step's time includes it) ...", flush=True)
      yield step

  def evaluation(self, step: int, evaluate: Callable[[], dict]) -> dict[str, float]:
    """`evaluate()` after `step`, timed (said on the console; its time goes into the ETA) and written. A resumed
    run's first call (step = the resumed step) evaluates nothing: it returns the run's first evaluation, the
    step-0 row of metrics.jsonl, so the summary's before/after lines survive a restart."""
    if step == self.start and step > 0:
      return first_evaluation(self.writer.workdir)
    self.flush()
    if not self.evaluates:
      return self.write(step, evaluate())
    if self.writer.is_main:
      print(f"eval: step {step} ...", end="", flush=True)
    began = time.perf_counter()
    result = evaluate()
    if self.writer.is_main:
      print(f" {time.perf_counter() - began:.1f} s", flush=True)
    return self.evaluated(step, result, time.perf_counter() - began)

  def evaluated(self, step: int, result: dict[str, float], seconds: float) -> dict[str, float]:
    """An evaluation of `step` done elsewhere (sweep members evaluate together), `seconds` long: written, and its
    time taken into the ETA."""
    self._eval_s = seconds
    return self.write(step, result)

  def _eta(self, step: int) -> float | None:
    if not self._recent:
      return None
    return (float(np.median(self._recent)) * (self.t.num_steps - step)
            + evaluations_after(step, self.t) * (self._eval_s or 0.0))

  def record(self, step: int, device_metrics: dict, *, tokens: float) -> None:
    ready = all(x.is_ready() for x in jax.tree.leaves(device_metrics) if isinstance(x, jax.Array))
    began = self._began
    self.flush()
    self._pending = (step, device_metrics, tokens * jax.process_count(), began,
                     time.perf_counter() if ready else None)

  def flush(self) -> None:
    if self._pending is None:
      return
    step, device_metrics, tokens, began, ended = self._pending
    self._pending = None
    host = to_host(device_metrics)
    bad = [k for k, v in host.items() if not np.isfinite(v)]
    if bad:
      raise TrainingDiverged(f"step {step}: {', '.join(bad)} = {[host[k] for k in bad]}; stopping. "
                             + self._last_good())
    degenerate = self.divergence.check(host, self.loss_key)
    if degenerate and self.t.on_divergence == "stop":
      raise TrainingDiverged(f"step {step}: {degenerate}; stopping (config.train.on_divergence=warn goes on). "
                             + self._last_good())
    if degenerate and not self.warnings:
      self.warnings.append(f"step {step}: {degenerate}")
      print(f"WARNING: training degenerates at step {step}: {degenerate}", flush=True)
    ended = ended or time.perf_counter()
    host["perf/step_s"] = max(ended - max(self._ended, began), 1e-9)
    self._ended = ended
    if step > self.start + 1:
      self._recent.append(host["perf/step_s"])
    elif self.writer.is_main and self.announces:
      print(f"train: step {step} took {host['perf/step_s']:.1f} s (compiling included)", flush=True)
    host["perf/tokens_per_s"] = tokens / host["perf/step_s"]
    if self.writer.peak_flops:
      host["perf/mfu"] = host["perf/tokens_per_s"] * self.flops_per_token / (self.writer.peak_flops
                                                                              * jax.device_count())
    host.update(self.counts())
    self.last = host
    if step % self.t.log_every == 0 or step == self.t.num_steps:
      self.writer.write(step, host)
      self.writer.progress(step, host, self.loss_key, self._eta(step))

  def _last_good(self) -> str:
    latest = self.checkpointer.latest_step()
    if latest is None:
      return "No checkpoint was saved before it: rerun from scratch (a lower optim.learning_rate?)"
    return f"The last good checkpoint is step {latest} in {self.checkpointer.directory}"

  def write(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
    """Write other metrics of `step` (evaluation), after the pending step's; returns them."""
    self.flush()
    if metrics:
      self.writer.write(step, metrics)
      logging.info("step %d: %s", step, metrics)
    return metrics

  def samples(self, step: int, samples: list[dict]) -> None:
    """Held-out samples of an evaluation: appended to <workdir>/samples.jsonl (with the step) and written to
    TensorBoard (and W&B) as text."""
    if not samples or not self.writer.is_main:
      return
    with open(self.writer.local / "samples.jsonl", "a") as f:
      for sample in samples:
        f.write(json.dumps({"step": step, **sample}) + "\n")
    self.writer.write_text(step, "eval/samples", "\n\n".join(
        f"**prompt** {s['prompt']}\n\n**completion** {s['completion']}\n\n**reference** {s['reference']}"
        for s in samples))

  def close(self) -> None:
    self.flush()
    self.writer.close()
    for warning in self.warnings:  # config.train.on_divergence=warn: said again where the run ends
      print(f"WARNING: the run degenerated ({warning}); its exported model is the degenerate one", flush=True)

  def __enter__(self) -> "StepLog":
    return self

  def __exit__(self, exc_type, *exc) -> None:
    if exc_type is None:
      self.close()
    else:  # a diverged or failed run: what was written stays, the pending step is not read again
      self.writer.close()


def rows(workdir) -> list[dict]:
  """The rows of a run's metrics.jsonl, local or on gs:// (none when there is none; a row cut short by a kill left
  out)."""
  out = []
  for line in (storage.read_text(storage.path(workdir) / "metrics.jsonl") or "").splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if isinstance(row, dict) and isinstance(row.get("step"), int):
      out.append(row)
  return out


def first_evaluation(workdir: Path) -> dict[str, float]:
  """The eval/* metrics a run wrote at step 0 (its evaluation before training), from its metrics.jsonl."""
  return {k: v for row in rows(workdir) if row["step"] == 0 for k, v in row.items() if k.startswith("eval/")}


def evaluations_after(step: int, train_config) -> int:
  """How many steps in (step, num_steps] have `evaluation_due` (counted, not walked: a long run logs often)."""
  last, every = train_config.num_steps, train_config.eval_every
  if step >= last:
    return 0
  periodic = last // every - step // every if every else 0
  return periodic + (0 if every and last % every == 0 else 1)  # the evaluation after the last step


def evaluation_due(step: int, train_config) -> bool:
  """Evaluate after this step: every `eval_every` steps (0: never in between) and after the last."""
  return bool(train_config.eval_every and step % train_config.eval_every == 0) or step == train_config.num_steps


class SampleLog:
  """Sample completions of an on-policy run: every `every` iterations a rollout is kept, and decoded, printed and
  appended to <workdir>/samples.jsonl at the next `record` (so decoding never waits on the iteration that made
  it) or at `flush`."""

  def __init__(self, workdir: Path, tokenizer, every: int, n: int = 4):
    self.path = storage.staging(storage.path(workdir)) / "samples.jsonl"  # uploaded with the logs (gs://)
    self.tokenizer, self.every, self.n = tokenizer, every, n
    self._due = None

  def record(self, step: int, rollout, scores_B) -> None:
    self.flush()
    if self.every and step % self.every == 0:
      self._due = (step, rollout, scores_B)

  def flush(self) -> None:
    if self._due is None:
      return

    step, r, scores_B = self._due
    self._due = None
    r, scores_B = sharding.gather((r, scores_B))  # a collective: every process takes part
    if jax.process_index() != 0:
      return
    samples = []
    for i in range(min(self.n, len(scores_B))):
      prompt = self.tokenizer.decode(r.prompt_BxP[i][r.prompt_mask_BxP[i]], skip_special_tokens=True)
      completion = self.tokenizer.decode(r.tokens_BxC[i][r.mask_BxC[i]], skip_special_tokens=True)
      samples.append({"prompt": prompt, "completion": completion, "score": float(scores_B[i])})
    with open(self.path, "a") as f:
      for s in samples:
        f.write(json.dumps({"step": step, **s}) + "\n")
    print(f"samples at iteration {step}:", flush=True)
    for s in samples[:2]:
      print(f"  [{s['score']:+.3f}] {s['prompt']!r} -> {s['completion']!r}", flush=True)
