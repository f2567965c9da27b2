"""The jitted programs a run of a config executes, built from ShapeDtypeStructs: nothing is allocated.

  for p in programs.build(config, model_config, runtime):
    compiled = p.fn.lower(*p.args).compile()     # under sharding.active(runtime.mesh, runtime.rules)

Each algorithm's own `jit_train_step` (or `jit_programs`) makes the function, from the
same optimizer, state shardings (`train_state.create_state`) and frozen trees as its
`train()`; only the values are abstract. `parts` groups the arguments the way the
planner reports them (parameters, optimizer state, frozen trees, batch), and `flops`
counts the matmul FLOPs of one call from the model's shape (the compiler's cost
analysis counts a scan's body once).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp

from rlhfx import sharding, train_state
from rlhfx.config import ConfigError
from rlhfx.metrics import iteration_flops, sequence_train_flops, train_flops_per_token
from rlhfx.models import ModelConfig, Transformer, lora
from rlhfx.models.heads import ScoreModel
from rlhfx.models.load import abstract_params, frozen_structs
from rlhfx.models.transformer import init_cache
from rlhfx.optim import make_optimizer


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


def _state(params, optimizer, mesh, init=None):
  init = init or functools.partial(train_state.init_state, optimizer=optimizer)
  return train_state.create_state(init, params, mesh)


def _one_trained_tree(name: str, algorithm, model, config, runtime, batch, flops: float) -> list[Program]:
  """The step of an algorithm that trains one tree with nothing frozen beside it (SFT, reward model)."""
  params = lora.wrap(abstract_params(model, runtime), config.lora, 0)
  optimizer = make_optimizer(config.optim, config.train.num_steps, params, frozen=lora.frozen(config.lora))
  state, shardings = _state(params, optimizer, runtime.mesh)
  fn = algorithm.jit_train_step(config, model, optimizer, shardings)
  parts = {"parameters": state.params, "optimizer state": state.opt_state, "batch": batch}
  return [Program(name, fn, (state, batch), parts, flops)]


def sft(config, model_config: ModelConfig, runtime) -> list[Program]:
  from rlhfx.algorithms import sft as algorithm

  rows, length = config.train.global_batch_size, max(config.data.buckets)
  batch = batch_struct({k: ((rows, length), dtype) for k, dtype in (
      ("tokens_BxT", jnp.int32), ("mask_BxT", bool), ("loss_mask_BxT", bool))}, runtime.mesh)
  flops = rows * length * train_flops_per_token(model_config, length)
  return _one_trained_tree("sft_step", algorithm, Transformer(model_config), config, runtime, batch, flops)


def reward(config, model_config: ModelConfig, runtime) -> list[Program]:
  from rlhfx.algorithms import reward as algorithm

  rows, length = config.train.global_batch_size, max(config.data.buckets)
  batch = _pair_batch(rows, length, runtime.mesh, precomputed=False)
  flops = 2 * rows * sequence_train_flops(model_config, length, kept=1, lm_head=False)
  return _one_trained_tree("reward_step", algorithm, ScoreModel(model_config), config, runtime, batch, flops)


def dpo(config, model_config: ModelConfig, runtime) -> list[Program]:
  from rlhfx.algorithms import dpo as algorithm

  model = Transformer(model_config)
  kwargs = algorithm.step_kwargs(config, model)
  mode, window = kwargs["mode"], kwargs["window"]
  base = abstract_params(model, runtime)
  params = lora.wrap(base, config.lora, 0)
  reference = frozen_structs(base, model_config.jnp_dtype) if mode == "frozen" else None
  optimizer = make_optimizer(config.optim, config.train.num_steps, params, frozen=lora.frozen(config.lora))
  state, shardings = _state(params, optimizer, runtime.mesh)
  rows, length = config.train.global_batch_size, max(config.data.buckets)
  unpaired = getattr(kwargs["loss"], "unpaired", False)
  batch = _pair_batch(rows, length, runtime.mesh, precomputed=mode == "precomputed", unpaired=unpaired)
  per_row = sequence_train_flops(model_config, length, kept=window + 1 if window else None)
  sequences = rows if unpaired else 2 * rows
  forwards = 0 if mode in ("precomputed", "none") else 1  # the reference's forward pass: a third of fwd + bwd
  fn = algorithm.jit_train_step(config, model, optimizer, shardings, reference)
  parts = {"parameters": state.params, "optimizer state": state.opt_state, "batch": batch}
  if reference is not None:
    parts["frozen: reference"] = reference
  programs = [Program("dpo_step", fn, (state, batch, reference), parts, sequences * per_row * (1 + forwards / 3))]
  if mode == "precomputed":  # one pass over the data before training, with the initial policy
    ref_fn = algorithm.jit_reference_logps(model, kwargs["chunk_size"], window)
    ref_batch = _pair_batch(rows, length, runtime.mesh, precomputed=False, unpaired=unpaired)
    programs.append(Program("reference_logps", ref_fn, (base, ref_batch), {"parameters": base, "batch": ref_batch},
                            sequences * per_row / 3, trains=False))
  return programs


def onpolicy(config, model_config: ModelConfig, runtime) -> list[Program]:
  """PPO and GRPO: the fused iteration (in-graph scoring), or rollout, scoring and update as three programs
  (`train.time_phases`, or a host reward function)."""
  from rlhfx import reward_functions, rewards, rollout, sampling_layout
  from rlhfx.algorithms import grpo, ppo

  model = Transformer(model_config)
  policy = abstract_params(model, runtime)
  reference = frozen_structs(policy, model_config.jnp_dtype)
  sc = config.scoring
  reward_params = rm_config = None
  if sc.model:
    try:
      rm_config = rewards.reward_model_config(sc.model, model_config.attention)
    except ConfigError:  # planning before the reward run exists: a reward model of the policy's shape
      logging.warning("config.scoring.model=%r holds no reward model yet: planned with one of the policy's shape",
                      sc.model)
      rm_config = model_config
    scorer = rollout.Scorer(module=ScoreModel(rm_config), missing_eos_penalty=sc.missing_eos_penalty)
    reward_params = abstract_params(scorer.module, runtime)
  else:
    scorer = rollout.Scorer(missing_eos_penalty=sc.missing_eos_penalty)
  # reward functions: fraction:<chars> is planned as a per-token sum (no tokenizer), text functions run on the host
  scorer = dataclasses.replace(scorer, functions=reward_functions.load(sc.functions, sc.weights, tokenizer=None))
  # the model's own special tokens stand in for the tokenizer's: the planner loads no tokenizer
  token_ids = types.SimpleNamespace(eos_token_id=model_config.eos_token_id, pad_token_id=model_config.pad_token_id)
  sampling = rollout.SamplingSettings.from_config(config, model_config, token_ids)
  critic = None
  if config.algorithm == "ppo":
    if config.ppo.value_model == "separate":
      critic = scorer.module or ScoreModel(model_config)
      params = {"policy": policy, "value": abstract_params(critic, runtime)}
    else:
      head = jax.ShapeDtypeStruct((model_config.d_model, 1), jnp.float32,
                                  sharding=jax.sharding.NamedSharding(runtime.mesh, jax.sharding.PartitionSpec()))
      params = {"policy": policy, "value_head": {"kernel": head}}
    params = {k: v if k == "value_head" else lora.wrap(v, config.lora, 0) for k, v in params.items()}
    epochs, algorithm = config.ppo.epochs * config.ppo.minibatches, ppo
    optimizer = make_optimizer(config.optim, config.train.num_steps * epochs, params, frozen=lora.frozen(config.lora))
    s = ppo.Settings.from_config(config, model=model, critic=critic, scorer=scorer, sampling=sampling,
                                 optimizer=optimizer)
    init = functools.partial(ppo.init_state, optimizer=optimizer, kl_coef=config.ppo.kl_coef)
    epochs = config.ppo.epochs
  else:
    params = lora.wrap(policy, config.lora, 0)
    algorithm = grpo
    optimizer = make_optimizer(config.optim, config.train.num_steps * config.grpo.epochs * config.grpo.minibatches,
                               params, frozen=lora.frozen(config.lora))
    s = grpo.Settings.from_config(config, model=model, scorer=scorer, sampling=sampling, optimizer=optimizer)
    init = functools.partial(grpo.init_state, optimizer=optimizer)
    epochs = config.grpo.epochs
  state, shardings = _state(params, optimizer, runtime.mesh, init=init)
  if reward_params is not None:
    reward_params = frozen_structs(reward_params, scorer.module.config.jnp_dtype)
  frozen = {"reference": reference, "reward": reward_params}
  prompts, length = config.train.global_batch_size, max(config.data.buckets)
  batch = batch_struct({"prompt_BxP": ((prompts, length), jnp.int32), "prompt_mask_BxP": ((prompts, length), bool)},
                       runtime.mesh)
  layout = sampling_layout.make(config, model, runtime)
  programs = algorithm.jit_programs(s, shardings, layout)
  rows, completion = prompts * sampling.group_size, sampling.max_new_tokens
  kv_cache = jax.eval_shape(lambda: init_cache(model_config, rows, length + completion))
  flops = rows * (length + completion) * iteration_flops(model_config, length, completion, epochs, critic is not None)
  trained = state.params if config.algorithm == "grpo" else state.params["policy"]
  critic_params = {k: v for k, v in state.params.items() if k != "policy"} if config.algorithm == "ppo" else None
  parts = {"parameters: policy": trained, "parameters: critic": critic_params or None,
           "optimizer state": state.opt_state, "frozen: reference": reference, "batch": batch}
  if reward_params is not None:
    parts["frozen: reward model"] = reward_params
  decode = dict(decode_steps=completion - 1, generated_tokens=rows * completion)
  fused = scorer.in_graph and not config.train.time_phases
  if fused and layout is None:
    return [Program(f"{config.algorithm}_iteration", programs.iteration, (state, batch, frozen), parts, flops,
                    kv_cache, **decode)]
  rollout_abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(runtime.mesh, x.ndim)),
      jax.eval_shape(programs.rollout, state, batch))
  scores = jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=sharding.batch_sharding(runtime.mesh, 1))
  sample_flops = 2 * rows * (length + completion) * train_flops_per_token(model_config, length + completion) / 6
  if layout is None:
    programs_out = [Program("rollout", programs.rollout, (state, batch), {"parameters: policy": trained,
                                                                          "batch": batch},
                            sample_flops, kv_cache, trains=False, **decode)]
  else:
    programs_out = _sampling_programs(programs, layout, state, batch, trained, sample_flops, kv_cache,
                                      {"training state": state, **{f"frozen: {k}": v for k, v in frozen.items()}},
                                      decode)
  if fused:  # in-graph scoring and the update, after a rollout sampled in its own layout
    programs_out.append(Program(f"{config.algorithm}_update", programs.scored_update, (state, rollout_abstract, frozen),
                                {**parts, "rollout": rollout_abstract}, flops - sample_flops))
    return programs_out
  if reward_params is not None:
    programs_out.append(Program("scoring", programs.score, (rollout_abstract, reward_params),
                                {"frozen: reward model": reward_params, "rollout": rollout_abstract},
                                2 * rows * (length + completion) * train_flops_per_token(rm_config, length) / 6,
                                trains=False))
  programs_out.append(Program("update", programs.update, (state, rollout_abstract, scores, frozen),
                              {**parts, "rollout": rollout_abstract}, flops - sample_flops))
  return programs_out


def _sampling_programs(programs, layout, state, batch, trained, sample_flops, kv_cache, resident,
                       decode) -> list[Program]:
  """The reshard of the policy into the sampling layout, and sampling there (with the training state resident)."""
  sampled = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         jax.eval_shape(programs.reshard, state), layout.params)
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=jax.sharding.NamedSharding(layout.mesh,
                                                                                 jax.sharding.PartitionSpec()))
  prompts = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=layout.batch(v.shape)) for k, v in batch.items()}
  return [Program("reshard", programs.reshard, (state,), {"parameters: policy": trained, "sampled policy": sampled},
                  0.0, trains=False),
          Program("rollout", programs.sample, (sampled, prompts, step), {"sampled policy": sampled, "batch": prompts},
                  sample_flops, kv_cache, trains=False, mesh=layout.mesh, rules=layout.rules, resident=resident,
                  **decode)]


BUILDERS = {"sft": sft, "reward": reward, "dpo": dpo, "ppo": onpolicy, "grpo": onpolicy}


def build(config, model_config: ModelConfig, runtime) -> list[Program]:
  """The programs of `config.algorithm`, traced under the runtime's mesh and rules."""
  if config.algorithm not in BUILDERS:
    raise ConfigError(f"config.algorithm={config.algorithm!r}; expected one of {sorted(BUILDERS)}")
  with sharding.active(runtime.mesh, runtime.rules):
    return BUILDERS[config.algorithm](config, model_config, runtime)
