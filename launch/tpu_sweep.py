"""A sweep across N TPU VMs: each VM takes the next run that is not finished, until none is left.

  python launch/sweep.py --config configs/dpo_hh.py --root gs://my-bucket/sweeps/dpo --backend tpu --vms 4 \\
      --name dpo-sweep --zone us-west4-a --project my-project --accelerator-type v5litepod-16 --spot

The sweep's state is <root>/sweep.json (local or gs://, written whole each time it changes): every run with its
state, the VM it ran on last, its attempts and last exit status, and every VM with its creations and failures.

  queued   waiting for a VM               running  on a VM now
  stopped  preempted (exit 75, or its VM was preempted or deleted under it): queued again at once, and it
           resumes from its checkpoint on whichever VM takes it next
  done     reached train.num_steps (exit 0; <workdir>/sweep_done.json is written)
  failed   any other exit status: its log says why (<log-dir>/<vm>.log); a rerun of the sweep retries it

One thread per VM: create it (queued resource or tpu-vm create; a failed creation is retried with backoff,
`--create-retries` times, each failure printed and counted in sweep.json), copy the project and install it,
then take runs until the queue is empty; a VM found gone after a run (describe: not READY) is deleted and
created again. At the end every VM is deleted (unless --keep). Rerunning the same sweep command reads
sweep.json: done runs stay done, the rest (running ones included: their launcher died) are queued again.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import threading
import time

from launch import slurm, tpu
from rlhfx import storage

RESUME_EXIT = 75
STATES = ("queued", "running", "stopped", "done", "failed")


class SweepState:
  """The runs' states and the VMs' histories, saved to <root>/sweep.json on every change (one lock)."""

  def __init__(self, root: str, config: str, runs: list[dict]):
    self.file = storage.path(root) / "sweep.json"
    self.config, self._lock = config, threading.Lock()
    before = self._read()
    self.runs, self.vms = [], before.get("vms", {})
    old = {r["name"]: r for r in before.get("runs", [])}
    for r in runs:
      entry = {**r, "state": "queued", "vm": None, "attempts": 0, "exit": None, "history": []}
      was = old.get(r["name"])
      if was:
        entry.update({k: was[k] for k in ("state", "vm", "attempts", "exit", "history") if k in was})
        if entry["state"] != "done":  # picked up where the last sweep command stopped
          entry["history"].append(f"{entry['state']} -> queued (the sweep was run again)")
          entry["state"] = "queued"
      self.runs.append(entry)
    self.save()

  def _read(self) -> dict:
    text = storage.read_text(self.file)
    if not text:
      return {}
    value = json.loads(text)
    return value if isinstance(value, dict) else {}  # the local backend's list: nothing to pick up from

  def save(self) -> None:
    storage.write_text(self.file, json.dumps({"config": self.config, "runs": self.runs, "vms": self.vms},
                                             indent=2))

  def take(self, vm: str) -> dict | None:
    with self._lock:
      for r in self.runs:
        if r["state"] == "queued":
          r.update(state="running", vm=vm, attempts=r["attempts"] + 1)
          r["history"].append(f"running on {vm} (attempt {r['attempts']})")
          self.save()
          return r
      return None

  def finish(self, run: dict, exit_status: int, *, vm_gone: bool) -> str:
    with self._lock:
      if exit_status == 0:
        state, note = "done", "done"
      elif exit_status == RESUME_EXIT or vm_gone:
        state = "stopped"
        note = f"stopped on {run['vm']} ({'its VM was preempted' if vm_gone else 'exit 75, checkpoint saved'})"
      else:
        state, note = "failed", f"failed on {run['vm']} (exit {exit_status})"
      run.update(state=state, exit=exit_status)
      run["history"].append(note)
      if state == "stopped":  # back in the queue: it resumes from its checkpoint on the next VM free
        run["state"] = "queued"
        run["history"].append("queued again")
      self.save()
      return note

  def pending(self) -> bool:
    with self._lock:
      return any(r["state"] in ("queued", "running") for r in self.runs)

  def vm_event(self, vm: str, key: str, note: str | None = None) -> None:
    with self._lock:
      entry = self.vms.setdefault(vm, {"created": 0, "create_failures": 0, "preempted": 0, "notes": []})
      entry[key] += 1
      if note:
        entry["notes"].append(note)
      self.save()


@dataclasses.dataclass
class Options:
  config: str
  name: str = "rlhfx-sweep"  # the sweep's: VMs are <name>-0, <name>-1, ...
  keep: bool = False
  create_retries: int = 4
  create_backoff_s: float = 60.0
  log_dir: str = "logs"


class VM(threading.Thread):
  """One TPU VM working through the sweep's queue."""

  def __init__(self, target: tpu.Target, state: SweepState, options: Options, tarball: str, out, print_lock):
    super().__init__(name=target.name, daemon=True)
    self.target, self.state, self.options, self.out, self._print = target, state, options, out, print_lock
    self.tarball = tarball  # the project, packed once for every VM
    self.log = f"{options.log_dir}/{target.name}.log"
    self.exists = False

  def say(self, text: str) -> None:
    with self._print:
      print(f"[{self.target.name}] {text}", file=self.out, flush=True)

  def gcloud(self, command: list[str], *, log: bool = False) -> int:
    with open(self.log, "a") as f:
      f.write(f"+ {shlex.join(command)}\n")
      f.flush()
      return subprocess.run(command, stdout=f if log else subprocess.DEVNULL, stderr=f, stdin=subprocess.DEVNULL
                            ).returncode

  def create(self) -> bool:
    for attempt in range(self.options.create_retries + 1):
      if all(self.gcloud(c) == 0 for c in tpu.create(self.target)):
        if self.target.queued:
          tpu.wait_active(self.target, tpu.Runner(False))
        self.state.vm_event(self.target.name, "created")
        self.say("created")
        steps = tpu.copy(self.target, self.tarball) + tpu.install(self.target)
        if all(self.gcloud(c, log=True) == 0 for c in steps):
          self.exists = True
          return True
        self.say(f"copying or installing the project failed (see {self.log}); deleting it")
      wait = self.options.create_backoff_s * 2**attempt
      self.state.vm_event(self.target.name, "create_failures", f"creation {attempt + 1} failed")
      self.delete()
      if attempt < self.options.create_retries:
        self.say(f"creation failed (attempt {attempt + 1}); retrying in {wait:.0f} s")
        time.sleep(wait)
    self.say(f"creation failed {self.options.create_retries + 1} times: this VM gives up (see {self.log})")
    return False

  def gone(self) -> bool:
    """Whether the VM was preempted or deleted (describe: anything but READY)."""
    describe = ["gcloud", "compute", "tpus", "tpu-vm", "describe", self.target.name, *self.target.where(),
                "--format=value(state)"]
    proc = subprocess.run(describe, capture_output=True, text=True)
    return proc.returncode != 0 or proc.stdout.strip() != "READY"

  def delete(self) -> None:
    for command in tpu.delete(self.target):
      self.gcloud(command)
    self.exists = False

  def run(self) -> None:
    try:
      while self.state.pending():
        if not self.exists and not self.create():
          return
        run = self.state.take(self.target.name)
        if run is None:
          return  # the rest is running on other VMs
        self.say(f"{run['name']}: attempt {run['attempts']}")
        train = tpu.rlhfx_command(self.options.config, run["workdir"], run["overrides"],
                                  f"{tpu.REMOTE_VENV}/bin/python")
        rc = self.gcloud(tpu.ssh(self.target, f"cd {tpu.REMOTE_DIR} && {train}"), log=True)
        gone = rc not in (0, RESUME_EXIT) and self.gone()
        if gone:
          self.state.vm_event(self.target.name, "preempted", f"gone during {run['name']}")
        if rc == 0:
          storage.write_text(storage.path(run["workdir"]) / slurm.DONE,
                             json.dumps({"config": self.options.config, "overrides": run["overrides"]}))
        self.say(f"{run['name']}: {self.state.finish(run, rc, vm_gone=gone)}")
        if gone:
          self.delete()  # what is left of it; the next run creates it again
    finally:
      if self.exists and not self.options.keep:
        self.delete()
        self.say("deleted")


def run_sweep(config: str, runs: list[dict], root: str, targets: list[tpu.Target], options: Options, *,
              dry_run: bool, out) -> list[dict]:
  """Run `runs` across the VMs of `targets`; returns sweep.json's runs."""
  tarball = f"/tmp/{options.name}.tar.gz"
  if dry_run:  # every gcloud command, each VM's in turn, the runs dealt out round-robin
    runner = tpu.Runner(True, out=out)
    for i, t in enumerate(targets):
      runner.note(f"VM {t.name}: created, retried with backoff when creation fails")
      for command in tpu.create(t):
        runner(command)
      if t.queued:
        tpu.wait_active(t, runner)
      if i == 0:
        runner.note(f"pack the project (git ls-files -co --exclude-standard) into {tarball}")
      for command in tpu.copy(t, tarball) + tpu.install(t):
        runner(command)
    for i, r in enumerate(runs):
      t = targets[i % len(targets)]
      runner.note(f"{r['name']}: on the next free VM, e.g. {t.name}")
      runner(tpu.ssh(t, f"cd {tpu.REMOTE_DIR} && " + tpu.rlhfx_command(config, r["workdir"], r["overrides"],
                                                                         f"{tpu.REMOTE_VENV}/bin/python")))
    for t in targets:
      for command in tpu.delete(t):
        runner(command)
    return [{**r, "state": "dry-run", "status": "dry-run"} for r in runs]
  storage.path(options.log_dir).mkdir(parents=True, exist_ok=True)
  state = SweepState(root, config, runs)
  tpu.pack(tarball)
  lock = threading.Lock()
  workers = [VM(t, state, options, tarball, out, lock) for t in targets]
  for w in workers:
    w.start()
  for w in workers:
    w.join()
  return [{**r, "status": _status(r)} for r in state.runs]


def _status(run: dict) -> str:
  if run["state"] == "done":
    return "finished"
  if run["state"] == "failed":
    return f"failed (exit {run['exit']})"
  return f"stopped ({run['state']}: no VM left to run it; rerun the sweep)"
