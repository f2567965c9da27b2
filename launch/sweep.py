"""Expand a config's `sweep()` into runs, each with its own work directory and name, and run them.

  python launch/sweep.py --config configs/quickstart.py --root /tmp/sweeps/quickstart
  python launch/sweep.py --config configs/dpo_hh.py:tiny --root /tmp/sweeps/dpo --together   # members: one program
  python launch/sweep.py --config configs/dpo_hh.py --root gs://my-bucket/sweeps/dpo --backend tpu --vms 4 \\
      --name rlhfx-sweep --zone us-west4-a --project my-project --accelerator-type v5litepod-16 --spot
  python launch/sweep.py --config configs/dpo_hh.py --root /shared/sweeps/dpo --backend slurm --nodes 2
  ... --dry-run          # print the commands instead of running them
  ... -- --config.train.num_steps=500     # overrides applied to every run
  python launch/sweep.py report --root /tmp/sweeps/quickstart [--sort M] [--format F] [--plot M]  # launch/report.py

`sweep()` in the config file returns a list of {"dotted.field": value} dicts; run i is
named `NN-field=value-...` (last component of each field) and writes to
<root>/<name>. Backends:
  local  (default) one run after another in subprocesses, each logging to
         <root>/<name>/sweep.log. A failed run is reported and the others continue;
         the exit status is 1 if any failed.
  tpu    --vms N TPU VMs (launch/tpu_sweep.py) work through the runs in parallel, each taking the next
         run not finished; a preempted run goes back to the queue and resumes on the next free VM;
         the state of every run is in <root>/sweep.json; the VMs are deleted at the end.
  slurm  one sbatch job per run (launch/slurm.py).
--together (local backend): runs that differ only in numbers (rlhfx.members.NUMBERS: learning rate, the loss's
numbers, init_seed) are trained as members of one program (python -m rlhfx.together), one program per set of
runs that share every other override (and resume from the same step); the command says how it grouped them,
and refuses, naming the field, a sweep of which no two runs can share a program. Each member still writes
<root>/<name>/ as a separate run would, its sweep.log the program's log.
A run that finished (exit status 0: it reached train.num_steps) leaves
<root>/<name>/sweep_done.json: rerunning the sweep skips it, and a run that was interrupted
resumes from its latest checkpoint (rlhfx resumes by itself from the work directory). A run
stopped by SIGTERM exits 75 after its checkpoint: never marked finished; the local backend
reruns it at once (up to 3 times), SLURM requeues it (--requeue, and `set -e` stops the job
script before sweep_done.json). A summary goes to <root>/sweep.json.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import pathlib
import shlex
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch import report, slurm, tpu, tpu_sweep  # noqa: E402
from rlhfx import members, storage  # noqa: E402
from rlhfx.config import ConfigError, load as load_config, load_module  # noqa: E402

DONE = slurm.DONE
RESUME_EXIT = 75  # rlhfx.main's exit status for a run SIGTERM stopped after saving: rerun it to resume
RESUMES = 3  # how many times the local backend reruns a run stopped that way before reporting it


def load_sweep(config: str) -> list[dict]:
  """The list of override dicts from the config file's sweep() (the ':variant' suffix is ignored)."""
  path = pathlib.Path(config.split(":")[0])
  if not path.is_absolute():
    path = (ROOT / path) if not path.exists() else path.absolute()
  module = load_module(path)
  if not hasattr(module, "sweep"):
    raise SystemExit(f"{path} has no sweep() function")
  runs = module.sweep()
  if not runs or not all(isinstance(r, dict) for r in runs):
    raise SystemExit(f"{path}: sweep() must return a non-empty list of dicts")
  return runs


format_value, run_name = members.format_value, members.run_name  # rlhfx.together names members the same way


def expand(config: str, root: str, extra: list[str]) -> list[dict]:
  """[{name, workdir, overrides}] for every entry of sweep()."""
  runs = []
  for i, entry in enumerate(load_sweep(config)):
    name = run_name(i, entry)
    overrides = [f"--config.{k}={format_value(v)}" for k, v in entry.items()] + list(extra)
    runs.append({"name": name, "workdir": f"{root.rstrip('/')}/{name}", "overrides": overrides, "entry": entry})
  return runs


class _Stop:
  """SIGTERM to the sweep: passed on to the run in progress (which saves and exits 75), and no run after it
  starts. Each run also gets SIGTERM if the sweep dies without passing it on (PR_SET_PDEATHSIG)."""

  requested = False
  child: subprocess.Popen | None = None

  @classmethod
  def handle(cls, signum, frame):
    cls.requested = True
    if cls.child is not None and cls.child.poll() is None:
      cls.child.send_signal(signal.SIGTERM)


def _die_with_parent():
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except OSError:
    pass


def _run(command, log) -> int:
  _Stop.child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                 preexec_fn=_die_with_parent)
  try:
    return _Stop.child.wait()
  finally:
    _Stop.child = None


def run_local(config: str, runs: list[dict], *, dry_run: bool, out=None) -> list[dict]:
  out = out or sys.stdout
  results = []
  previous = signal.signal(signal.SIGTERM, _Stop.handle) if not dry_run else None
  try:
    return _run_all(config, runs, dry_run=dry_run, out=out, results=results)
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


def _run_all(config: str, runs: list[dict], *, dry_run: bool, out, results: list) -> list[dict]:
  for r in runs:
    if _Stop.requested:
      results.append({**r, "status": "stopped (SIGTERM): not started; rerun the sweep to run it"})
      continue
    workdir = storage.path(r["workdir"])  # local or gs://
    local = storage.staging(workdir)  # where its sweep.log is written (uploaded after each attempt on gs://)
    command = [sys.executable, *shlex.split(tpu.rlhfx_command(config, str(workdir), r["overrides"], "python"))[1:]]
    if (workdir / DONE).exists():
      print(f"{r['name']}: finished before, skipped", file=out, flush=True)
      results.append({**r, "status": "skipped (finished)"})
      continue
    if dry_run:
      print(shlex.join(command), file=out, flush=True)
      results.append({**r, "status": "dry-run"})
      continue
    resuming = (workdir / "checkpoints").exists()
    print(f"{r['name']}: {'resuming' if resuming else 'starting'} -> {workdir}/sweep.log", file=out, flush=True)
    local.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for attempt in range(RESUMES + 1):  # a run stopped by SIGTERM (exit 75) is resumed, never marked finished
      if attempt:
        print(f"{r['name']}: stopped by SIGTERM, resuming (attempt {attempt + 1})", file=out, flush=True)
      with open(local / "sweep.log", "a") as log:
        rc = _run(command, log)
      storage.publish(local / "sweep.log", workdir / "sweep.log")
      if rc != RESUME_EXIT or _Stop.requested:
        break
    seconds = time.time() - t0
    if rc == RESUME_EXIT:
      status = "stopped (SIGTERM, checkpoint saved): rerun the sweep to resume"
    elif rc == 0:
      storage.write_text(workdir / DONE, json.dumps({"config": config, "overrides": r["overrides"],
                                                     "seconds": seconds}))
      status = "finished"
    else:
      tail = (local / "sweep.log").read_text().strip().splitlines()[-1:] or [""]
      status = f"failed (exit {rc}): {tail[0]}"
    print(f"{r['name']}: {status} in {seconds:.0f} s", file=out, flush=True)
    results.append({**r, "status": status, "seconds": seconds})
  return results


def latest_step(workdir) -> int:
  """The newest checkpoint step in <workdir>/checkpoints (0: none), from the folder names."""
  folder = storage.path(workdir) / "checkpoints"
  steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.exists() else []
  return max(steps, default=0)


def together_groups(config: str, runs: list[dict]) -> list[list[dict]]:
  """The runs as programs of members (`members.group`), split again by the step each would resume from."""
  groups = members.group(load_config(config).algorithm, [r["entry"] for r in runs]) if runs else []
  out = []
  for g in groups:
    by_step: dict[int, list[dict]] = {}
    for i in g:
      by_step.setdefault(latest_step(runs[i]["workdir"]), []).append(runs[i])
    out += list(by_step.values())
  return out


def run_together(config: str, runs: list[dict], extra: list[str], root: str, *, dry_run: bool, out=None) -> list[dict]:
  """--together: the runs not finished as programs of members (python -m rlhfx.together), one after another."""
  out = out or sys.stdout
  results, todo = [], []
  for r in runs:
    if (storage.path(r["workdir"]) / DONE).exists():
      print(f"{r['name']}: finished before, skipped", file=out, flush=True)
      results.append({**r, "status": "skipped (finished)"})
    else:
      todo.append(r)
  groups = together_groups(config, todo)
  print(f"together: {len(todo)} runs as {len(groups)} programs", file=out, flush=True)
  for k, g in enumerate(groups):
    shared = members.shared_overrides([r["entry"] for r in g])
    print(f"  program {k + 1}: {', '.join(r['name'] for r in g)}"
          + (f" (sharing {', '.join(f'{a}={format_value(b)}' for a, b in shared.items())})" if shared else ""),
          file=out, flush=True)
  previous = signal.signal(signal.SIGTERM, _Stop.handle) if not dry_run else None
  try:
    for g in groups:
      results += _run_program(config, g, extra, root, dry_run=dry_run, out=out)
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
  return results


def _run_program(config: str, group: list[dict], extra: list[str], root: str, *, dry_run: bool, out) -> list[dict]:
  """One program of members, rerun at once when SIGTERM stopped it after saving (up to RESUMES times)."""
  command = [sys.executable, "-m", "rlhfx.together", f"--config={config}", f"--root={root}",
             f"--runs={','.join(r['name'] for r in group)}", *extra]
  if dry_run:
    print(shlex.join(command), file=out, flush=True)
    return [{**r, "status": "dry-run"} for r in group]
  if _Stop.requested:
    return [{**r, "status": "stopped (SIGTERM): not started; rerun the sweep to run it"} for r in group]
  first = storage.path(group[0]["workdir"])
  log_path = storage.staging(first) / "sweep.log"  # the program's log, copied to every member's sweep.log
  log_path.parent.mkdir(parents=True, exist_ok=True)
  print(f"together: {len(group)} members -> {first}/sweep.log", file=out, flush=True)
  t0 = time.time()
  for attempt in range(RESUMES + 1):
    if attempt:
      print(f"together: stopped by SIGTERM, resuming (attempt {attempt + 1})", file=out, flush=True)
    with open(log_path, "a") as log:
      rc = _run(command, log)
    if rc != RESUME_EXIT or _Stop.requested:
      break
  seconds = time.time() - t0
  text = log_path.read_text()
  results = []
  for r in group:
    workdir = storage.path(r["workdir"])
    storage.write_text(workdir / "sweep.log", text)
    if (workdir / DONE).exists():
      status = "finished"
    elif rc == RESUME_EXIT:
      status = "stopped (SIGTERM, checkpoint saved): rerun the sweep to resume"
    else:
      mine = [line for line in text.splitlines() if line.startswith(f"{r['name']}: rlhfx:")]
      tail = mine[-1:] or text.strip().splitlines()[-1:] or [""]
      status = f"failed (exit {rc}): {tail[0]}"
    print(f"{r['name']}: {status} in {seconds:.0f} s", file=out, flush=True)
    results.append({**r, "status": status, "seconds": seconds})
  return results


def run_tpu(config: str, runs: list[dict], args, *, dry_run: bool, out=None) -> list[dict]:
  """Plan every run (before any VM exists), then run them across `--vms` VMs (launch/tpu_sweep.py)."""
  out = out or sys.stdout
  target = tpu.target_from(args)
  runner = tpu.Runner(dry_run, pathlib.Path(args.log_dir) / f"{target.name}.log", out=out)
  if not args.no_plan:  # every run's shapes, before the VM exists
    for r in runs:
      if not tpu.check_plan(config, target.accelerator_type, r["overrides"], runner=runner):
        runner.note(f"{r['name']} does not fit {target.accelerator_type}: the sweep creates nothing")
        return [{**x, "status": "failed (does not fit)" if x is r else "not started"} for x in runs]
  vms = min(args.vms, len(runs))  # more VMs than runs would idle
  if vms < args.vms:
    runner.note(f"--vms {args.vms}: {len(runs)} runs need only {vms}")
  targets = [dataclasses.replace(target, name=f"{target.name}-{i}") for i in range(vms)]
  options = tpu_sweep.Options(config=config, name=target.name, keep=args.keep, create_retries=args.create_retries,
                              create_backoff_s=args.create_backoff, log_dir=args.log_dir)
  return tpu_sweep.run_sweep(config, runs, args.root, targets, options, dry_run=dry_run, out=out)


def run_slurm(config: str, runs: list[dict], args, *, dry_run: bool, out=None) -> list[dict]:
  out = out or sys.stdout
  results = []
  for r in runs:
    script = slurm.sbatch_script(name=f"{args.name}-{r['name']}", config=config, workdir=r["workdir"],
                                 overrides=r["overrides"], nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                                 time=args.time, partition=args.partition, venv=args.venv,
                                 project_dir=args.project_dir, log_dir=args.log_dir)
    rc = slurm.submit(script, pathlib.Path(args.log_dir) / f"{args.name}-{r['name']}.sbatch", dry_run=dry_run,
                      out=out)
    results.append({**r, "status": "dry-run" if dry_run else ("submitted" if rc == 0 else f"sbatch exit {rc}")})
  return results


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="configs/<file>.py[:variant] with a sweep() function")
  p.add_argument("--root", required=True, help="the sweep's directory: one work directory per run under it")
  p.add_argument("--backend", default="local", choices=["local", "tpu", "slurm"])
  p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
  p.add_argument("--log-dir", default=str(ROOT / "logs"))
  p.add_argument("--keep", action="store_true", help="tpu: keep the VM at the end")
  p.add_argument("--together", action="store_true",
                 help="local: train runs that differ only in numbers as members of one program (rlhfx.together)")
  g = p.add_argument_group("tpu backend (see launch/tpu.py)")
  g.add_argument("--name", default="rlhfx-sweep")
  g.add_argument("--zone", default="")
  g.add_argument("--project", default="")
  g.add_argument("--accelerator-type", default="v5litepod-8")
  g.add_argument("--runtime-version", default="v2-alpha-tpuv5-lite")
  g.add_argument("--spot", action="store_true")
  g.add_argument("--reserved", action="store_true")
  g.add_argument("--queued", action="store_true")
  g.add_argument("--bucket", default="")
  g.add_argument("--no-plan", action="store_true", help="skip the memory plan (rlhfx.plan) of every run")
  g.add_argument("--vms", type=int, default=1, help="how many TPU VMs work through the runs in parallel")
  g.add_argument("--create-retries", type=int, default=4, help="a VM's creation retried this often (backoff)")
  g.add_argument("--create-backoff", type=float, default=60.0, help="seconds before the first retry (doubling)")
  g = p.add_argument_group("slurm backend (see launch/slurm.py)")
  g.add_argument("--nodes", type=int, default=1)
  g.add_argument("--gpus-per-node", type=int, default=8)
  g.add_argument("--time", default="24:00:00")
  g.add_argument("--partition", default="")
  g.add_argument("--venv", default="~/rlhfx-venv")
  g.add_argument("--project-dir", default=str(ROOT))
  p.add_argument("overrides", nargs="*", help="after --: overrides for every run")
  return p


def main(argv=None, out=None) -> int:
  out = out or sys.stdout
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["report"]:  # the sweep's runs side by side (launch/report.py)
    return report.main(argv[1:], out)
  p = parser()
  args = p.parse_args(argv)
  if args.vms < 1:
    p.error(f"--vms {args.vms}: at least 1")
  runs = expand(args.config, args.root, args.overrides)
  print(f"sweep of {len(runs)} runs from {args.config} ({args.backend}{', together' * args.together})", file=out,
        flush=True)
  if args.together:
    if args.backend != "local":
      p.error(f"--together runs on the local backend (one machine: a program of members on {args.backend}: not yet)")
    try:
      results = run_together(args.config, runs, args.overrides, args.root, dry_run=args.dry_run, out=out)
    except ConfigError as e:  # no two runs can be members: nothing runs
      print(f"sweep: {e}", file=sys.stderr, flush=True)
      return 2
  elif args.backend == "local":
    results = run_local(args.config, runs, dry_run=args.dry_run, out=out)
  elif args.backend == "tpu":
    if not (args.zone and args.project):
      raise SystemExit("--backend tpu needs --zone and --project")
    results = run_tpu(args.config, runs, args, dry_run=args.dry_run, out=out)
  else:
    results = run_slurm(args.config, runs, args, dry_run=args.dry_run, out=out)
  results = [{k: v for k, v in r.items() if k != "entry"} for r in results]
  if args.backend == "local" and not args.dry_run:
    root = storage.path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    storage.write_text(root / "sweep.json", json.dumps(results, indent=2))
  failed = [r for r in results if r["status"].startswith("failed")]
  stopped = [r for r in results if r["status"].startswith("stopped")]
  print(f"done: {len(results) - len(failed) - len(stopped)} ok, {len(failed)} failed, {len(stopped)} stopped" +
        "".join(f"\n  {r['name']}: {r['status']}" for r in failed + stopped), file=out, flush=True)
  if _Stop.requested:
    return RESUME_EXIT  # the sweep itself was stopped: rerun it to resume
  return 1 if failed or stopped else 0


if __name__ == "__main__":
  sys.exit(main())
