"""DPO of Llama-3-70B on Anthropic HH pairs, sized for a v5p-128 slice (64 chips x 95 GiB HBM).

  python -m rlhfx.plan --config=configs/dpo_llama3_70b.py --topology=v5p-128     # will it fit? (any host)
  python launch/tpu.py --config=configs/dpo_llama3_70b.py --accelerator=v5p-128 --name=dpo70b \\
      --workdir=/mnt/ckpt/dpo70b --config.model.init_from=/mnt/models/llama3-70b-sft

128 pairs x 2,048 tokens per optimizer step (2 accumulated micro-batches of 64 pairs,
one per chip), FSDP over all 64 chips, bfloat16 compute on float32 parameters and Adam
moments, full rematerialisation of each scanned layer, a frozen bfloat16 reference
tree, the LM head only over the 1,024 completion positions, 256 at a time.
"""

from rlhfx.config import HH_HARMLESS_TEST, base_config, use_hh_pairs, use_llama3_on_tpu


def get_config(arg=None):
  del arg
  config = base_config("dpo")
  use_hh_pairs(config, [HH_HARMLESS_TEST])  # data.* fields: see rlhfx/config.py
  use_llama3_on_tpu(config, "70b", prompt_tokens=1024, completion_tokens=1024)  # model.*, data.* lengths
  config.dpo.loss = "sigmoid"  # DPO
  config.dpo.beta = 0.1  # KL strength
  config.dpo.reference = "frozen"  # a frozen copy of the initial policy, stored in bfloat16
  config.model.lm_head_chunk = 256  # LM-head positions per chunk
  config.train.global_batch_size = 128  # pairs per optimizer step
  config.train.grad_accum_steps = 2  # micro-batches of 64 pairs: one per chip
  config.train.num_steps = 1000  # optimizer steps
  config.train.log_every = 10  # console and metrics
  config.train.eval_every = 200  # held-out rewards/accuracies
  config.train.checkpoint_every = 100  # checkpoints
  config.optim.learning_rate = 5e-7  # DPO's usual rate
  config.optim.warmup_steps = 100  # linear warmup
  config.optim.schedule = "constant"  # after warmup
  config.mesh.shape.data = 1  # no pure data parallelism:
  config.mesh.shape.fsdp = -1  # parameters, gradients and Adam moments split over every chip
  config.mesh.shape.tensor = 1  # no tensor parallelism
  return config.lock()
