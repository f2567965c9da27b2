"""DPO of Llama-3-8B on Anthropic HH pairs, sized for a v5e-16 slice (16 chips x 16 GiB HBM).

  python -m rlhfx.plan --config=configs/dpo_llama3_8b.py --topology=v5e-16      # will it fit? (any host)
  python launch/tpu.py --config=configs/dpo_llama3_8b.py --accelerator=v5e-16 --name=dpo8b \\
      --workdir=/mnt/ckpt/dpo8b --config.model.init_from=/mnt/models/llama3-8b-sft

64 pairs x 1,024 tokens per optimizer step, as 16 accumulated micro-batches of 4 pairs,
the 16 chips as fsdp=4 x tensor=4, bfloat16 compute on float32 parameters and Adam
moments, full rematerialisation of each scanned layer, reference log-probs precomputed
once (no second 8B tree in HBM), the LM head only over the 512 completion positions,
128 at a time. Plain FSDP over all 16 chips (fsdp=16, 4 micro-batches) also fits but
with 8% headroom; `rlhfx.plan --search` lists every setting that fits.
"""

from rlhfx.config import HH_HARMLESS_TEST, base_config, use_hh_pairs, use_llama3_on_tpu


def get_config(arg=None):
  del arg
  config = base_config("dpo")
  use_hh_pairs(config, [HH_HARMLESS_TEST])  # data.* fields: see rlhfx/config.py
  use_llama3_on_tpu(config, "8b", prompt_tokens=512, completion_tokens=512)  # model.*, data.* lengths
  config.dpo.loss = "sigmoid"  # DPO
  config.dpo.beta = 0.1  # KL strength
  config.dpo.reference = "precomputed"  # reference log-probs computed once before training
  config.model.lm_head_chunk = 128  # LM-head positions per chunk
  config.train.global_batch_size = 64  # pairs per optimizer step
  config.train.grad_accum_steps = 16  # micro-batches of 4 pairs: one per fsdp shard
  config.train.num_steps = 1000  # optimizer steps
  config.train.log_every = 10  # console and metrics
  config.train.eval_every = 200  # held-out rewards/accuracies
  config.train.checkpoint_every = 200  # checkpoints
  config.optim.learning_rate = 5e-7  # DPO's usual rate
  config.optim.warmup_steps = 100  # linear warmup
  config.optim.schedule = "constant"  # after warmup
  config.mesh.shape.data = 1  # no pure data parallelism
  config.mesh.shape.fsdp = 4  # parameters, gradients and Adam moments split 4 ways ...
  config.mesh.shape.tensor = -1  # ... and 4 ways again by heads, MLP width and vocabulary
  return config.lock()
