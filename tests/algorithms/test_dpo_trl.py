"""rlhfx's DPO objective against TRL 1.16's own `DPOTrainer.compute_loss` on the same weights and batch.

tests/goldens/trl_dpo/ is made by tests/make_trl_goldens.py (torch and TRL run only there): the GPT-2 of
tests/goldens/gpt2 as policy, a perturbed copy as reference, eight pairs of random token ids, and per loss
type TRL's loss and logged metrics. Here the same pairs go through `dpo.dpo_objective` with the loss that
`config.dpo` selects.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import GOLDENS
from rlhfx.algorithms import dpo
from rlhfx.config import base_config
from rlhfx.logprobs import completion_logps
from rlhfx.losses.common import concat_pairs
from rlhfx.models import Transformer
from rlhfx.models.convert import from_hf

EXPECTED = json.loads((GOLDENS / "trl_dpo" / "expected.json").read_text())
# TRL loss type -> rlhfx config.dpo fields; sigmoid with label smoothing: TRL 1.16 ignores label_smoothing for
# the sigmoid loss, so its number is plain DPO's (rlhfx: label_smoothing=0); rlhfx's own label_smoothing is cDPO
CASES = {
    "sigmoid": dict(loss="sigmoid"),
    "sigmoid_label_smoothing": dict(loss="sigmoid", label_smoothing=0.0),
    "hinge": dict(loss="hinge"),
    "ipo": dict(loss="ipo"),
    "robust": dict(loss="robust", label_smoothing=0.2),
    "exo_pair": dict(loss="exo_pair", label_smoothing=1e-3),
    "nca_pair": dict(loss="nca_pair"),
    "bco_pair": dict(loss="bco_pair"),
    "sppo_hard": dict(loss="sppo_hard"),
    "apo_zero": dict(loss="apo_zero"),
    "apo_down": dict(loss="apo_down"),
    "discopop": dict(loss="discopop", discopop_tau=0.05),
    "sigmoid_norm": dict(loss="sigmoid_norm"),
    "sigmoid_plus_sft": dict(loss="sigmoid", sft_weight=0.5),
}
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected")


def _side(pairs, side: str, length: int) -> dict[str, np.ndarray]:
  """prompt + completion rows, right-padded like TRL's DataCollatorForPreference."""
  tokens, mask, loss_mask = (np.zeros((len(pairs), length), np.int32) for _ in range(3))
  for b, pair in enumerate(pairs):
    prompt, completion = pair["prompt_ids"], pair[f"{side}_ids"]
    n = len(prompt) + len(completion)
    tokens[b, :n], mask[b, :n], loss_mask[b, len(prompt):n] = prompt + completion, 1, 1
  return {f"{side}_tokens_BxT": tokens, f"{side}_mask_BxT": mask.astype(bool),
          f"{side}_loss_mask_BxT": loss_mask.astype(bool)}


@pytest.fixture(scope="module")
def setup():
  config, params = from_hf(GOLDENS / "gpt2")
  _, reference = from_hf(GOLDENS / "trl_dpo" / "reference")
  pairs = EXPECTED["pairs"]
  length = max(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs)
  batch = {k: jnp.asarray(v) for side in ("chosen", "rejected") for k, v in _side(pairs, side, length).items()}
  return Transformer(config), params, reference, batch


def test_per_row_logps_equal_transformers(setup):
  model, params, reference, batch = setup
  for tree, key in ((params, "policy_logps"), (reference, "reference_logps")):
    logps_2B = completion_logps(model, tree, *concat_pairs(batch))[0]
    np.testing.assert_allclose(logps_2B, EXPECTED[key], rtol=0, atol=2e-5 * np.abs(EXPECTED[key]).max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_and_metrics_equal_trl(setup, case):
  model, params, reference, batch = setup
  want = EXPECTED["cases"][case]
  config = base_config("dpo")
  config.dpo.beta = want["config"]["beta"]
  config.dpo.update(CASES[case])
  s = dpo.Settings(model=model, loss=dpo.Settings.from_config(config, model).loss)  # the configured loss, frozen ref
  value, metrics = dpo.dpo_objective(params, batch, reference, s=s)
  np.testing.assert_allclose(value, want["loss"], rtol=1e-5, atol=1e-6)
  for name in METRICS:
    np.testing.assert_allclose(metrics[name], want["metrics"][name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_cdpo_differs_from_trl_sigmoid_with_label_smoothing(setup):
  """rlhfx turns label_smoothing into conservative DPO; TRL 1.16's sigmoid loss ignores it (README)."""
  model, params, reference, batch = setup
  config = base_config("dpo")
  config.dpo.update(beta=0.5, label_smoothing=0.2)
  s = dpo.Settings(model=model, loss=dpo.Settings.from_config(config, model).loss)
  value, _ = dpo.dpo_objective(params, batch, reference, s=s)
  assert abs(float(value) - EXPECTED["cases"]["sigmoid_label_smoothing"]["loss"]) > 1e-2


def test_every_trl_loss_type_in_the_goldens_is_checked():
  assert set(EXPECTED["cases"]) == set(CASES)
