"""PPO of Llama-3-8B on Anthropic HH prompts against an 8B reward model, sized for a v5p-64 slice (32 chips x 95 GiB).

  python -m rlhfx.plan --config=configs/ppo_llama3_8b.py --topology=v5p-64       # will it fit? (any host)
  python launch/tpu.py --config=configs/ppo_llama3_8b.py --accelerator=v5p-64 --name=ppo8b \\
      --workdir=/mnt/ckpt/ppo8b --config.model.init_from=/mnt/models/llama3-8b-sft \\
      --config.scoring.model=/mnt/ckpt/rm8b

Four 8B trees: the policy and the critic (a copy of the reward model) are trained (float32
parameters and Adam moments, FSDP over all 32 chips); the reference and the reward model
are frozen, stored in bfloat16. 64 prompts x (512 prompt + 512 sampled tokens) per
iteration, one fused program (rollout, scoring, 4 epochs x 4 minibatches of updates).
Until the reward run exists the planner assumes a reward model of the policy's shape.
"""

from rlhfx.config import HH_HARMLESS_TEST, base_config, use_hh_pairs, use_llama3_on_tpu


def get_config(arg=None):
  del arg
  config = base_config("ppo")
  use_hh_pairs(config, [HH_HARMLESS_TEST], "hh_prompts")  # data.* fields
  use_llama3_on_tpu(config, "8b", prompt_tokens=512, completion_tokens=512)  # model.*, data.* lengths
  config.scoring.model = "/mnt/ckpt/rm8b"  # an 8B reward run (configs/reward_hh.py with model.preset=llama3-8b)
  config.scoring.missing_eos_penalty = 1.0  # completions cut at max_new_tokens lose 1 (normalised) point
  config.rollout.temperature = 0.7  # sampling temperature
  config.train.global_batch_size = 64  # prompts per iteration
  config.train.num_steps = 500  # iterations
  config.train.log_every = 5  # console and metrics
  config.train.eval_every = 50  # held-out score and KL
  config.train.checkpoint_every = 50  # checkpoints
  config.optim.learning_rate = 1e-6  # policy and critic
  config.optim.warmup_steps = 0  # no warmup
  config.optim.schedule = "constant"  # constant rate
  config.ppo.epochs = 4  # passes over each rollout
  config.ppo.minibatches = 4  # updates per pass: 16 rows, so at most 16-way batch parallelism per update
  config.ppo.kl_coef = 0.05  # per-token KL penalty
  config.ppo.value_model = "separate"  # the critic starts as a copy of the reward model
  config.mesh.shape.data = 1  # no pure data parallelism
  config.mesh.shape.fsdp = 16  # parameters and Adam moments split 16 ways (each minibatch: 16 rows)
  config.mesh.shape.tensor = -1  # the remaining 2 chips: tensor parallelism
  return config.lock()
