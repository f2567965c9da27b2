"""FLOP counts used for achieved GFLOP/s and MFU, against XLA's own count of the compiled program."""

import jax
import jax.numpy as jnp
import pytest

from rlhfx.flops import sequence_train_flops
from rlhfx.models import Transformer, get_preset, init_params


@pytest.mark.parametrize("kept", [None, 1, 33])
def test_sequence_train_flops_matches_xla_cost_analysis(kept):
  """Forward + backward of 2 rows of 128 tokens, all positions or only `kept` through the last layer's
  queries and MLP: our formula is within 10% of the FLOPs XLA counts (which include elementwise work)."""
  config = get_preset("tiny", d_model=256, n_layers=2, vocab_size=512)
  params = init_params(config, jax.random.key(0))
  tokens_BxT = jnp.ones((2, 128), jnp.int32)
  select_BxQ = None if kept is None else jnp.tile(jnp.arange(kept)[None], (2, 1))

  def forward(p, select):
    return Transformer(config).apply({"params": p}, tokens_BxT, select_BxQ=select).sum()

  cost = jax.jit(jax.grad(forward)).lower(params, select_BxQ).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  xla_per_row = cost["flops"] / 2
  assert abs(sequence_train_flops(config, 128, kept=kept) / xla_per_row - 1) < 0.1


def _wandb_log(workdir):
  """The bytes of a W&B offline run's log (its records are protobufs, whose strings are stored as they are)."""
  [log] = list((workdir / "wandb").glob("offline-run-*/run-*.wandb"))
  return log.read_bytes()


def test_wandb_offline_run_named_by_the_workdir_with_metrics_samples_and_config(tmp_path, monkeypatch, capsys):
  from rlhfx import metrics
  from rlhfx.config import base_config

  monkeypatch.setenv("WANDB_SILENT", "true")
  config = base_config("dpo")
  config.logging.wandb.update(project="rlhfx-tests", mode="offline")
  workdir = tmp_path / "dpo_beta0.3"
  writer = metrics.MetricsWriter(workdir, total_steps=4, run_config=config)
  writer.write(1, {"train/loss": 0.6931, "rewards/accuracies": 0.25})
  writer.write_text(1, "samples", "prompt <b> -> completion")
  writer.progress(1, {"train/loss": 0.6931, "rewards/accuracies": 0.25, "rewards/margins": 0.125}, "train/loss",
                  None)
  writer.close()
  run_id = (workdir / "wandb_run_id").read_text()
  log = _wandb_log(workdir)
  assert b"rlhfx-tests" in log and b"dpo_beta0.3" in log and b"train/loss" in log and b"0.6931" in log
  assert b"sigmoid" in log  # the whole config (dpo.loss) is attached
  assert list((workdir / "wandb").glob(f"offline-run-*-{run_id}/files/media/html/samples_1_*.html"))
  assert "step 1/4 | train/loss 0.6931 | acc 0.250 | margin 0.125" in capsys.readouterr().out
  # a resumed run continues the same W&B run id
  metrics.MetricsWriter(workdir, total_steps=4, run_config=config).close()
  assert (workdir / "wandb_run_id").read_text() == run_id
  assert len(list((workdir / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1


def test_no_wandb_without_a_project(tmp_path):
  from rlhfx import metrics
  from rlhfx.config import base_config

  metrics.MetricsWriter(tmp_path, total_steps=1, run_config=base_config("sft")).close()
  assert not (tmp_path / "wandb").exists() and not (tmp_path / "wandb_run_id").exists()
