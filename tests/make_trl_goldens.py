"""Regenerate tests/goldens/trl_dpo/: TRL's own DPO losses and metrics on shared weights.

torch and TRL are never dependencies of rlhfx or its tests; this script is the only place
they run. In a separate virtualenv:

  python3 -m venv /tmp/venv-trl
  /tmp/venv-trl/bin/pip install torch==2.13.0
  /tmp/venv-trl/bin/pip install torch==2.13.0 trl==1.16.0 'transformers>=5' datasets accelerate safetensors
  /tmp/venv-trl/bin/python tests/make_trl_goldens.py

The policy is the random GPT-2 of tests/goldens/gpt2; the reference is a perturbed copy
(saved here as reference/). Eight pairs of random token ids with prompts and completions of
different lengths go through TRL's own `DataCollatorForPreference` (right padding) and
`DPOTrainer.compute_loss` once per loss type, in float32 (`bf16=False`: DPOConfig defaults
to bf16, and accelerate then runs both models under bf16 autocast). expected.json holds the
pairs, each case's DPOConfig fields, TRL's loss and the metrics TRL logged for it, and the
per-row completion log-probs of policy and reference from transformers' logits.
"""

import json
import os
import pathlib
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference  # noqa: E402

GOLDENS = pathlib.Path(__file__).parent / "goldens"
OUT = GOLDENS / "trl_dpo"
PAD = 0
# (case name, DPOConfig fields): every loss type TRL 1.16 has that is one row-separable formula
CASES = [
    ("sigmoid", dict(loss_type=["sigmoid"], beta=0.5)),
    ("sigmoid_label_smoothing", dict(loss_type=["sigmoid"], beta=0.5, label_smoothing=0.2)),  # TRL ignores it
    ("hinge", dict(loss_type=["hinge"], beta=0.5)),
    ("ipo", dict(loss_type=["ipo"], beta=0.5)),
    ("robust", dict(loss_type=["robust"], beta=0.5, label_smoothing=0.2)),
    ("exo_pair", dict(loss_type=["exo_pair"], beta=0.5, label_smoothing=1e-3)),
    ("nca_pair", dict(loss_type=["nca_pair"], beta=0.5)),
    ("bco_pair", dict(loss_type=["bco_pair"], beta=0.5)),
    ("sppo_hard", dict(loss_type=["sppo_hard"], beta=0.5)),
    ("apo_zero", dict(loss_type=["apo_zero"], beta=0.5)),
    ("apo_down", dict(loss_type=["apo_down"], beta=0.5)),
    ("discopop", dict(loss_type=["discopop"], beta=0.5, discopop_tau=0.05)),
    ("sigmoid_norm", dict(loss_type=["sigmoid_norm"], beta=0.5)),
    ("sigmoid_plus_sft", dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=0.5)),
]


def tokenizer(vocab_size: int):
  """A word-level tokenizer in memory (TRL wants one; the pairs are already token ids)."""
  vocab = {"<pad>": PAD, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                              unk_token="<unk>")


def completion_logps(model, batch) -> list[float]:
  """Sum of log p over each row's completion tokens, from transformers' logits."""
  with torch.no_grad():
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
  logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
  return (logps * batch["completion_mask"][:, 1:]).sum(-1).tolist()


def main():
  torch.manual_seed(0)
  gen = np.random.default_rng(0)
  policy = transformers.GPT2LMHeadModel.from_pretrained(GOLDENS / "gpt2").float()
  vocab = policy.config.vocab_size
  reference = transformers.GPT2LMHeadModel.from_pretrained(GOLDENS / "gpt2").float()
  with torch.no_grad():  # a reference that differs, so every log-ratio is far from 0
    for p in reference.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  reference.save_pretrained(OUT / "reference")
  (OUT / "reference" / "generation_config.json").unlink(missing_ok=True)

  pairs = [dict(prompt_ids=gen.integers(3, vocab, int(gen.integers(3, 16))).tolist(),
                chosen_ids=gen.integers(3, vocab, int(gen.integers(2, 24))).tolist(),
                rejected_ids=gen.integers(3, vocab, int(gen.integers(2, 24))).tolist()) for _ in range(8)]
  batch = DataCollatorForPreference(pad_token_id=PAD)(pairs)
  # the trainer wants a text dataset to prepare; the loss is computed on `batch` alone
  dataset = Dataset.from_list([{k.removesuffix("_ids"): " ".join(f"w{i}" for i in v) for k, v in pair.items()}
                               for pair in pairs])
  expected = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
              "pairs": pairs,
              "policy_logps": completion_logps(policy.eval(), batch),
              "reference_logps": completion_logps(reference.eval(), batch), "cases": {}}
  for name, fields in CASES:
    with tempfile.TemporaryDirectory() as tmp:
      args = trl.DPOConfig(output_dir=tmp, report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=8,
                           precompute_ref_log_probs=False, **fields)
      trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=dataset,
                               processing_class=tokenizer(vocab))
      trainer.model.train()
      with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, {k: v for k, v in batch.items()})
      logged = {k: float(v[-1]) for k, v in trainer._metrics["train"].items()}
    expected["cases"][name] = {"config": {k: v for k, v in fields.items()}, "loss": float(loss), "metrics": logged}
    print(f"{name}: loss {float(loss):.6f}")
  (OUT / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
  main()
