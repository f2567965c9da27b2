"""Run an rlhfx config on a Cloud TPU VM or pod slice: create, copy, install, run on every worker, delete.

  python launch/tpu.py --name rlhfx-dpo --zone us-west4-a --project my-project \\
      --accelerator-type v5litepod-16 --runtime-version v2-alpha-tpuv5-lite --spot \\
      --config configs/dpo_hh.py --workdir gs://my-bucket/runs/dpo -- --config.optim.learning_rate=1e-6
  python launch/tpu.py ... --dry-run          # print every command instead of running it

Steps (each a gcloud command, printed with --dry-run):
  0. plan     `python -m rlhfx.plan` compiles the config's programs for the accelerator on this
              host (libtpu: pip install -e '.[tpu]') and refuses a config that does not fit
              in the chips' HBM, before any VM exists (--no-plan skips it);
  1. create   `tpu-vm create`, or with --queued a queued resource (waits until ACTIVE);
              --spot or --reserved pick the capacity;
  2. copy     the project's tracked and untracked-but-not-ignored files as one tarball,
              `tpu-vm scp --worker=all`;
  3. install  a virtualenv with `pip install -e '.[tpu]'` on every worker; the work directory is
              one every worker sees: gs://BUCKET/... (rlhfx writes it through gcsfs and
              TensorStore), or with --bucket a gcsfuse mount of gs://BUCKET at /gcs/BUCKET
              (Orbax checkpoints from all hosts, metrics from host 0);
  4. run      the same `python -m rlhfx.main --config=... --workdir=... [overrides]` on
              every worker (`tpu-vm ssh --worker=all`); jax.distributed initialises
              itself from the TPU environment. The output of all workers streams to the
              console and to logs/<name>.log;
  5. delete   the VM (or queued resource), unless --keep. A failed run still deletes.
Preemption (spot): the run gets SIGTERM, saves a checkpoint and stops; run the same
command again — it recreates the VM and the run resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shlex
import subprocess
import sys
import tarfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhfx import topology  # noqa: E402 (stdlib only: names of TPU slices)
REMOTE_DIR = "~/rlhfx"
REMOTE_VENV = "~/rlhfx-venv"


@dataclasses.dataclass
class Target:
  name: str
  zone: str
  project: str
  accelerator_type: str = "v5litepod-8"
  runtime_version: str = "v2-alpha-tpuv5-lite"
  capacity: str = "on-demand"  # on-demand | spot | reserved
  queued: bool = False
  bucket: str = ""  # gcsfuse-mounted at /gcs/<bucket> on every worker

  def where(self) -> list[str]:
    return [f"--zone={self.zone}", f"--project={self.project}"]

  def capacity_flags(self) -> list[str]:
    return {"spot": ["--spot"], "reserved": ["--reserved"]}.get(self.capacity, [])


def create(t: Target) -> list[list[str]]:
  if t.queued:
    return [["gcloud", "compute", "tpus", "queued-resources", "create", t.name, f"--node-id={t.name}", *t.where(),
             f"--accelerator-type={t.accelerator_type}", f"--runtime-version={t.runtime_version}",
             *t.capacity_flags()]]
  return [["gcloud", "compute", "tpus", "tpu-vm", "create", t.name, *t.where(),
           f"--accelerator-type={t.accelerator_type}", f"--version={t.runtime_version}", *t.capacity_flags()]]


def wait_command(t: Target) -> list[str]:
  """Polled until it prints ACTIVE (queued resources only)."""
  return ["gcloud", "compute", "tpus", "queued-resources", "describe", t.name, *t.where(),
          "--format=value(state.state)"]


def ssh(t: Target, command: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", t.name, *t.where(), "--worker=all", f"--command={command}"]


def copy(t: Target, tarball: str) -> list[list[str]]:
  return [["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{t.name}:~/rlhfx.tar.gz", *t.where(),
           "--worker=all"]]


def install(t: Target) -> list[list[str]]:
  steps = [f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && tar xzf ~/rlhfx.tar.gz -C {REMOTE_DIR}",
           f"python3 -m venv {REMOTE_VENV}",
           f"cd {REMOTE_DIR} && {REMOTE_VENV}/bin/pip install -q -e '.[tpu]'"]
  commands = [ssh(t, " && ".join(steps))]
  if t.bucket:
    mount = (f"(mountpoint -q /gcs/{t.bucket} || (sudo mkdir -p /gcs/{t.bucket} && "
             f"sudo chown $USER /gcs/{t.bucket} && gcsfuse --implicit-dirs {t.bucket} /gcs/{t.bucket}))")
    commands.append(ssh(t, mount))
  return commands


def rlhfx_command(config: str, workdir: str, overrides: list[str], python: str = "python") -> str:
  """The training command every worker (or SLURM task, or local run) executes (`python` is not quoted, so a
  remote ~ expands)."""
  return f"{python} -m rlhfx.main " + shlex.join([f"--config={config}", f"--workdir={workdir}", *overrides])


def run(t: Target, config: str, workdir: str, overrides: list[str]) -> list[list[str]]:
  return [ssh(t, f"cd {REMOTE_DIR} && " + rlhfx_command(config, workdir, overrides, f"{REMOTE_VENV}/bin/python"))]


def delete(t: Target) -> list[list[str]]:
  if t.queued:
    return [["gcloud", "compute", "tpus", "queued-resources", "delete", t.name, *t.where(), "--force", "--quiet"]]
  return [["gcloud", "compute", "tpus", "tpu-vm", "delete", t.name, *t.where(), "--quiet"]]


def project_files(root: pathlib.Path = ROOT) -> list[str]:
  proc = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root, capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f"packing the project: `git ls-files` failed in {root} ({proc.stderr.strip()[:120]}); the "
                     f"launchers copy a git checkout's files")
  out = proc.stdout
  return sorted(line for line in out.splitlines() if line and (root / line).is_file())


def pack(tarball: str, root: pathlib.Path = ROOT) -> int:
  files = project_files(root)
  with tarfile.open(tarball, "w:gz") as tar:
    for name in files:
      tar.add(root / name, arcname=name)
  return len(files)


class Runner:
  """Runs (or, dry, prints) commands; `log` receives the run's streamed output."""

  def __init__(self, dry_run: bool, log: pathlib.Path | None = None, out=None):
    self.dry_run, self.log, self._out = dry_run, log, out

  @property
  def out(self):
    return self._out or sys.stdout

  def __call__(self, command: list[str], *, stream: bool = False, check: bool = True) -> int:
    print(("" if self.dry_run else "+ ") + shlex.join(command), file=self.out, flush=True)
    if self.dry_run:
      return 0
    if not stream:
      return subprocess.run(command, check=check).returncode
    self.log.parent.mkdir(parents=True, exist_ok=True)
    with open(self.log, "a") as log, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True) as proc:
      for line in proc.stdout:
        self.out.write(line)
        log.write(line)
      rc = proc.wait()
    if check and rc:
      raise subprocess.CalledProcessError(rc, command)
    return rc

  def note(self, text: str) -> None:
    print(f"# {text}", file=self.out, flush=True)


def wait_active(t: Target, runner: Runner, poll_s: float = 30.0, timeout_s: float = 6 * 3600) -> None:
  if runner.dry_run:
    runner.note(f"poll until it prints ACTIVE: {shlex.join(wait_command(t))}")
    return
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    state = subprocess.run(wait_command(t), capture_output=True, text=True).stdout.strip()
    print(f"queued resource {t.name}: {state}", flush=True)
    if state == "ACTIVE":
      return
    if state in ("FAILED", "SUSPENDED"):
      raise RuntimeError(f"queued resource {t.name} is {state}")
    time.sleep(poll_s)
  raise TimeoutError(f"queued resource {t.name} not ACTIVE after {timeout_s} s")


def plan_command(config: str, accelerator_type: str, overrides: list[str]) -> list[str]:
  return ["python", "-m", "rlhfx.plan", f"--config={config}", f"--topology={accelerator_type}", *overrides,
          "--json"]


def check_plan(config: str, accelerator_type: str, overrides: list[str], *, runner: Runner) -> bool:
  """Whether the planner says the config's programs fit the accelerator (printed, not run, with --dry-run)."""
  command = plan_command(config, accelerator_type, overrides)
  if runner.dry_run:
    runner(command)
    return True
  runner.note(f"plan: {shlex.join(command[1:-1])}")
  proc = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True)
  try:
    report = json.loads(proc.stdout)
  except json.JSONDecodeError:
    runner.note(f"the planner failed (exit {proc.returncode}): {(proc.stderr.strip().splitlines() or [''])[-1]}; "
                "--no-plan launches without it")
    return False
  gib = report["hbm_bytes_per_chip"] / 2**30
  for p in report["programs"]:
    total = p["bytes_per_chip"].get("total")
    runner.note(f"  {p['name']}: " + (f"{total / 2**30:.2f} of {gib:.2f} GiB per chip" if total else p["error"])
                + ("" if p["fits"] else " -- DOES NOT FIT"))
  if not report["fits"]:
    runner.note(f"{config} does not fit {accelerator_type}: not creating anything (python -m rlhfx.plan "
                f"--config={config} --topology={accelerator_type} --search lists settings that fit; "
                "--no-plan launches anyway)")
  return bool(report["fits"])


def launch(t: Target, config: str, workdir: str, overrides: list[str], *, runner: Runner, keep: bool = False,
           create_vm: bool = True, plan: bool = True) -> int:
  """Plan, create, copy, install, run, delete; returns the run's exit status (3: the plan says it does not fit)."""
  tarball = f"/tmp/{t.name}.tar.gz"
  if plan and not check_plan(config, t.accelerator_type, overrides, runner=runner):
    return 3
  if create_vm:
    for command in create(t):
      runner(command)
    if t.queued:
      wait_active(t, runner)
  try:
    runner.note(f"pack the project (git ls-files -co --exclude-standard) into {tarball}")
    if not runner.dry_run:
      pack(tarball)
    for command in copy(t, tarball) + install(t):
      runner(command)
    rc = 0
    for command in run(t, config, workdir, overrides):
      rc = runner(command, stream=True, check=False)
    if not runner.dry_run:
      runner.note(f"run exit status {rc}; logs in {runner.log}")
    return rc
  finally:
    if not keep:
      for command in delete(t):
        runner(command, check=False)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--name", required=True, help="TPU VM / queued resource name")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", required=True)
  p.add_argument("--accelerator-type", default="v5litepod-8", help="v5litepod-8, v5litepod-16, v6e-8, v4-32, ...")
  p.add_argument("--runtime-version", default="v2-alpha-tpuv5-lite",
                 help="TPU software version (v6e: v2-alpha-tpuv6e; v4: tpu-ubuntu2204-base)")
  capacity = p.add_mutually_exclusive_group()
  capacity.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
  capacity.add_argument("--reserved", action="store_true", help="reserved capacity")
  p.add_argument("--queued", action="store_true", help="create through a queued resource and wait for it")
  p.add_argument("--bucket", default="", help="GCS bucket gcsfuse-mounted at /gcs/BUCKET on every worker")
  p.add_argument("--config", required=True, help="configs/<file>.py[:variant], relative to the project")
  p.add_argument("--workdir", required=True, help="shared by all workers: gs://BUCKET/... (or /gcs/BUCKET/... with "
                 "--bucket)")
  p.add_argument("--keep", action="store_true", help="do not delete the VM at the end")
  p.add_argument("--log-dir", default=str(ROOT / "logs"))
  p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
  p.add_argument("--no-plan", action="store_true", help="skip the memory plan (rlhfx.plan) before creating the VM")
  p.add_argument("overrides", nargs="*", help="after --: --config.a.b=value overrides")
  return p


def target_from(args) -> Target:
  capacity = "spot" if args.spot else "reserved" if args.reserved else "on-demand"
  return Target(name=args.name, zone=args.zone, project=args.project, accelerator_type=args.accelerator_type,
                runtime_version=args.runtime_version, capacity=capacity, queued=args.queued, bucket=args.bucket)


def check_args(args) -> str | None:
  """What is wrong with the arguments before anything runs (a dry run too): the config file, the accelerator."""
  path = pathlib.Path(args.config.partition(":")[0])
  if not (path if path.is_absolute() else ROOT / path).is_file():
    return f"--config={args.config}: no such config file (relative to {ROOT})"
  try:
    topology.compiler_name(args.accelerator_type)
  except topology.TopologyError as e:
    return f"--accelerator-type={args.accelerator_type}: {str(e).split(': ', 1)[-1]}"
  return None


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  problem = check_args(args)
  if problem:
    print(f"launch/tpu.py: {problem}", file=sys.stderr, flush=True)
    return 2
  runner = Runner(args.dry_run, pathlib.Path(args.log_dir) / f"{args.name}.log")
  try:
    return launch(target_from(args), args.config, args.workdir, args.overrides, runner=runner, keep=args.keep,
                  plan=not args.no_plan)
  except subprocess.CalledProcessError as e:  # a gcloud step failed: its own output is above (and in the log)
    step = " ".join(str(c) for c in e.cmd[:4])
    print(f"launch/tpu.py: `{step} ...` failed with exit status {e.returncode}; see its output above and "
          f"{runner.log}", file=sys.stderr, flush=True)
    return 1
  except FileNotFoundError as e:  # gcloud itself missing
    print(f"launch/tpu.py: {e.filename}: not found (install the Google Cloud CLI)", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
  sys.exit(main())
