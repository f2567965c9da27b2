"""The errors that mean "your input is wrong" (config, data, checkpoint, tokenizer, divergence), for the CLI.

A config problem exits with status 2, any other input error with status 1; both print one line.
"""

import sys
from pathlib import Path

from absl import app, flags

from rlhfx.config import ConfigError
from rlhfx.hub import HubError
from rlhfx.data.builders import DataError
from rlhfx.data.tokenize import Overlong, TokenizerError
from rlhfx.metrics import TrainingDiverged
from rlhfx.models.convert import CheckpointError
from rlhfx.reward_functions import RewardFunctionError
from rlhfx.storage import StorageError
from rlhfx.workdir import WorkdirError

USER_ERRORS = (ConfigError, DataError, Overlong, TokenizerError, TrainingDiverged, CheckpointError,
               WorkdirError, RewardFunctionError, HubError, StorageError)
CONFIG_EXIT = 2  # like a usage error
CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # the configs a checkout ships


def report(program: str, error: Exception) -> None:
  """Print `program: Kind: message` on stderr and exit: status 2 for a config problem, else 1."""
  print(f"{program}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
  sys.exit(CONFIG_EXIT if isinstance(error, ConfigError) else 1)


def _config_file_problem(argv: list[str]) -> str | None:
  """A --config that names no file (ml_collections would only say so in a traceback, later)."""
  for arg in argv[1:]:
    if arg.startswith("--config="):
      path = Path(arg.removeprefix("--config=").partition(":")[0])
      if not path.is_file():
        shipped = sorted(p.name for p in CONFIGS.glob("*.py"))
        return f"{arg}: no such config file" + (f" (the configs in {CONFIGS}: {', '.join(shipped)})" if shipped else "")
  return None


def _flag_error(error: Exception) -> str:
  """An absl flag error in one line: a config file's own exception (its last line) rather than the traceback."""
  lines = [line for line in str(error).splitlines() if line.strip()]
  if len(lines) > 1 and "Traceback" in str(error):
    return f"{lines[0].rstrip(':')}: {lines[-1].strip()}"
  return lines[0] if lines else type(error).__name__


HELP = ("-h", "--help", "-help", "--helpshort", "--helpfull")


def usage(program: str, doc: str, flag_names: tuple[str, ...]) -> str:
  """What `--help` prints: the program's docstring, its flags, the configs a checkout ships."""
  shipped = sorted(p.name for p in CONFIGS.glob("*.py"))
  described = [f"  --{name}: {flags.FLAGS[name].help}" for name in flag_names if name in flags.FLAGS]
  return "\n".join([doc.strip(), "", "flags:", *described,
                    "  --config.<field>=<value>: override a field (list them with --show_config)",
                    *([f"\nconfigs ({CONFIGS}):", *(f"  {name}" for name in shipped)] if shipped else [])])


def run_cli(main_fn, program: str, help_text: str = "") -> None:
  """absl's app.run, with an override of a field the locked config lacks, or of the wrong kind, as one line;
  `--help` prints `help_text` and exits 0."""
  if help_text and any(arg in HELP for arg in sys.argv[1:]):
    print(help_text)
    sys.exit(0)
  try:
    problem = _config_file_problem(sys.argv)
    if problem:
      report(program, ConfigError(problem))
    try:  # parsed here, once: a bad override is a config problem (status 2), not absl's status 1
      argv = flags.FLAGS(sys.argv)
    except flags.Error as e:
      report(program, ConfigError(_flag_error(e)))
    app.run(main_fn, flags_parser=lambda _: argv)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a field the locked config lacks
    key = str(e).strip("\"'")
    culprits = [a for a in sys.argv[1:] if a.startswith("--config.") and key in a.split("=")[0].split(".")]
    if not culprits:
      raise
    field = culprits[0].split("=")[0].removeprefix("--")
    report(program, ConfigError(f"unknown config field {field} (no {key!r} there); see the config file for the "
                                f"fields"))
