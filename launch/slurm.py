"""Run an rlhfx config on a SLURM GPU cluster: writes an sbatch script and submits it.

  python launch/slurm.py --name dpo-1b --nodes 2 --gpus-per-node 8 --time 12:00:00 --partition gpu \\
      --venv ~/rlhfx-venv --config configs/dpo_hh.py --workdir /shared/runs/dpo -- --config.dpo.beta=0.05
  python launch/slurm.py ... --dry-run        # print the script and the sbatch command

One task per node sees all of its GPUs; `jax.distributed.initialize()` reads SLURM's
variables (coordinator = the first node, process id = SLURM_PROCID), so the same
`python -m rlhfx.main` runs on every node with one global mesh. The work directory
must be on a filesystem every node sees. SLURM sends SIGTERM two minutes before
the time limit (`--signal=TERM@120`): rlhfx saves a checkpoint and stops with exit status
75, on which the script requeues the job (`--requeue` lets it), and the requeued job resumes. A finished run leaves
`<workdir>/sweep_done.json`; a resubmitted finished run exits at once.
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch.tpu import rlhfx_command  # noqa: E402

DONE = "sweep_done.json"


def sbatch_script(*, name: str, config: str, workdir: str, overrides: list[str], nodes: int = 1,
                  gpus_per_node: int = 8, cpus_per_task: int = 16, time: str = "24:00:00", partition: str = "",
                  venv: str = "~/rlhfx-venv", project_dir: str = str(ROOT), log_dir: str = "logs") -> str:
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name={name}",
           f"#SBATCH --nodes={nodes}",
           "#SBATCH --ntasks-per-node=1",
           f"#SBATCH --gpus-per-node={gpus_per_node}",
           f"#SBATCH --cpus-per-task={cpus_per_task}",
           f"#SBATCH --time={time}",
           f"#SBATCH --output={log_dir}/%x-%j.out",
           "#SBATCH --signal=TERM@120",
           "#SBATCH --requeue"]
  if partition:
    lines.append(f"#SBATCH --partition={partition}")
  done = f"{workdir}/{DONE}"
  lines += ["set -euo pipefail",
            f"cd {shlex.quote(project_dir)}",
            f"source {venv}/bin/activate",
            f"if [ -f {shlex.quote(done)} ]; then echo 'finished before: {done}'; exit 0; fi",
            "# every task: jax.distributed.initialize() from SLURM_* (coordinator = first node)",
            "# exit 75: SIGTERM stopped the run after a checkpoint -> requeue this job, which resumes it",
            "srun --kill-on-bad-exit=1 " + rlhfx_command(config, workdir, overrides)
            + ' || { rc=$?; if [ "$rc" -eq 75 ]; then scontrol requeue "$SLURM_JOB_ID"; fi; exit "$rc"; }',
            f"echo '{{\"config\": \"{config}\"}}' > {shlex.quote(done)}",
            ""]
  return "\n".join(lines)


def submit(script: str, path: pathlib.Path, *, dry_run: bool, out=None) -> int:
  out = out or sys.stdout
  command = ["sbatch", str(path)]
  if dry_run:
    print(f"# {path}:", file=out)
    print(script, file=out)
    print(shlex.join(command), file=out, flush=True)
    return 0
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(script)
  print("+ " + shlex.join(command), file=out, flush=True)
  return subprocess.run(command).returncode


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--name", required=True)
  p.add_argument("--nodes", type=int, default=1)
  p.add_argument("--gpus-per-node", type=int, default=8)
  p.add_argument("--cpus-per-task", type=int, default=16)
  p.add_argument("--time", default="24:00:00")
  p.add_argument("--partition", default="")
  p.add_argument("--venv", default="~/rlhfx-venv", help="a virtualenv with `pip install -e '.[cuda]'`")
  p.add_argument("--project-dir", default=str(ROOT), help="the project checkout on the cluster")
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True, help="on a filesystem every node sees")
  p.add_argument("--log-dir", default="logs")
  p.add_argument("--dry-run", action="store_true")
  p.add_argument("overrides", nargs="*", help="after --: --config.a.b=value overrides")
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  script = sbatch_script(name=args.name, config=args.config, workdir=args.workdir, overrides=args.overrides,
                         nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
                         time=args.time, partition=args.partition, venv=args.venv, project_dir=args.project_dir,
                         log_dir=args.log_dir)
  return submit(script, pathlib.Path(args.log_dir) / f"{args.name}.sbatch", dry_run=args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
