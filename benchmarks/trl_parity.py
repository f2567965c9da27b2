"""How far rlhfx's DPO-family losses are from TRL's own numbers: the largest difference per loss, as JSON.

  python benchmarks/trl_parity.py

The cases, weights and batch are those of tests/algorithms/test_dpo_trl.py (the goldens TRL 1.16's
DPOTrainer.compute_loss made, tests/make_trl_goldens.py); the test asserts bounds, this prints the
measured differences: the loss, the largest over the logged metrics, and the per-row log-probs.
"""

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "algorithms")]

import numpy as np  # noqa: E402

import test_dpo_trl as t  # noqa: E402
from rlhfx.algorithms import dpo  # noqa: E402
from rlhfx.config import base_config  # noqa: E402
from rlhfx.logprobs import completion_logps  # noqa: E402
from rlhfx.losses.common import concat_pairs  # noqa: E402


def main():
  model, params, reference, batch = t.setup.__wrapped__()
  out = {"logps": {}, "losses": {}}
  for tree, key in ((params, "policy_logps"), (reference, "reference_logps")):
    logps_2B = np.asarray(completion_logps(model, tree, *concat_pairs(batch))[0])
    out["logps"][key] = float(np.abs(logps_2B - np.asarray(t.EXPECTED[key])).max())
  for case in sorted(t.CASES):
    want = t.EXPECTED["cases"][case]
    config = base_config("dpo")
    config.dpo.beta = want["config"]["beta"]
    config.dpo.update(t.CASES[case])
    s = dpo.Settings(model=model, loss=dpo.Settings.from_config(config, model).loss)
    value, metrics = dpo.dpo_objective(params, batch, reference, s=s)
    out["losses"][case] = {"loss": float(abs(value - want["loss"])), "trl_loss": want["loss"],
                           "metrics": max(float(abs(metrics[m] - want["metrics"][m])) for m in t.METRICS)}
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
