"""Run by tests/test_init.py in a process of 8 CPU devices: each algorithm's state and frozen trees as the planner
builds them (ShapeDtypeStructs, `rlhfx.programs`) and as a run makes them (`<algorithm>.init` on real arrays),
compared leaf by leaf: tree structure, shapes, dtypes, shardings. Prints one JSON line per case."""

import json
import os
import sys
import tempfile

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

from rlhfx import programs, scoring, sharding  # noqa: E402
from rlhfx.algorithms import dpo, grpo, ppo, reward, sft  # noqa: E402
from rlhfx.config import base_config  # noqa: E402
from rlhfx.data.synthetic import byte_tokenizer  # noqa: E402
from rlhfx.models import load  # noqa: E402
from rlhfx.models.heads import ScoreModel  # noqa: E402

ALGORITHMS = {"sft": sft, "reward": reward, "dpo": dpo, "ppo": ppo, "grpo": grpo}


def config_of(algorithm: str, overrides: dict, reward_dir: str):
  config = base_config(algorithm)
  config.model.preset, config.model.vocab_size, config.model.max_seq_len = "tiny", 320, 64
  config.model.param_dtype = "bfloat16"  # parameters, frozen copies (compute dtype) and float32 heads all differ
  config.mesh.num_cpu_devices, config.mesh.shape.data, config.mesh.shape.fsdp, config.mesh.shape.tensor = 8, 1, 4, 2
  config.train.global_batch_size, config.data.buckets = 8, (32,)
  if algorithm in ("ppo", "grpo"):
    config.rollout.max_new_tokens = 8
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = reward_dir if value == "<reward model>" else value
  return config


def planned(config, model_config, runtime) -> tuple:
  """(state, frozen trees) of the training program the planner compiles."""
  progs = programs.build(config, model_config, runtime)
  train = next(p for p in progs if p.name.endswith(("_step", "_iteration", "_update")) or p.name == "update")
  frozen = {"reference": train.args[2]} if config.algorithm == "dpo" else train.args[-1] if \
      config.algorithm in ("ppo", "grpo") else {}
  return train.args[0], frozen


def leaves(tree) -> list:
  return [(jax.tree_util.keystr(path), x.shape, str(x.dtype), x.sharding.mesh.shape_tuple, x.sharding.spec)
          for path, x in jax.tree_util.tree_leaves_with_path(tree)]


def normal(spec_leaf):
  """A PartitionSpec without trailing Nones (P('fsdp', None) places an array as P('fsdp') does)."""
  name, shape, dtype, mesh, spec = spec_leaf
  spec = tuple(spec)
  while spec and spec[-1] is None:
    spec = spec[:-1]
  return name, shape, dtype, mesh, spec


def compare(case: str, algorithm: str, overrides: dict, reward_dir: str) -> dict:
  config = config_of(algorithm, overrides, reward_dir)
  runtime = sharding.setup(config, sharding.Path(tempfile.mkdtemp()))
  model_config = load.model_config(config, load_params=False)[0]
  with sharding.active(runtime.mesh, runtime.rules):
    plan_state, plan_frozen = planned(config, model_config, runtime)
    extra = (byte_tokenizer(), None) if algorithm in ("ppo", "grpo") else ()
    run = ALGORITHMS[algorithm].init(config, model_config, load.Trees.of_run(config, runtime), *extra)
  result = {"case": case, "leaves": 0, "differences": []}
  for part, a, b in (("state", plan_state, run.state), ("frozen", plan_frozen, run.frozen)):
    if jax.tree.structure(a) != jax.tree.structure(b):
      result["differences"].append(f"{part}: tree {jax.tree.structure(a)} != {jax.tree.structure(b)}")
      continue
    for x, y in zip(leaves(a), leaves(b)):
      result["leaves"] += 1
      if normal(x) != normal(y):
        result["differences"].append(f"{part}{x[0]}: planned {normal(x)[1:]} != run {normal(y)[1:]}")
  return result


CASES = {
    "sft_lora": ("sft", {"lora.rank": 4}),
    "reward": ("reward", {}),
    "dpo_frozen": ("dpo", {}),
    "dpo_precomputed_lora": ("dpo", {"dpo.reference": "precomputed", "lora.rank": 4}),
    "kto": ("dpo", {"dpo.loss": "kto", "data.input_format": "unpaired"}),
    "ppo_critic_from_reward_model": ("ppo", {"scoring.model": "<reward model>", "ppo.value_model": "separate"}),
    "ppo_critic_from_policy": ("ppo", {"scoring.model": "", "scoring.functions": ("fraction:ab",),
                                       "ppo.value_model": "separate"}),
    "ppo_value_head": ("ppo", {"scoring.model": "<reward model>", "ppo.value_model": "policy_head"}),
    "grpo_reward_model_lora": ("grpo", {"scoring.model": "<reward model>", "lora.rank": 4}),
}


def main(names):
  jax.config.update("jax_num_cpu_devices", 8)
  reward_dir = tempfile.mkdtemp()
  rm_config = load.model_config(config_of("reward", {}, ""), load_params=False)[0]
  params = ScoreModel(rm_config).init(jax.random.key(0), jax.numpy.zeros((1, 4), jax.numpy.int32))["params"]
  scoring.export_reward_model(reward_dir, rm_config, sharding.unbox(params), {"mean": 0.0, "std": 1.0})
  for name in names:
    print(json.dumps(compare(name, *CASES[name], reward_dir)), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:] or list(CASES))
