"""A sweep in one program: runs of a config that differ only in numbers, trained together as members.

  groups = members.group(config, entries)        # sweep() entries -> [[index, ...], ...] (one program each)
  members.check(configs)                         # ConfigError naming a field two members differ in
  program = members.init(configs, model_config, trees)   # stacked state, frozen trees once, the jitted step
  state_M, metrics_M = program.step(state_M, batch, *program.frozen_args, program.numbers, alive_M)

Each member's trained tree and optimizer state sit on a leading axis of every leaf (`Program.axes`: 0, or None
for a leaf every member shares, the LoRA base); its numbers (`NUMBERS`: the learning rate, the loss's numbers) are
arrays with one value per member. The batch and the frozen trees (the reference) have no member axis: one copy,
and computations of them alone (the reference's log-probs) run once for all members. The step is the
algorithm's own `train_step` with the member's numbers bound as traced values (`step_function(..., numbers)`),
under `jax.vmap`; the learning rate goes through the optimizer of `config.optim` at rate 1 scaled by the member's
(`rlhfx.optim.scaled`: AdamW's update is linear in it), so the schedule's shape is shared and its height is not.

Placement: the member axis is the logical axis "members" (`sharding.DEFAULT_RULES`: over the `data` mesh axis
when the member count divides by it). Then every data-parallel group trains its own members on the whole batch:
the program is traced with `data` taken out of the other rules (`spmd_axis_name`), so the batch is not split
over the groups a second time.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhfx import optim, sharding
from rlhfx.config import ConfigError, init_seed
from rlhfx.losses import preference
from rlhfx.models import ModelConfig, load, lora
from rlhfx.train_state import Initial

ALGORITHMS = ("sft", "reward", "dpo")  # those whose runs can be members (PPO/GRPO: each member would sample its own)
# The fields members of one program may differ in: traced per member in the step, or (init_seed) used at init.
NUMBERS = frozenset({"optim.learning_rate", "init_seed", "reward.center_coef",
                     *(f"dpo.{k}" for k in preference.config_fields())})
RL_NUMBERS = frozenset({"ppo.kl_coef", "grpo.beta"})  # numbers of the algorithms that cannot have members yet
DONE = "sweep_done.json"  # a finished member's record (launch/sweep.py's name for a finished run)


# ----------------------------------------------------------------------------- which runs can be members


def format_value(value) -> str:
  if isinstance(value, (tuple, list)):
    return ",".join(str(v) for v in value) + ("," if len(value) == 1 else "")
  return str(value)


def run_name(index: int, overrides: dict) -> str:
  """A sweep entry's run name: `NN-field=value-...` (the last component of each field)."""
  parts = [f"{key.split('.')[-1]}={format_value(value)}" for key, value in overrides.items()]
  return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", "-".join([f"{index:02d}", *parts]))


def group(algorithm: str, entries: list[dict]) -> list[list[int]]:
  """The sweep's entries (override dicts) split into programs: entries that set the same values of every field
  outside `NUMBERS` share one. ConfigError, naming the field, when no two entries can: the algorithm has no
  members, or every entry differs from every other in a field that changes shapes or code."""
  if algorithm not in ALGORITHMS:
    numbers = sorted({k for e in entries for k in e} & RL_NUMBERS)
    raise ConfigError(f"config.algorithm={algorithm!r}: members of one program are {', '.join(ALGORITHMS)} runs "
                      f"(a PPO/GRPO member would sample its own completions: not yet)"
                      + (f"; {', '.join(numbers)} must be swept as separate runs" if numbers else "")
                      + ": run the sweep without --together")
  keys: dict[tuple, list[int]] = {}
  for i, entry in enumerate(entries):
    shared = tuple(sorted((k, repr(v)) for k, v in entry.items() if k not in NUMBERS))
    keys.setdefault(shared, []).append(i)
  groups = list(keys.values())
  if len(entries) > 1 and all(len(g) == 1 for g in groups):
    fields = sorted({k for e in entries for k in e if k not in NUMBERS})
    raise ConfigError(f"no two runs of this sweep can be members of one program: they differ in "
                      f"{', '.join(fields)}, which changes shapes or code (members differ only in "
                      f"{', '.join(sorted(NUMBERS))}): run the sweep without --together")
  return groups


def sweep_file(config_file, entries: list[dict]) -> str:
  """The text of a config file that is `config_file`'s (its get_config) with `sweep()` returning `entries` (a
  sweep of one's own over an existing config: benchmarks/members.py, the tests)."""
  return (f"import importlib.util\n\n_spec = importlib.util.spec_from_file_location('_base', {str(config_file)!r})\n"
          f"_module = importlib.util.module_from_spec(_spec)\n_spec.loader.exec_module(_module)\n"
          f"get_config = _module.get_config\n\n\ndef sweep():\n  return {entries!r}\n")


def shared_overrides(entries: list[dict]) -> dict:
  """The overrides outside `NUMBERS` that a group's entries share (how the command names a group)."""
  return {k: v for k, v in entries[0].items() if k not in NUMBERS}


def apply(config, overrides: dict):
  """A copy of `config` with `overrides` ({"dotted.field": value}) set, as `--config.dotted.field=value` would."""
  out = config.copy_and_resolve_references()
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = out
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise ConfigError(f"sweep field {key!r} is not a field of the config")
    node[leaf] = tuple(value) if isinstance(value, list) else value
  return out


def _flat(tree, prefix: str = "") -> dict:
  if isinstance(tree, dict):
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
  return {prefix[:-1]: tree}


def check(configs: dict[str, Any]) -> None:
  """Members of one program share everything but their numbers: ConfigError naming the first field two differ in,
  an algorithm without members, or init seeds that would change a tree the members share."""
  names = list(configs)
  first = _flat(configs[names[0]].to_dict())
  for name in names[1:]:
    other = _flat(configs[name].to_dict())
    for key in sorted(set(first) | set(other)):
      if key not in NUMBERS and first.get(key) != other.get(key):
        raise ConfigError(f"members {names[0]} and {name} differ in {key} ({first.get(key)!r} vs "
                          f"{other.get(key)!r}): members of one program share everything but their numbers "
                          f"({', '.join(sorted(NUMBERS))})")
  config = configs[names[0]]
  if config.algorithm not in ALGORITHMS:
    group(config.algorithm, [{}])  # the error
  seeds = {init_seed(c) for c in configs.values()}
  shares_base = config.lora.rank or (config.algorithm == "dpo" and config.dpo.reference in ("frozen", "precomputed"))
  if len(seeds) > 1 and not config.model.init_from and shares_base:
    raise ConfigError(f"members differ in init_seed ({sorted(seeds)}) but model.init_from is empty: the random "
                      f"model they would start from (the LoRA base / the reference) would differ per member, and "
                      f"members share it; set model.init_from, or sweep init_seed as separate runs")


def numbers(configs: dict[str, Any]) -> dict[str, np.ndarray]:
  """{field: [M] float32} of the traced numbers: the learning rate always, the others where members differ."""
  flat = [_flat(c.to_dict()) for c in configs.values()]
  varying = {k for k in NUMBERS - {"init_seed"} if len({repr(f.get(k)) for f in flat}) > 1}
  return {k: np.asarray([f[k] for f in flat], np.float32) for k in sorted(varying | {"optim.learning_rate"})}


# ----------------------------------------------------------------------------- the stacked state


def state_axes(state) -> Any:
  """0 for every leaf of a member's state that gets the member axis, None for the LoRA base (shared)."""
  def axis(path, _):
    keys = [getattr(k, "name", getattr(k, "key", None)) for k in path]
    return None if keys[:2] == ["params", "base"] else 0
  return jax.tree_util.tree_map_with_path(axis, state)


def is_axis(x) -> bool:
  return x is None or isinstance(x, int)


def members_axis(mesh, rules, count: int):
  """The mesh axis (or axes) the member axis lies on: the "members" rule's, those that divide `count`; None when
  they are all of size 1 (every device holds every member either way)."""
  axis = sharding._spec_for(("members",), (count,), mesh, rules)[0]
  names = (axis,) if isinstance(axis, str) else tuple(axis or ())
  return axis if int(np.prod([mesh.shape[a] for a in names])) > 1 else None


def rules_without(rules, axis) -> tuple:
  """`rules` with `axis` (a mesh axis name or tuple) taken out of every other logical axis's mesh axes."""
  drop = {axis} if isinstance(axis, str) else set(axis or ())
  out = []
  for logical, mesh_axes in rules:
    if logical != "members" and mesh_axes is not None:
      kept = tuple(a for a in ((mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes) if a not in drop)
      mesh_axes = kept[0] if len(kept) == 1 else (kept or None)
    out.append((logical, mesh_axes))
  return tuple(out)


def stacked_shardings(axes, shardings, mesh, axis):
  """A member's state shardings with the member axis in front (over `axis` unless the leaf already uses it)."""
  used = {axis} if isinstance(axis, str) else set(axis or ())

  def one(a, sh):
    if a is None:
      return sh
    spec = tuple(sh.spec)
    flat = {x for s in spec for x in ((s,) if isinstance(s, str) else (s or ()))}
    return NamedSharding(mesh, P(axis if not (used & flat) else None, *spec))
  return jax.tree.map(one, axes, shardings, is_leaf=is_axis)


def stack(states: list, axes, shardings):
  """Members' states -> one state with the member axis (ShapeDtypeStructs stay abstract)."""
  def one(a, sh, *xs):
    if a is None:
      return xs[0]
    if isinstance(xs[0], jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct((len(xs), *xs[0].shape), xs[0].dtype, sharding=sh)
    return jax.device_put(jnp.stack(xs), sh)
  return jax.tree.map(one, axes, shardings, *states, is_leaf=is_axis)


def taker(axes, shardings) -> Callable:
  """The jitted (tree_M, i) -> member i's tree, placed with `shardings` (a separate run's): compiled once, the
  index traced."""
  def take(tree_M, i):
    return jax.tree.map(lambda a, x: x if a is None else jax.lax.dynamic_index_in_dim(x, i, keepdims=False), axes,
                        tree_M, is_leaf=is_axis)
  return jax.jit(take, out_shardings=shardings)


# ----------------------------------------------------------------------------- the program


@dataclasses.dataclass
class Program:
  """What `init` makes for members (arrays, or ShapeDtypeStructs for the planner)."""

  names: list[str]
  initial: list[Initial]  # each member's own init (its state: the template a member's checkpoint restores onto)
  state: Any  # the stacked state
  axes: Any  # 0 / None per leaf of a member's state
  shardings: Any  # the stacked state's
  frozen: dict[str, Any]  # the frozen trees, once
  numbers: dict[str, Any]  # field -> [M] values (arrays placed like the member axis)
  step: Callable  # jitted (state_M, batch, *frozen_args, numbers, alive_M) -> (state_M, metrics with [M] leaves)
  eval_step: Callable  # jitted (params_M, batch, frozen_args, numbers) -> outputs with [M, ...] leaves
  axis: Any  # the mesh axis the members lie on (None: every device holds every member)
  mesh: Any
  rules: tuple  # the rules the program is traced under
  settings: Any = None
  flops_per_token: float = 0.0  # one member's

  def __post_init__(self):
    self._take_state = taker(self.axes, self.initial[0].shardings)
    self._take_params = taker(self.axes.params, self.initial[0].shardings.params)

  @property
  def frozen_args(self) -> tuple:
    return tuple(self.frozen.values())

  def evaluate(self, params_M, batch):
    """Every member's `eval_step` outputs of one batch ([M, ...] leaves)."""
    return self.eval_step(params_M, batch, self.frozen_args, self.numbers)

  def member_state(self, state_M, i: int):
    """Member i's state with a separate run's shardings (every member's are the same)."""
    return self._take_state(state_M, i)

  def member_params(self, params_M, i: int):
    return self._take_params(params_M, i)


class _SharedTrees(load.Trees):
  """Trees for member i > 0: its own seed, member 0's frozen trees (never made twice)."""

  def __init__(self, trees: load.Trees, seed: int, cache: dict):
    super().__init__(trees.runtime, trees.abstract, seed, trees.pretrained)
    self._cache = cache

  def frozen(self, tree, compute_dtype):
    if "frozen" not in self._cache:
      self._cache["frozen"] = super().frozen(tree, compute_dtype)
    return self._cache["frozen"]


def algorithm_module(name: str):
  return importlib.import_module(f"rlhfx.algorithms.{name}")


def eval_function(config, model_config: ModelConfig, numbers=None, loss=None) -> Callable:
  """The algorithm's `eval_step` with everything but (params, batch, *frozen) bound (DPO: the loss's numbers)."""
  module = algorithm_module(config.algorithm)
  if config.algorithm == "dpo":
    s = module.Settings.from_config(config, module.Transformer(model_config), loss, numbers)
    return lambda params, batch, reference: module.eval_step(params, batch, reference, s=s)
  model = (module.ScoreModel if config.algorithm == "reward" else module.Transformer)(model_config)
  extra = {} if config.algorithm == "reward" else {"chunk_size": config.model.lm_head_chunk or None}
  return lambda params, batch: module.eval_step(params, batch, model=model, lora_scale=lora.scale(config.lora),
                                                **extra)


def init(configs: dict[str, Any], model_config: ModelConfig, trees: load.Trees, *, loss=None) -> Program:
  """Each member's state (its own init: seeds of what it initialises), stacked; the frozen trees of member 0
  (every member's are the same: `check`); the vmapped, jitted step and evaluation."""
  check(configs)
  names, config = list(configs), next(iter(configs.values()))
  module = algorithm_module(config.algorithm)
  kwargs = {"loss": loss} if loss is not None and config.algorithm == "dpo" else {}
  cache: dict = {}
  initial: list[Initial] = []
  for c in configs.values():  # one member at a time: a member's copy of a shared leaf is dropped at once
    run = module.init(c, model_config, _SharedTrees(trees, init_seed(c), cache), **kwargs)
    if initial:
      run.state = jax.tree.map(lambda a, x, first: first if a is None else x, state_axes(run.state), run.state,
                               initial[0].state, is_leaf=is_axis)
    initial.append(run)
  mesh, count = trees.runtime.mesh, len(names)
  axis = members_axis(mesh, trees.runtime.rules, count)
  rules = rules_without(trees.runtime.rules, axis) if axis else trees.runtime.rules
  axes = state_axes(initial[0].state)
  shardings = stacked_shardings(axes, initial[0].shardings, mesh, axis)
  state = stack([i.state for i in initial], axes, shardings)
  values = numbers(configs)
  number_sharding = NamedSharding(mesh, P(axis))
  if trees.abstract:
    member_numbers = {k: jax.ShapeDtypeStruct(v.shape, jnp.float32, sharding=number_sharding)
                      for k, v in values.items()}
  else:
    member_numbers = {k: jax.device_put(v, number_sharding) for k, v in values.items()}
  unit = optim.make_optimizer(optim.unit_learning_rate(config.optim), config.train.num_steps,
                              initial[0].state.params, frozen=lora.frozen(config.lora))
  unit_schedule = optim.learning_rate_schedule(optim.unit_learning_rate(config.optim), config.train.num_steps)

  def one(state, batch, frozen, numbers, alive):
    lr = numbers["optim.learning_rate"]
    fn = module.step_function(config, model_config, optim.scaled(unit, lr), lambda t: lr * unit_schedule(t),
                              numbers, **kwargs)
    new, step_metrics = fn(state, batch, *frozen)
    # a shared leaf keeps its value (frozen: its update is 0); a stopped member (alive False) keeps its state
    new = jax.tree.map(lambda a, n, o: o if a is None else jnp.where(alive, n, o), axes, new, state,
                       is_leaf=is_axis)
    return new, step_metrics

  def step(state_M, batch, *frozen_and_rest):
    *frozen, numbers_M, alive_M = frozen_and_rest
    with nn.logical_axis_rules(rules):  # traced under the program's rules, whatever the caller's
      return jax.vmap(one, in_axes=(axes, None, None, 0, 0), out_axes=(axes, 0), spmd_axis_name=axis)(
          state_M, batch, tuple(frozen), numbers_M, alive_M)

  frozen = initial[0].frozen
  frozen_shardings = tuple(None if t is None else jax.tree.map(lambda x: x.sharding, t) for t in frozen.values())
  number_shardings = {k: number_sharding for k in values}
  jitted = jax.jit(step, in_shardings=(shardings, None, *frozen_shardings, number_shardings, number_sharding),
                   out_shardings=(shardings, None), donate_argnums=0)

  def evaluate(params, batch, frozen, numbers):
    return eval_function(config, model_config, numbers, loss)(params, batch, *frozen)

  def evaluate_all(params_M, batch, frozen, numbers_M):
    with nn.logical_axis_rules(rules):
      return jax.vmap(evaluate, in_axes=(axes.params, None, None, 0), spmd_axis_name=axis)(params_M, batch, frozen,
                                                                                         numbers_M)

  eval_jitted = jax.jit(evaluate_all)
  return Program(names=names, initial=initial, state=state, axes=axes, shardings=shardings, frozen=frozen,
                 numbers=member_numbers, step=jitted, eval_step=eval_jitted, axis=axis, mesh=mesh, rules=rules,
                 settings=initial[0].settings, flops_per_token=initial[0].flops_per_token)


def placement(program: Program, state_M, index: int) -> dict:
  """What a member's placement.json says: the member axis, the stacked state and the frozen trees (once)."""
  return {"members": {"count": len(program.names), "index": index, "names": program.names,
                      "mesh_axis": program.axis},
          "state": sharding.describe(state_M),
          **{name: sharding.describe(tree) for name, tree in program.frozen.items() if tree is not None}}
