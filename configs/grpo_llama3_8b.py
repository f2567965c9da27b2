"""GRPO of Llama-3-8B on Anthropic HH prompts against an 8B reward model, sized for a v5p-64 slice (32 chips).

  python -m rlhfx.plan --config=configs/grpo_llama3_8b.py --topology=v5p-64      # will it fit? (any host)
  python launch/tpu.py --config=configs/grpo_llama3_8b.py --accelerator=v5p-64 --name=grpo8b \\
      --workdir=/mnt/ckpt/grpo8b --config.model.init_from=/mnt/models/llama3-8b-sft \\
      --config.scoring.model=/mnt/ckpt/rm8b

16 prompts x 8 samples x (512 prompt + 512 sampled tokens) per iteration, one fused program;
the policy is trained (float32 parameters and Adam moments, FSDP), the reference and the
reward model are frozen in bfloat16. A verifiable reward instead of the reward model:
--config.scoring.model= --config.scoring.functions="('module:function',)".
"""

from rlhfx.config import HH_HARMLESS_TEST, base_config, use_hh_pairs, use_llama3_on_tpu


def get_config(arg=None):
  del arg
  config = base_config("grpo")
  use_hh_pairs(config, [HH_HARMLESS_TEST], "hh_prompts")  # data.* fields
  use_llama3_on_tpu(config, "8b", prompt_tokens=512, completion_tokens=512)  # model.*, data.* lengths
  config.scoring.model = "/mnt/ckpt/rm8b"  # an 8B reward run (configs/reward_hh.py with model.preset=llama3-8b)
  config.rollout.temperature = 1.0  # sampling temperature
  config.rollout.group_size = 8  # samples per prompt
  config.train.global_batch_size = 16  # prompts per iteration (128 rollout rows)
  config.train.num_steps = 500  # iterations
  config.train.log_every = 5  # console and metrics
  config.train.eval_every = 50  # held-out score and KL
  config.train.checkpoint_every = 50  # checkpoints
  config.optim.learning_rate = 1e-6  # policy
  config.optim.warmup_steps = 0  # no warmup
  config.optim.schedule = "constant"  # constant rate
  config.grpo.beta = 0.04  # k3 KL to the reference
  config.grpo.epochs = 1  # one pass over each rollout
  config.grpo.minibatches = 2  # two updates per iteration (64 rows each)
  config.mesh.shape.data = 1  # no pure data parallelism
  config.mesh.shape.fsdp = 16  # parameters and Adam moments split 16 ways (the 16 prompts: one per shard)
  config.mesh.shape.tensor = -1  # the remaining 2 chips: tensor parallelism
  return config.lock()
