"""One validation pass: every field of every algorithm's config, bad values named in one line, exit status 2."""

import pathlib
import subprocess
import sys

import pytest
from ml_collections import ConfigDict

from rlhfx import validation
from rlhfx.config import ALGORITHMS, ConfigError, base_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _leaves(config, prefix=""):
  for key, value in config.items():
    if isinstance(value, ConfigDict) and key != "shape":
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def _set(config, path: str, value):
  *parents, key = path.split(".")
  node = config
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[key] = value


def _wrong_kind(config, path: str):
  """A value of another kind than the field's default: a string where a number or tuple goes, else a number."""
  *parents, key = path.split(".")
  node = config
  for p in parents:
    node = node[p]
  return 3 if node.get_type(key) is str else "nope"


def _valid(algorithm: str):
  config = base_config(algorithm)
  if algorithm in ("ppo", "grpo"):
    config.scoring.functions = ("fraction:abc",)
  return config


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_defaults_are_valid(algorithm):
  assert validation.problems(_valid(algorithm)) == []


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_field_with_a_value_of_the_wrong_kind_is_named_in_one_line(algorithm):
  paths = list(_leaves(_valid(algorithm)))
  assert len(paths) >= 58  # every field, not a sample
  for path in paths:
    config = _valid(algorithm)
    bad = _wrong_kind(config, path)
    _set(config, path, bad)
    with pytest.raises(ConfigError) as e:
      validation.check(config)
    message = str(e.value)
    assert "\n" not in message, path
    assert message.startswith(f"config.{path}={bad!r}: expected "), (path, message)


ALL_LOSSES = ("sigmoid, robust, ipo, hinge, simpo, orpo, kto, ipo_sum, sigmoid_norm, exo_pair, nca_pair, bco_pair, "
              "sppo_hard, apo_zero, apo_down, discopop")


@pytest.mark.parametrize("path, value, allowed", [
    ("dpo.loss", "nope", "expected one of " + ALL_LOSSES),
    ("optim.schedule", "linear", "expected one of cosine, constant"),
    ("model.dtype", "fp16", "expected one of float32, bfloat16"),
    ("model.remat", "some", "expected one of none, full, dots, dots_no_batch"),
    ("dpo.reference", "other", "expected one of frozen, precomputed, lora_base"),
    ("train.num_steps", 0, "expected a value > 0"),
    ("train.num_steps", -3, "expected a value > 0"),
    ("train.global_batch_size", 0, "expected a value > 0"),
    ("train.checkpoint_every", 0, "expected a value > 0"),
    ("train.log_every", 0, "expected a value > 0"),
    ("train.grad_accum_steps", 0, "expected a value > 0"),
    ("train.eval_every", -1, "expected a value >= 0"),
    ("data.eval_fraction", 1.0, "expected a value in [0, 1)"),
    ("dpo.label_smoothing", 0.5, "expected a value in [0, 0.5)"),
    ("data.buckets", (64, 0), "expected one or more positive integers"),
    ("optim.freeze", ("(unclosed",), "is not a regular expression"),
    ("mesh.shape", {"data": 0, "fsdp": 1, "tensor": 1}, "expected sizes of data, fsdp and tensor"),
])
def test_bad_values_name_the_field_and_what_is_allowed(path, value, allowed):
  config = _valid("dpo")
  _set(config, path, value)
  with pytest.raises(ConfigError, match=f"^config.{path}=") as e:
    validation.check(config)
  assert allowed in str(e.value)


def test_exo_pair_needs_a_positive_label_smoothing():
  config = _valid("dpo")
  config.dpo.loss = "exo_pair"  # the shared field's default is sigmoid's 0.0, where EXO's log(eps) is -inf
  assert validation.problems(config) == [
      "config.dpo.label_smoothing=0.0: exo_pair's target (1 - eps, eps) needs eps > 0 (the EXO paper uses 1e-3)"]
  config.dpo.label_smoothing = 1e-3
  assert validation.problems(config) == []


def test_unknown_algorithm_and_combinations():
  config = _valid("sft")
  config.algorithm = "foo"
  assert validation.problems(config) == ["config.algorithm='foo': expected one of sft, reward, dpo, ppo, grpo"]
  config = _valid("dpo")
  config.dpo.loss = "kto"  # unpaired loss on the default paired input
  assert any("takes unpaired data" in p for p in validation.problems(config))
  config.data.input_format = "unpaired"
  assert validation.problems(config) == []
  config = _valid("grpo")
  config.rollout.group_size = 1
  assert validation.problems(config) == ["config.rollout.group_size=1: group advantages need >= 2 samples per prompt"]
  config = _valid("ppo")
  config.scoring.functions = ()  # neither a model nor a function
  assert validation.problems(config) == [
      "set config.scoring.model (a reward model) or config.scoring.functions (reward functions), or both"]
  config.scoring.functions = ("math_answer", "nonsense")
  config.scoring.weights = (1.0,)
  assert validation.problems(config) == [
      "config.scoring.weights has 1 entries for 2 scoring.functions",
      "config.scoring.functions[1]='nonsense': expected one of ['math_answer', 'think_format'], 'regex:<pattern>', "
      "'fraction:<chars>' or 'module:function'"]
  config = _valid("sft")
  config.data.input_format = "pairs"
  assert validation.problems(config) == [
      "config.data.input_format='pairs' gives preference data; sft takes one of hh_chosen, sft"]
  config = _valid("sft")
  config.data.max_length = 22  # below the default prompt limit (128): was a ValueError traceback from the pipeline
  assert validation.problems(config) == [
      "config.data.max_prompt_length=128 must be less than config.data.max_length=22"]


@pytest.mark.parametrize("override, message", [
    ("--config.dpo.loss=nope", "config.dpo.loss='nope': expected one of " + ALL_LOSSES),
    ("--config.train.num_steps=abc", "--config.train.num_steps=abc: invalid literal for int()"),
    ("--config.train.nope=1", "unknown config field config.train.nope"),
])
def test_the_cli_exits_2_with_one_line_before_building_anything(tmp_path, override, message):
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-m", "rlhfx.main", "--config=configs/dpo_hh.py:tiny",
                         f"--workdir={workdir}", override], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith("rlhfx: ")]
  assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert not workdir.exists()  # no data built, no directory made


def test_a_reward_function_whose_package_is_missing_is_a_config_problem(monkeypatch):
  """math_answer without math-verify: one line at validation, before any data is built."""
  import importlib.util

  from rlhfx.config import load

  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else find_spec(
      name, *a))
  config = load(pathlib.Path(__file__).resolve().parents[1] / "configs" / "grpo_math.py:tiny")
  assert "config.scoring.functions[0]='math_answer': 'math_answer' needs math-verify: pip install 'rlhfx[math]'" in (
      validation.problems(config))
