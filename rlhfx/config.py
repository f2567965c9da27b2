"""The fields every experiment config has, with their defaults; experiment files in configs/ override them.

  from rlhfx.config import base_config
  def get_config(arg=None):
    config = base_config("sft")
    config.train.num_steps = 1000   # ...
    return config.lock()

  config = load("configs/dpo_hh.py:tiny")   # what --config=configs/dpo_hh.py:tiny gives
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import types

import ml_collections
from ml_collections import config_dict

from rlhfx.losses import preference


ALGORITHMS = ("sft", "reward", "dpo", "ppo", "grpo")  # each trained by rlhfx/algorithms/<name>.py


class ConfigError(ValueError):
  """A config that cannot work; the message names the field."""


def load_module(path: str | pathlib.Path) -> types.ModuleType:
  """A config file as a module: its `get_config(arg)`, and `sweep()` when it has one."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"no config file {str(path)!r}")
  spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load(spec: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The config `--config=<file>.py[:variant]` names: `get_config(variant)` of the file (None without one)."""
  path, _, variant = str(spec).partition(":")
  return load_module(path).get_config(variant or None)


def field_comments(*files: str | pathlib.Path, algorithm: str | None = None) -> dict[str, str]:
  """{dotted field: comment} from the `c.a.b = value  # comment` lines of rlhfx/config.py (those under an
  `if algorithm ...` that `algorithm` does not meet left out), then a config file's own `config.a.b = value  #
  comment` lines, which win. A comment line indented under a field's comment (`  #        more`) continues it."""
  out = {}
  for i, file in enumerate(files):  # base_config writes `c.`, config files `config.` (its helpers too: not read)
    name, applies, last = ("c" if i == 0 else "config"), True, None
    for line in pathlib.Path(file).read_text().splitlines():
      more = re.match(r"\s*#\s{8,}(\S.*)$", line)
      if more and last:
        out[last] += " " + more.group(1).strip()
        continue
      last = None
      branch = re.match(r"  if algorithm (==|in) (.+):$", line)
      if branch and i == 0:
        names = re.findall(r'"(\w+)"', branch.group(2))
        applies = algorithm is None or algorithm in names
        continue
      if i == 0 and re.match(r"  \S", line):  # back at the function's level: the branch ended
        applies = True
      m = re.match(rf"\s*{name}\.([\w.]+)\s*=[^#]*#\s*(.+)$", line)
      if m and applies:
        out[m.group(1)] = m.group(2).strip()
        last = m.group(1)
  return out


def describe(config, config_file: str | pathlib.Path | None = None) -> str:
  """Every field of `config` with its value and comment, one per line (`python -m rlhfx.main --show_config`)."""
  comments = field_comments(__file__, *([str(config_file).partition(":")[0]] if config_file else []),
                            algorithm=config.algorithm)

  def lines(tree, prefix=""):
    for key, value in tree.items():
      if isinstance(value, dict):
        yield from lines(value, f"{prefix}{key}.")
      else:
        note = comments.get(f"{prefix}{key}")
        yield f"{prefix}{key} = {value!r}" + (f"  # {note}" if note else "")

  return "\n".join(lines(config.to_dict()))


def init_seed(config) -> int:
  """The seed of the parameters a run initialises: config.init_seed, or config.seed when it is -1."""
  return config.seed if config.get("init_seed", -1) < 0 else config.init_seed


def base_config(algorithm: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.algorithm = algorithm  # which rlhfx.algorithms module trains this config: sft
  c.seed = 0  # data order and sampling; parameter initialisation too unless init_seed is set
  c.init_seed = -1  # seed of the parameters a run initialises (random model, score head, critic, LoRA adapters);
  #                   -1 = seed. Members of one sweep program (rlhfx.members) may differ in it, not in seed

  c.model = ml_collections.ConfigDict()
  c.model.preset = "tiny"  # rlhfx.models.PRESETS name, used when init_from is empty (random init)
  c.model.init_from = ""  # Hugging Face dir or hub id, or "llama2c:<model.bin>"; "" = random init of the preset
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
  c.model.param_dtype = "float32"  # parameter (and optimizer state) dtype
  c.model.remat = "none"  # rematerialisation per layer: none | full | dots | dots_no_batch
  c.model.attention = "auto"  # auto (splash on TPU, cudnn on GPU, xla on CPU) | xla | splash | cudnn
  c.model.scan_layers = False  # scan over layers (stacked parameters): faster compiles for deep models
  c.model.vocab_size = config_dict.placeholder(int)  # override the preset's vocabulary size
  c.model.max_seq_len = config_dict.placeholder(int)  # override the context length
  c.model.n_layers = config_dict.placeholder(int)  # override the preset's depth
  c.model.d_model = config_dict.placeholder(int)  # override the preset's width
  c.model.lm_head_chunk = 0  # positions per LM-head chunk when taking log-probs (0 = all at once)

  c.data = ml_collections.ConfigDict()
  c.data.builtin = ""  # a task generated in code instead of files: reverse | arithmetic (rlhfx.data.synthetic)
  c.data.train_files = ()  # input files: JSONL or JSON arrays (.gz too), Parquet, save_to_disk dirs, hf:// files,
  #                          hub datasets "org/name[:split]"
  c.data.input_format = "sft"  # pairs | hh | sharegpt | unpaired | hh_unpaired | prompts | sft | hh_chosen |
  #                              hh_prompts (rlhfx.data.formats)
  c.data.eval_fraction = 0.05  # share of examples in the eval split (by content hash)
  c.data.on_error = "raise"  # bad input records: raise (file:line) | skip (counted, logged, in dataset_info.json)
  c.data.dir = ""  # where the ArrayRecord dataset is built; "" = <workdir>/data
  c.data.tokenizer = ""  # tokenizer: HF dir / hub id / hf:// file / encoder.json dir / .model / .bin /
  #                       builtin:bytes; "" = init_from
  c.data.max_length = 256  # prompt + completion tokens per row
  c.data.max_prompt_length = 128  # prompt tokens kept (its end, with prompt_side=keep_end)
  c.data.max_completion_length = 0  # completion tokens kept (0 = what max_length leaves); DPO's LM head sees only these
  c.data.prompt_side = "keep_end"  # keep_end | keep_start: which part of a long prompt survives
  c.data.on_overlong = "truncate"  # truncate | skip | error (counted either way)
  c.data.buckets = (64, 128, 256)  # padded lengths; at most this many compiled shapes
  c.data.read_threads = 0  # Grain reader threads (0 = main thread: fastest on small CPU hosts)
  c.data.packing = False  # SFT, DPO: pack sequences into rows of the largest bucket (segment ids keep them apart)

  c.train = ml_collections.ConfigDict()
  c.train.global_batch_size = 16  # rows per optimizer step, over all processes and micro-batches
  c.train.grad_accum_steps = 1  # micro-batches per step (lax.scan); each holds global_batch_size / this rows
  c.train.num_steps = 100  # optimizer steps
  c.train.log_every = 10  # console + metrics every N steps
  c.train.eval_every = 50  # eval loss every N steps (0 = only at the end)
  c.train.eval_batches = 4  # batches per evaluation
  c.train.checkpoint_every = 50  # save every N steps (and at the end, and on SIGTERM)
  c.train.keep_checkpoints = 3  # complete checkpoints kept
  c.train.async_checkpoints = True  # write checkpoints in the background
  c.train.eval_samples = 4  # SFT/DPO: greedy completions of this many held-out prompts at each evaluation
  c.train.eval_sample_tokens = 32  # their length limit (new tokens)
  c.train.export_hf = True  # write the final model as a Hugging Face directory: <workdir>/hf (reward: reward_model/hf)
  c.train.lock_lease_s = 60.0  # gs:// workdirs: the lock's lease; a run killed without releasing it is taken over after
  c.train.resume = "check"  # check: a rerun must match the workdir's config and inputs | new_config: accept them
  c.train.on_divergence = "stop"  # stop (exit 1) | warn (a loud line, the run goes on): NaN/Inf always stops
  c.train.divergence_factor = 100.0  # diverged: the loss above this x (|first loss| + 1) (SFT, reward, DPO)
  c.train.vanished_steps = 10  # diverged: a gradient that was not 0 is exactly 0 for this many steps in a row

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-3  # peak learning rate
  c.optim.schedule = "cosine"  # cosine | constant (both after linear warmup)
  c.optim.warmup_steps = 10  # linear warmup from 0
  c.optim.min_lr_ratio = 0.1  # cosine ends at this fraction of the peak
  c.optim.weight_decay = 0.0  # AdamW decoupled weight decay (matrices only)
  c.optim.b1 = 0.9  # Adam beta1
  c.optim.b2 = 0.95  # Adam beta2
  c.optim.eps = 1e-8  # Adam epsilon
  c.optim.clip_norm = 1.0  # global gradient-norm clipping (0 = off)
  c.optim.freeze = ()  # regexes over parameter paths ("layer_0/attn/q_proj/kernel") that get no update

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})  # -1 = remaining devices
  c.mesh.rules = ()  # logical-axis rules [(logical, mesh axes)]; () = rlhfx.sharding.DEFAULT_RULES
  c.mesh.num_cpu_devices = 0  # fake CPU devices for testing sharding (0 = leave JAX's default)

  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ""  # host:port of process 0 for explicit multi-process runs
  c.distributed.num_processes = 1  # processes in an explicit multi-process run
  c.distributed.process_id = 0  # this process's index in an explicit multi-process run
  c.distributed.local_device_ids = ()  # devices this process uses (explicit runs; () = all)
  c.distributed.auto = True  # initialise from the environment on Cloud TPU pods and SLURM

  c.logging = ml_collections.ConfigDict()
  c.logging.wandb = ml_collections.ConfigDict()
  c.logging.wandb.project = ""  # Weights & Biases project; "" = no W&B (metrics.jsonl and TensorBoard always)
  c.logging.wandb.entity = ""  # W&B team or user; "" = your default
  c.logging.wandb.name = ""  # run name; "" = the work directory's name (a sweep names each run's workdir)
  c.logging.wandb.group = ""  # W&B group, e.g. a sweep's name; "" = none
  c.logging.wandb.mode = "online"  # online | offline (synced later with `wandb sync <workdir>/wandb`) | disabled
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0  # adapter rank (0 = no LoRA: train all parameters); PPO: policy and critic both get adapters
  c.lora.alpha = 16.0  # scale = alpha / rank
  c.lora.patterns = ("attn/(q|k|v|o)_proj/kernel",)  # regexes over kernel paths that get adapters
  c.lora.init_from = ""  # a PEFT adapter directory to continue (its r and lora_alpha = rank, alpha); "" = new

  if algorithm in ("reward", "dpo"):
    c.data.input_format = "pairs"  # {"prompt", "chosen", "rejected"} records (dpo.loss=kto: unpaired)
  if algorithm == "reward":
    c.reward = ml_collections.ConfigDict()
    c.reward.center_coef = 0.0  # + c * mean((r_w + r_l)^2): keeps rewards centred (Eisenstein et al. 2023)
    c.reward.stats_batches = 16  # batches of train data for the reward mean/std stored for PPO
    c.reward.export_pad_token = ""  # the HF export's pad token: "" = the tokenizer's (EOS when it has none: then
    #                                  transformers scores the token before a final EOS, rlhfx the EOS); a new
    #                                  token such as "<|pad|>" is added to the tokenizer and the embedding, so
    #                                  transformers and TRL score rows that end in EOS as rlhfx does
  if algorithm == "dpo":
    c.dpo = ml_collections.ConfigDict()
    c.dpo.loss = "sigmoid"  # rlhfx.losses.preference.LOSSES (README: the DPO family), e.g. sigmoid | ipo | simpo | kto
    for name, default in preference.config_fields().items():  # every registered loss's hyper-parameters
      c.dpo[name] = default  # beta, label_smoothing, gamma, lam, discopop_tau, desirable_weight, undesirable_weight
    c.dpo.sft_weight = 0.0  # + w * NLL of the chosen completions (paired losses)
    c.dpo.reference = "frozen"  # frozen (a second tree) | precomputed (log-probs cached once) | lora_base
  if algorithm in ("ppo", "grpo"):
    c.data.input_format = "prompts"  # {"prompt"} or {"messages"} records: the prompts to sample from
    c.train.global_batch_size = 16  # prompts per iteration (rollout rows = this x rollout.group_size)
    c.train.num_steps = 100  # iterations (each: rollout, scoring, epochs x minibatches updates)
    c.train.eval_every = 20  # mean score and KL on held-out prompts every N iterations
    c.train.log_samples_every = 10  # print and append sample completions to <workdir>/samples.jsonl
    c.train.time_phases = False  # time rollout / scoring / update as three programs (else one fused program)
    c.rollout = ml_collections.ConfigDict()
    c.rollout.max_new_tokens = 64  # completion length limit (a row stops at EOS)
    c.rollout.temperature = 1.0  # sampling temperature (log-probs are taken under logits / temperature)
    c.rollout.top_k = 0  # 0 = no top-k filter
    c.rollout.top_p = 1.0  # 1 = no nucleus filter
    c.rollout.group_size = 1 if algorithm == "ppo" else 8  # completions sampled per prompt
    c.rollout.sampler = "engine"  # engine (continuous batching: prompts prefilled once, a finished row's slot
    #                              taken by the next, the drained tail in narrower batches) | static (every row
    #                              keeps its place until the longest ends); both sample the same tokens
    c.rollout.slots = 0  # the engine's slots (0: one per row)
    c.rollout.cache_buckets = 4  # the static sampler's decode loops, each over a KV cache just long enough
    #                              for its steps (at most one per 128 new tokens; 1: one loop)
    c.rollout.mesh = "auto"  # sampling layout: tensor=<k> (groups of k chips, rows over the groups, the policy
    #                          resharded each iteration), auto (the largest k <= 8 dividing the devices and
    #                          key/value heads that leaves each chip >= 256 MiB of weights; 1 for a small
    #                          model) or training (sample in the training layout, no reshard)
    c.scoring = ml_collections.ConfigDict()
    c.scoring.model = ""  # reward run workdir / reward_model folder / HF *ForSequenceClassification dir or hub id
    c.scoring.functions = ()  # reward functions (rlhfx.reward_functions): math_answer, think_format, regex:<pattern>,
    #                           fraction:<chars>, module:function; their weighted sum is the score (+ the model's)
    c.scoring.weights = ()  # one weight per function; () = 1 each
    c.scoring.normalize = True  # reward model scores -> (r - mean) / std with the reward run's statistics
    c.scoring.missing_eos_penalty = 0.0  # subtracted from the score of a completion cut before EOS
    c.scoring.timeout_s = 300.0  # a host reward function's call may take this long (0: no limit); then one line, exit 1
  if algorithm == "ppo":
    c.ppo = ml_collections.ConfigDict()
    c.ppo.epochs = 4  # passes over each rollout
    c.ppo.minibatches = 1  # optimizer updates per pass
    c.ppo.clip_eps = 0.2  # policy ratio clip
    c.ppo.dual_clip = 0.0  # > 1: cap the loss of negative advantages at -c A (0 = off)
    c.ppo.value_clip = 0.2  # value prediction clip around the rollout's values (0 = off)
    c.ppo.vf_coef = 0.1  # value loss weight
    c.ppo.entropy_coef = 0.0  # entropy bonus weight
    c.ppo.gamma = 1.0  # discount
    c.ppo.lam = 0.95  # GAE lambda
    c.ppo.kl_coef = 0.05  # KL(policy || reference) coefficient (initial value when adaptive)
    c.ppo.kl_estimator = "k1"  # k1 | k2 | k3 (rlhfx.losses.policy.kl_estimate)
    c.ppo.kl_in = "reward"  # reward (per-token penalty, Ziegler et al.) | loss (a loss term)
    c.ppo.kl_penalty = "token"  # with kl_in=reward: token (on each token) | sequence (summed, on the last token)
    c.ppo.kl_target = 0.0  # > 0: adaptive coefficient steering KL (nats/sequence) to this target
    c.ppo.kl_horizon = 10000  # adaptive controller horizon (samples)
    c.ppo.whiten_advantages = True  # advantages -> zero mean, unit variance over the rollout
    c.ppo.whiten_rewards = False  # whiten per-token rewards (keeping their mean) before GAE
    c.ppo.aggregation = "token_mean"  # token_mean | sequence_mean | fixed (rlhfx.losses.policy.aggregate)
    c.ppo.value_model = "separate"  # separate (critic from the reward model, else the policy) | policy_head
  if algorithm == "grpo":
    c.grpo = ml_collections.ConfigDict()
    c.grpo.advantage = "grpo"  # grpo (std-normalised) | dr_grpo (no std) | rloo (leave-one-out)
    c.grpo.beta = 0.04  # weight of the k3 KL(policy || reference) loss term (0 = no reference model)
    c.grpo.epochs = 1  # passes over each rollout
    c.grpo.minibatches = 1  # optimizer updates per pass
    c.grpo.clip_eps = 0.2  # policy ratio clip (lower side)
    c.grpo.clip_eps_high = 0.0  # upper clip (DAPO's clip-higher); 0 = clip_eps
    c.grpo.aggregation = "sequence_mean"  # sequence_mean (GRPO) | token_mean (DAPO) | fixed (Dr.GRPO)
  return c


# The HH configs' data and the tiny variants' tokenizer, as users name them: a file of the hub dataset
# Anthropic/hh-rlhf (2,312 pairs, 0.7 MB) and the GPT-2 repository, both read through the Hugging Face cache
# (`rlhfx.hub`; `python -m rlhfx.fetch --config=...` fetches a config's ahead of time).
HH_HARMLESS_TEST = "hf://datasets/Anthropic/hh-rlhf/harmless-base/test.jsonl.gz"
GPT2_TOKENIZER = "openai-community/gpt2"


def use_hh_pairs(config, files, input_format: str = "hh") -> None:
  """Anthropic HH transcripts as the data (shared by the HH experiment files)."""
  config.data.train_files = tuple(str(f) for f in files)  # HH JSONL(.gz) transcripts (paths or hf:// files)
  config.data.input_format = input_format  # hh: split at the last shared "\n\nAssistant:"
  config.data.on_error = "skip"  # count and skip the unsplittable pairs and empty replies
  config.data.max_length = 512  # prompt + reply tokens
  config.data.max_prompt_length = 384  # prompt tokens (the most recent turns are kept)
  config.data.buckets = (128, 256, 512)  # padded lengths


def use_tiny_cpu_model(config, tokenizer=GPT2_TOKENIZER, *, max_length: int = 256) -> None:
  """The `:tiny` variants: a random 2-layer model with the GPT-2 vocabulary, float32, shorter rows."""
  config.model.init_from = ""  # random init of the preset
  config.model.preset = "tiny"  # 2 layers, width 64
  config.model.vocab_size = 50257  # GPT-2's vocabulary
  config.model.dtype = "float32"  # CPU
  config.data.tokenizer = str(tokenizer)  # GPT-2's BPE (a hub id, or a folder with its vocab.json + merges.txt)
  config.data.max_length = max_length  # prompt + reply tokens
  config.data.max_prompt_length = max_length * 3 // 4  # prompt tokens
  config.data.buckets = (128, max_length) if max_length > 128 else (max_length,)  # padded lengths


def use_llama3_on_tpu(config, size: str, *, prompt_tokens: int, completion_tokens: int) -> None:
  """The Llama-3 configs sized with `rlhfx.plan`: bf16 compute on float32 parameters and Adam moments, full
  rematerialisation of one scanned layer, one compiled shape."""
  config.model.preset = f"llama3-{size}"  # shapes; set model.init_from to your SFT checkpoint (same shapes)
  config.data.tokenizer = f"meta-llama/Meta-Llama-3-{size.upper()}"  # hub id or a local copy of its tokenizer
  config.model.dtype = "bfloat16"  # compute dtype
  config.model.param_dtype = "float32"  # trained parameters and Adam moments
  config.model.remat = "full"  # recompute each layer in the backward pass
  config.model.scan_layers = True  # one scanned layer: compile time independent of depth
  config.data.max_length = prompt_tokens + completion_tokens  # prompt + reply tokens
  config.data.max_prompt_length = prompt_tokens  # prompt tokens (the most recent turns are kept)
  if config.algorithm in ("ppo", "grpo"):
    config.data.buckets = (prompt_tokens,)  # one prompt shape
    config.rollout.max_new_tokens = completion_tokens  # sampled tokens per prompt
  else:
    config.data.max_completion_length = completion_tokens  # reply tokens; the LM head sees only these
    config.data.buckets = (prompt_tokens + completion_tokens,)  # one compiled shape


def use_letters_task(config) -> None:
  """The programmatic-reward toy of configs/{ppo,grpo}_letters.py: a random byte-level tiny policy, the built-in
  reverse task's prompts, score = share of completion bytes in a-z (computed inside the compiled iteration)."""
  import string

  config.model.preset = "tiny"  # 2 layers, width 64
  config.model.vocab_size = 259  # the byte tokenizer
  config.data.builtin = "reverse"  # prompts "reverse: abcd =" generated in code
  config.data.tokenizer = "builtin:bytes"  # one token per byte
  config.data.eval_fraction = 0.05  # held-out prompts for eval/scores and eval/kl
  config.data.max_length = 40  # prompt + completion bytes
  config.data.max_prompt_length = 24  # prompt bytes
  config.data.buckets = (24,)  # one prompt shape, one compilation
  config.scoring.functions = ("fraction:" + string.ascii_lowercase,)  # share of completion bytes in a-z
  config.rollout.max_new_tokens = 16  # completion bytes
  config.train.num_steps = 60  # iterations
  config.train.log_every = 5  # console and metrics
  config.train.eval_every = 20  # held-out score and KL
  config.train.eval_batches = 2  # batches of held-out prompts per evaluation
  config.train.checkpoint_every = 30  # checkpoints
  config.train.log_samples_every = 20  # sample completions
  config.train.export_hf = False  # a toy policy
  config.optim.learning_rate = 3e-3  # small random model
  config.optim.warmup_steps = 0  # no warmup
  config.optim.schedule = "constant"  # constant rate
