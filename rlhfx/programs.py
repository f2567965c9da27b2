"""The jitted programs a run of a config executes, built from ShapeDtypeStructs: nothing is allocated.

  for p in programs.build(config, model_config, runtime):
    compiled = p.fn.lower(*p.args).compile()     # under sharding.active(runtime.mesh, runtime.rules)

Each algorithm's own `init` makes the state, the frozen trees and the jitted functions, the
same call its `train()` makes, on `load.Trees(runtime, abstract=True)`: only the values are
abstract. `parts` groups the arguments the way the planner reports them (parameters,
optimizer state, frozen trees, batch), and `flops` counts the matmul FLOPs of one call from
the model's shape and the algorithm's own FLOPs per token (the compiler's cost analysis
counts a scan's body once).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from rlhfx import flops, sharding
from rlhfx.algorithms import dpo as dpo_algorithm, grpo, ppo, reward as reward_algorithm, sft as sft_algorithm
from rlhfx.config import ConfigError
from rlhfx.models import ModelConfig, load
from rlhfx.models.transformer import init_cache


@dataclasses.dataclass
class Program:
  name: str
  fn: Callable  # a jax.jit-wrapped function
  args: tuple  # ShapeDtypeStructs with shardings
  parts: dict[str, Any]  # report category -> tree of ShapeDtypeStructs (a subset of args)
  flops: float  # matmul FLOPs of one call, all chips together (from the model's shape)
  kv_cache: Any = None  # ShapeDtypeStructs of the KV cache the program builds inside (sampling), if any
  trains: bool = True  # has a backward pass (which recomputes a rematerialised forward)
  decode_steps: int = 0  # sampling: iterations of the decode loop at most (its trip count is not in the program)
  generated_tokens: int = 0  # sampling: tokens one call generates, all rows together
  mesh: Any = None  # the mesh it is traced and run under, when not the run's (the sampling layout's)
  rules: Any = None
  resident: Any = None  # trees that stay in HBM beside its own (the training state while sampling)


def batch_struct(shapes: dict[str, tuple[tuple[int, ...], Any]], mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """{name: (shape, dtype)} -> global ShapeDtypeStructs split over the batch axes, as `sharding.global_batch` does."""
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
          for k, (shape, dtype) in shapes.items()}


def _pair_batch(rows: int, length: int, mesh, precomputed: bool, unpaired: bool = False) -> dict:
  """A preference batch (chosen_*/rejected_* rows, or unpaired rows with label_B), with the precomputed
  reference columns when `precomputed`."""
  sides = ("",) if unpaired else ("chosen_", "rejected_")
  shapes = {f"{side}{k}": ((rows, length), dtype) for side in sides
            for k, dtype in (("tokens_BxT", jnp.int32), ("mask_BxT", bool), ("loss_mask_BxT", bool))}
  if unpaired:
    shapes["label_B"] = ((rows,), bool)
  if precomputed:
    keys = ("ref_logps_B",) if unpaired else ("ref_chosen_logps_B", "ref_rejected_logps_B")
    shapes.update({k: ((rows,), jnp.float32) for k in keys})
  return batch_struct(shapes, mesh)


def _abstract(config, model_config: ModelConfig, runtime, algorithm):
  return algorithm.init(config, model_config, load.Trees(runtime, abstract=True))


def sft(config, model_config: ModelConfig, runtime) -> list[Program]:
  run = _abstract(config, model_config, runtime, sft_algorithm)
  rows, length = config.train.global_batch_size, max(config.data.buckets)
  batch = batch_struct({k: ((rows, length), dtype) for k, dtype in (
      ("tokens_BxT", jnp.int32), ("mask_BxT", bool), ("loss_mask_BxT", bool))}, runtime.mesh)
  parts = {"parameters": run.state.params, "optimizer state": run.state.opt_state, "batch": batch}
  return [Program("sft_step", run.jitted, (run.state, batch), parts, rows * length * run.flops_per_token)]


def reward(config, model_config: ModelConfig, runtime) -> list[Program]:
  run = _abstract(config, model_config, runtime, reward_algorithm)
  rows, length = config.train.global_batch_size, max(config.data.buckets)
  batch = _pair_batch(rows, length, runtime.mesh, precomputed=False)
  parts = {"parameters": run.state.params, "optimizer state": run.state.opt_state, "batch": batch}
  return [Program("reward_step", run.jitted, (run.state, batch), parts, 2 * rows * length * run.flops_per_token)]


def dpo(config, model_config: ModelConfig, runtime) -> list[Program]:
  run = _abstract(config, model_config, runtime, dpo_algorithm)
  s, reference = run.settings, run.frozen["reference"]
  rows, length = config.train.global_batch_size, max(config.data.buckets)
  batch = _pair_batch(rows, length, runtime.mesh, precomputed=s.reference == "precomputed", unpaired=s.unpaired)
  tokens = (rows if s.unpaired else 2 * rows) * length
  parts = {"parameters": run.state.params, "optimizer state": run.state.opt_state, "batch": batch}
  if reference is not None:
    parts["frozen: reference"] = reference
  programs = [Program("dpo_step", run.jitted, (run.state, batch, reference), parts, tokens * run.flops_per_token)]
  if s.reference == "precomputed":  # one pass over the data before training, with the initial policy
    policy = dpo_algorithm.initial_policy(run.state.params)
    ref_batch = _pair_batch(rows, length, runtime.mesh, precomputed=False, unpaired=s.unpaired)
    programs.append(Program("reference_logps", dpo_algorithm.jit_reference_logps(s), (policy, ref_batch),
                            {"parameters": policy, "batch": ref_batch}, tokens * run.flops_per_token / 3,
                            trains=False))
  return programs


def onpolicy(config, model_config: ModelConfig, runtime) -> list[Program]:
  """PPO and GRPO: the fused iteration (in-graph scoring), or rollout, scoring and update as three programs
  (`train.time_phases`, or a host reward function); with a sampling layout, reshard and rollout there."""
  run = _abstract(config, model_config, runtime, ppo if config.algorithm == "ppo" else grpo)
  s, state, frozen, steps = run.settings, run.state, run.frozen, run.jitted
  reward_params = frozen["reward"]
  prompts, length = config.train.global_batch_size, max(config.data.buckets)
  batch = batch_struct({"prompt_BxP": ((prompts, length), jnp.int32), "prompt_mask_BxP": ((prompts, length), bool)},
                       runtime.mesh)
  rows, completion = prompts * s.sampling.group_size, s.sampling.max_new_tokens
  kv_cache = jax.eval_shape(lambda: init_cache(model_config, rows, length + completion))
  iteration_flops = rows * (length + completion) * run.flops_per_token
  trained = state.params["policy"] if config.algorithm == "ppo" else state.params
  critic = {k: v for k, v in state.params.items() if k != "policy"} if config.algorithm == "ppo" else None
  parts = {"parameters: policy": trained, "parameters: critic": critic or None,
           "optimizer state": state.opt_state, "frozen: reference": frozen["reference"], "batch": batch}
  if reward_params is not None:
    parts["frozen: reward model"] = reward_params
  decode = dict(decode_steps=completion - 1, generated_tokens=rows * completion)
  fused = s.scorer.in_graph and not config.train.time_phases
  if fused and steps.layout is None:
    return [Program(f"{config.algorithm}_iteration", steps.iteration, (state, batch, frozen), parts, iteration_flops,
                    kv_cache, **decode)]
  rollout_abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(runtime.mesh, x.ndim)),
      jax.eval_shape(steps.rollout, state, batch))
  scores = jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=sharding.batch_sharding(runtime.mesh, 1))
  sample_flops = 2 * rows * (length + completion) * flops.train_flops_per_token(model_config, length + completion) / 6
  if steps.layout is None:
    programs = [Program("rollout", steps.rollout, (state, batch), {"parameters: policy": trained, "batch": batch},
                        sample_flops, kv_cache, trains=False, **decode)]
  else:
    programs = _sampling_programs(steps, state, batch, trained, sample_flops, kv_cache,
                                  {"training state": state, **{f"frozen: {k}": v for k, v in frozen.items()}},
                                  decode)
  if fused:  # in-graph scoring and the update, after a rollout sampled in its own layout
    programs.append(Program(f"{config.algorithm}_update", steps.scored_update, (state, rollout_abstract, frozen),
                            {**parts, "rollout": rollout_abstract}, iteration_flops - sample_flops))
    return programs
  if reward_params is not None:
    rm_config = s.scorer.module.config
    programs.append(Program("scoring", steps.score, (rollout_abstract, reward_params),
                            {"frozen: reward model": reward_params, "rollout": rollout_abstract},
                            2 * rows * (length + completion) * flops.train_flops_per_token(rm_config, length) / 6,
                            trains=False))
  programs.append(Program("update", steps.update, (state, rollout_abstract, scores, frozen),
                          {**parts, "rollout": rollout_abstract}, iteration_flops - sample_flops))
  return programs


def _sampling_programs(steps, state, batch, trained, sample_flops, kv_cache, resident, decode) -> list[Program]:
  """The reshard of the policy into the sampling layout, and sampling there (with the training state resident)."""
  layout = steps.layout
  sampled = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         jax.eval_shape(steps.reshard, state), layout.params)
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=jax.sharding.NamedSharding(layout.mesh,
                                                                                 jax.sharding.PartitionSpec()))
  prompts = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=layout.batch(v.shape)) for k, v in batch.items()}
  return [Program("reshard", steps.reshard, (state,), {"parameters: policy": trained, "sampled policy": sampled},
                  0.0, trains=False),
          Program("rollout", steps.sample, (sampled, prompts, step), {"sampled policy": sampled, "batch": prompts},
                  sample_flops, kv_cache, trains=False, mesh=layout.mesh, rules=layout.rules, resident=resident,
                  **decode)]


def members(config, model_config: ModelConfig, runtime, count: int) -> list[Program]:
  """The step of `count` members of `config` trained together (`rlhfx.members`: their numbers differ, which
  changes no shape): the stacked state, the frozen trees and the LoRA base once, one batch."""
  from rlhfx import members as members_lib

  configs = {f"{i:02d}": config for i in range(count)}
  program = members_lib.init(configs, model_config, load.Trees(runtime, abstract=True))
  rows, length, mesh = config.train.global_batch_size, max(config.data.buckets), runtime.mesh
  s = program.settings
  if config.algorithm == "sft":
    batch = batch_struct({k: ((rows, length), dtype) for k, dtype in (
        ("tokens_BxT", jnp.int32), ("mask_BxT", bool), ("loss_mask_BxT", bool))}, mesh)
    tokens = rows * length
  else:
    unpaired = config.algorithm == "dpo" and s.unpaired
    batch = _pair_batch(rows, length, mesh, precomputed=config.algorithm == "dpo" and s.reference == "precomputed",
                        unpaired=unpaired)
    tokens = (rows if unpaired else 2 * rows) * length
  per_member = tokens * program.flops_per_token
  shared = per_member / 4 if config.algorithm == "dpo" and s.reference in ("frozen", "lora_base") else 0.0
  axes, state = program.axes, program.state
  own = lambda a, x: x if a == 0 else None  # noqa: E731
  parts = {"parameters: every member": jax.tree.map(own, axes.params, state.params, is_leaf=members_lib.is_axis),
           "frozen: LoRA base (once)": jax.tree.map(lambda a, x: x if a is None else None, axes.params,
                                                    state.params, is_leaf=members_lib.is_axis) or None,
           "optimizer state: every member": state.opt_state,
           **{f"frozen: {k} (once)": v for k, v in program.frozen.items() if v is not None}, "batch": batch}
  alive = jax.ShapeDtypeStruct((count,), bool, sharding=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(program.axis)))
  return [Program(f"members_step ({count} members)", program.step,
                  (state, batch, *program.frozen_args, program.numbers, alive), parts,
                  count * (per_member - shared) + shared, mesh=mesh, rules=program.rules)]


BUILDERS = {"sft": sft, "reward": reward, "dpo": dpo, "ppo": onpolicy, "grpo": onpolicy}


def build(config, model_config: ModelConfig, runtime) -> list[Program]:
  """The programs of `config.algorithm`, traced under the runtime's mesh and rules."""
  if config.algorithm not in BUILDERS:
    raise ConfigError(f"config.algorithm={config.algorithm!r}; expected one of {sorted(BUILDERS)}")
  with sharding.active(runtime.mesh, runtime.rules):
    return BUILDERS[config.algorithm](config, model_config, runtime)
