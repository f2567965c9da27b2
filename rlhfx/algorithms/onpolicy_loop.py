"""The train loop PPO and GRPO share: policy, reference, scorer and critic set-up, the jitted iteration,
held-out evaluation (mean score and KL), sample logging, export.

An algorithm module provides a pure `update_step(state, rollout, scores_B, frozen, s) ->
(state, metrics)`, `init_params` and a `Settings.from_config`. With an in-graph scorer
each iteration is one jitted `rlhfx.onpolicy.iteration`; with a host reward
function (or `train.time_phases`) it runs as rollout, scoring and update programs, each
timed (`time/rollout_s`, `time/scoring_s`, `time/update_s`).
"""

from __future__ import annotations

import functools
import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhfx import loop, onpolicy, rewards, sharding
from rlhfx.config import ConfigError
from rlhfx.metrics import train_flops_per_token
from rlhfx.models import Transformer
from rlhfx.models.heads import ScoreModel, from_lm_params
from rlhfx.optim import make_optimizer


def make_scorer(config, tokenizer, runtime, model_config):
  """(Scorer, reward params or None) from config.scoring."""
  sc = config.scoring
  common = dict(missing_eos_penalty=sc.missing_eos_penalty)
  if bool(sc.model) == bool(sc.function):
    raise ConfigError("set exactly one of config.scoring.model (a reward run) and config.scoring.function")
  if sc.function:
    fn = rewards.load_reward_function(sc.function, tokenizer)
    if rewards.is_traceable(fn):
      return onpolicy.Scorer(fn=fn, **common), None
    return onpolicy.Scorer(host_fn=fn, **common), None
  rm_config = rewards.reward_model_config(sc.model)
  if rm_config.vocab_size < len(tokenizer):
    raise ConfigError(f"config.scoring.model: the reward model's vocab_size {rm_config.vocab_size} is smaller than "
                      f"the policy tokenizer ({len(tokenizer)} tokens); both must share a tokenizer")
  module = ScoreModel(rm_config)
  rm = rewards.load_reward_model(sc.model, loop.abstract_params(module, runtime))
  mean, std = (rm.mean, rm.std) if sc.normalize else (0.0, 1.0)
  return onpolicy.Scorer(module=module, mean=mean, std=max(std, 1e-6), **common), rm.params


def copy_tree(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def init_critic(policy, runtime, setup, scorer: onpolicy.Scorer, reward_params):
  """(critic params, ScoreModel): a copy of the reward model, or else the policy's backbone with a zero head."""
  if scorer.module is not None:
    return copy_tree(reward_params), scorer.module
  critic = ScoreModel(setup.model_config)
  replicated = jax.sharding.NamedSharding(runtime.mesh, jax.sharding.PartitionSpec())
  head = {"kernel": jax.device_put(jnp.zeros((setup.model_config.d_model, 1), setup.model_config.jnp_param_dtype),
                                   replicated)}
  return from_lm_params(copy_tree(policy), head), critic


def _global(x: np.ndarray, mesh) -> jax.Array:
  s = sharding.batch_sharding(mesh, x.ndim)
  return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])


def _gather(tree):
  """Whole arrays on every host (process_allgather across processes)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def host_scores(scorer, tokenizer, r: onpolicy.Rollout, mesh) -> jax.Array:
  r = _gather(r)
  scores_B = rewards.host_scores(scorer.host_fn, tokenizer, r.prompt_BxP, r.prompt_mask_BxP, r.tokens_BxC,
                                 r.mask_BxC)
  return _global(scores_B, mesh)


def decode_samples(tokenizer, r: onpolicy.Rollout, scores_B, n: int = 4) -> list[dict]:
  r, scores_B = _gather((r, scores_B))
  out = []
  for i in range(min(n, len(scores_B))):
    prompt = tokenizer.decode(r.prompt_BxP[i][r.prompt_mask_BxP[i]], skip_special_tokens=True)
    completion = tokenizer.decode(r.tokens_BxC[i][r.mask_BxC[i]], skip_special_tokens=True)
    out.append({"prompt": prompt, "completion": completion, "score": float(scores_B[i])})
  return out


def log_samples(workdir, step: int, samples: list[dict]) -> None:
  if jax.process_index() != 0:
    return
  with open(workdir / "samples.jsonl", "a") as f:
    for s in samples:
      f.write(json.dumps({"step": step, **s}) + "\n")
  print(f"samples at iteration {step}:", flush=True)
  for s in samples[:2]:
    print(f"  [{s['score']:+.3f}] {s['prompt']!r} -> {s['completion']!r}", flush=True)


def iteration_flops(model_config, prompt_len: int, completion_len: int, epochs: int, critic: bool) -> float:
  """Matmul FLOPs per sequence token of one iteration: sampling, old/ref (+ value) forwards and `epochs` passes of
  forward + backward (+ the critic's); the LM head runs only at completion positions."""
  seq_len = prompt_len + completion_len
  body = train_flops_per_token(model_config, seq_len, lm_head=False)  # forward + backward, per token
  head = 6 * model_config.vocab_size * model_config.d_model
  per_sequence = seq_len * body * ((3 + critic) / 3 + epochs * (1 + critic)) + completion_len * head * (1 + epochs)
  return per_sequence / seq_len


def jit_programs(s, update_step, shardings):
  """(fused iteration, rollout, scoring, update): the jitted programs a run executes, state donated (`rlhfx.plan`
  compiles these same functions). The fused one runs when scoring is in-graph and phases are not timed."""
  fused = jax.jit(functools.partial(onpolicy.iteration, s=s, update_step=update_step),
                  in_shardings=(shardings, None, None), out_shardings=(shardings, None, None, None), donate_argnums=0)
  rollout_jit = jax.jit(functools.partial(onpolicy.rollout_step, s=s))
  score_jit = jax.jit(functools.partial(onpolicy.scores, scorer=s.scorer))
  update_jit = jax.jit(functools.partial(update_step, s=s), in_shardings=(shardings, None, None, None),
                       out_shardings=(shardings, None), donate_argnums=0)
  return fused, rollout_jit, score_jit, update_jit


def train(config, workdir: str, *, algorithm: str, init_params, settings, update_step, epochs: int, minibatches: int,
          kl_coef: float) -> dict[str, float]:
  setup = loop.setup(config, workdir, kind="prompts")
  runtime, model_config, data = setup.runtime, setup.model_config, setup.data
  workdir = runtime.workdir
  if model_config.positions == "learned" and (config.data.max_prompt_length + config.rollout.max_new_tokens
                                              > model_config.max_seq_len):
    raise ConfigError(f"config.data.max_prompt_length + config.rollout.max_new_tokens exceeds the model's context "
                      f"max_seq_len={model_config.max_seq_len}")
  model = Transformer(model_config)
  policy = loop.init_params(model_config, runtime, jax.random.key(config.seed), setup.loaded_params)
  reference = loop.frozen_copy(policy, model_config.jnp_dtype)
  scorer, reward_params = make_scorer(config, data.tokenizer, runtime, model_config)
  params, critic = init_params(policy, runtime, setup, scorer, reward_params, config)
  optimizer = make_optimizer(config.optim, config.train.num_steps * epochs * minibatches, params,
                             frozen=tuple(config.optim.freeze))
  sampling = onpolicy.SamplingSettings.from_config(config, model_config, data.tokenizer)
  s = settings(config, model=model, critic=critic, scorer=scorer, sampling=sampling, optimizer=optimizer).check()
  if reward_params is not None:  # the critic took its own copy; the frozen scorer is kept in its compute dtype
    reward_params = loop.frozen_copy(reward_params, scorer.module.config.jnp_dtype)
  frozen = {"reference": reference, "reward": reward_params}
  rows = config.train.global_batch_size * sampling.group_size
  if rows % (minibatches * config.train.grad_accum_steps):
    raise ConfigError(f"{rows} rollout rows (global_batch_size x rollout.group_size) do not split into "
                      f"config.{algorithm}.minibatches x config.train.grad_accum_steps micro-batches")

  state, shardings = loop.create_state(params, optimizer, runtime, init=functools.partial(
      onpolicy.init_state, optimizer=optimizer, kl_coef=kl_coef))
  train_iter = iter(loop.batches(config, data, data.train, "prompts", seed=config.seed))
  checkpointer, state, start = loop.resume(config, workdir, state, train_iter, frozen=frozen)

  with sharding.active(runtime.mesh, runtime.rules):
    fused, rollout_jit, score_jit, update_jit = jit_programs(s, update_step, shardings)
  split = config.train.time_phases or not scorer.in_graph
  done = [start]

  def flush():
    while samples_due:
      n, old_r, old_scores = samples_due.pop()
      log_samples(workdir, n, decode_samples(data.tokenizer, old_r, old_scores))

  samples_due = []  # (iteration, rollout, scores_B): decoded during the next iteration, not in the way of this one

  def step_fn(state, batch):
    done[0] += 1
    if not split:
      state, metrics, r, scores_B = fused(state, batch, frozen)
    else:
      t0 = time.perf_counter()
      r = jax.block_until_ready(rollout_jit(state, batch))
      t1 = time.perf_counter()
      if scorer.in_graph:
        scores_B = jax.block_until_ready(score_jit(r, reward_params))
      else:
        scores_B = host_scores(scorer, data.tokenizer, r, runtime.mesh)
      t2 = time.perf_counter()
      state, metrics = jax.block_until_ready(update_jit(state, r, scores_B, frozen))
      metrics = {**metrics, "time/rollout_s": t1 - t0, "time/scoring_s": t2 - t1,
                 "time/update_s": time.perf_counter() - t2}
    flush()
    every = config.train.log_samples_every
    if every and done[0] % every == 0:
      samples_due.append((done[0], r, scores_B))
    return state, metrics

  eval_sampling = onpolicy.SamplingSettings.from_config(config, model_config, data.tokenizer, group_size=1)

  def eval_rollout(policy_params, batch, reference_params, rng):
    r = onpolicy.rollout(policy_params, batch, rng, eval_sampling)
    logps = onpolicy.completion_stats(model, policy_params, r, temperature=eval_sampling.temperature)[0]
    ref = onpolicy.completion_stats(model, reference_params, r, temperature=eval_sampling.temperature)[0]
    return r, onpolicy.sequence_kl(logps, ref, r.mask_BxC)

  with sharding.active(runtime.mesh, runtime.rules):
    eval_jit = jax.jit(eval_rollout)

  def run_eval(state, step_number):
    """Mean score and KL(policy || reference) of one sample per held-out prompt (fixed sampling seeds)."""
    if data.eval is None:
      return {}
    scores, kls, lengths = [], [], []
    with sharding.active(runtime.mesh, runtime.rules):
      for i, local in enumerate(loop.full_batches(config, data, data.eval, "prompts",
                                                  limit=config.train.eval_batches)):
        valid = local.pop("valid_B")
        rng = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), i)
        r, kl_B = eval_jit(state.params["policy"], sharding.global_batch(local, runtime.mesh), reference, rng)
        raw_B = (score_jit(r, reward_params) if scorer.in_graph else host_scores(scorer, data.tokenizer, r,
                                                                                runtime.mesh))
        scores_B = onpolicy.finish_scores(raw_B, r, eval_sampling.eos_id, scorer.missing_eos_penalty)[0]
        host = _gather((scores_B, kl_B, r.mask_BxC.sum(-1)))
        scores.append(host[0][valid]), kls.append(host[1][valid]), lengths.append(host[2][valid])
    scores, kls = np.concatenate(scores), np.concatenate(kls)
    return {"eval/scores": float(scores.mean()), "eval/scores_sem": float(scores.std() / max(len(scores), 1) ** .5),
            "eval/kl": float(kls.mean()), "eval/completion_length": float(np.concatenate(lengths).mean()),
            "eval/prompts": len(scores)}

  outcome = loop.train_and_evaluate(
      config=config, runtime=runtime, state=state, start=start, step_fn=step_fn, train_iter=train_iter,
      checkpointer=checkpointer,
      tokens_per_step=lambda b: b["prompt_BxP"].size * sampling.group_size
      + b["prompt_BxP"].shape[0] * sampling.group_size * sampling.max_new_tokens,
      flops_per_token=iteration_flops(model_config, max(config.data.buckets), sampling.max_new_tokens, epochs,
                                      critic is not None),
      evaluate=run_eval)
  result, before, after, final = outcome.result, outcome.before, outcome.after, outcome.final
  flush()
  if result.stopped_early:
    return final
  if jax.process_index() == 0:
    if config.train.export_hf:
      from rlhfx.models.convert import to_hf

      data.tokenizer.save_pretrained(to_hf(model_config, jax.device_get(result.state.params["policy"]),
                                           workdir / "hf"))
    lines = ["", "== summary ==", f"{algorithm.upper()} for {config.train.num_steps} iterations"]
    if before and after:
      lines.append(f"held-out mean score {before['eval/scores']:.3f} -> {after['eval/scores']:.3f}; "
                   f"KL(policy || reference) {before['eval/kl']:.3f} -> {after['eval/kl']:.3f} nats "
                   f"({after['eval/prompts']} prompts)")
    lines.append(f"metrics: {workdir / 'metrics.jsonl'}; samples: {workdir / 'samples.jsonl'}; "
                 f"checkpoints: {workdir / 'checkpoints'}")
    print("\n".join(lines), flush=True)
  logging.info("final metrics: %s", final)
  return final
