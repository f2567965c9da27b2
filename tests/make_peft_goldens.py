"""Regenerate tests/goldens/peft_llama/: a LoRA adapter saved by PEFT itself, and the adapted model's logits.

torch and peft are never dependencies of rlhfx or its tests; this script runs in a virtualenv with
torch==2.13.0, transformers>=5 and peft (see tests/make_trl_goldens.py):

  /tmp/venv-trl/bin/python tests/make_peft_goldens.py

The base is tests/goldens/llama; PEFT's LoraConfig puts rank-4 adapters (alpha 8) on q_proj, v_proj,
o_proj and down_proj, their B matrices drawn at random (PEFT starts them at 0) so the adapter changes the
logits. `save_pretrained` writes adapter_config.json + adapter_model.safetensors in PEFT's key layout;
expected.npz holds `tokens` and the PeftModel's fp32 `logits`.
"""

import pathlib

import numpy as np
import peft
import torch
import transformers

GOLDENS = pathlib.Path(__file__).parent / "goldens"
OUT = GOLDENS / "peft_llama"


def main():
  torch.manual_seed(2)
  base = transformers.AutoModelForCausalLM.from_pretrained(GOLDENS / "llama", attn_implementation="eager").float()
  config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                           target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
  model = peft.get_peft_model(base, config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name or "lora_A" in name:
        p.copy_(torch.randn_like(p) * 0.2)
  model.save_pretrained(OUT)
  import json

  saved = json.loads((OUT / "adapter_config.json").read_text())
  saved["base_model_name_or_path"] = "tests/goldens/llama"  # not this machine's absolute path
  (OUT / "adapter_config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
  (OUT / "README.md").unlink(missing_ok=True)  # peft's model card template
  tokens = np.random.default_rng(2).integers(3, base.config.vocab_size, size=(2, 40))
  with torch.no_grad():
    logits = model(input_ids=torch.tensor(tokens)).logits.float().numpy()
  np.savez(OUT / "expected.npz", tokens=tokens, logits=logits)
  print(sorted(peft.get_peft_model_state_dict(model))[:4])


if __name__ == "__main__":
  main()
