#!/usr/bin/env bash
# One prepared device check for a lent H100/H200 (inside 10 minutes): the DPO step of a ~1B Llama-shaped
# model in bf16 with cuDNN's fused attention and with the XLA path, the reward step, the sampler, and a PPO iteration; prints one JSON line each (MFU from the
# measured 8192^3 bf16 matmul and from the spec peak) and writes them to $OUT/gpu.jsonl.
#
# The device image has jax, flax, optax, orbax, transformers, safetensors, but not grain,
# tensorflow-datasets, ml_collections or tensorboardX, and it cannot download. Prepare the wheels HERE first
# (.wheels/ is git-ignored and travels with `carry`):
#   pip download -d .wheels --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       --no-deps ml_collections grain array_record tensorflow-datasets tensorboardX dm-tree promise \
#       simple_parsing termcolor toml immutabledict tensorflow-metadata googleapis-common-protos docstring-parser
# then run (device tool): command "bash benchmarks/gpu.sh", carry [".wheels"], timeout_s 540.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rlhfx-gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
if [[ -d .wheels ]]; then
  $PY -m pip install -q --no-index --find-links .wheels --no-deps .wheels/*.whl 2>&1 | tail -2
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"

# measured bf16 matmul peak (the roofline next to the spec's 989 TFLOP/s dense bf16)
$PY - <<'EOF' | tee -a "$OUT/gpu.jsonl"
import json, time
import jax, jax.numpy as jnp
a = jnp.ones((8192, 8192), jnp.bfloat16)
f = jax.jit(lambda x: x @ x)
f(a).block_until_ready()
t0 = time.perf_counter()
for _ in range(20):
  out = f(a)
out.block_until_ready()
print(json.dumps({"algo": "matmul_bf16_8192", "tflops": 20 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12,
                  "device": jax.devices()[0].device_kind}))
EOF

run() {  # name timeout_s command...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" --out "$OUT/gpu.jsonl" 2>"$OUT/$name.stderr" | tail -1 || echo "$name failed or timed out (see $OUT/$name.stderr)"
}
# ~1.2B Llama-3.2-1B shape (16 layers, 2048 wide, GQA 32/8, vocab 128256), bf16 compute, fp32 params + AdamW
run dpo_1b_cudnn 150 $PY benchmarks/dpo_step.py --preset llama3.2-1b --bf16 --seq 1024 --batch 8 --steps 10 --chunk-size 256 --attention cudnn
run dpo_1b_xla 150 $PY benchmarks/dpo_step.py --preset llama3.2-1b --bf16 --seq 1024 --batch 8 --steps 10 --chunk-size 256 --attention xla
run reward_1b 120 $PY benchmarks/reward_step.py --preset llama3.2-1b --bf16 --seq 1024 --batch 8 --steps 10
run generate_1b 120 $PY benchmarks/generate.py --preset llama3.2-1b --dtype bfloat16 --batch 32 --prompt-len 256 --new-tokens 256
run ppo_tiny 60 $PY benchmarks/ppo_iteration.py --iterations 3

$PY - "$OUT/gpu.jsonl" <<'EOF'
import json, sys
spec = 989e12  # H100/H200 SXM dense bf16
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
peak = next((r["tflops"] * 1e12 for r in rows if r.get("algo") == "matmul_bf16_8192"), None)
for r in rows:
  if "achieved_gflops" in r:
    g = r["achieved_gflops"] * 1e9
    print(json.dumps({"algo": r["algo"], "tokens_per_s": round(r["tokens_per_s"]), "mfu_spec": round(g / spec, 3),
                      "mfu_measured_peak": round(g / peak, 3) if peak else None, "compile_s": round(r["compile_s"], 1)}))
  elif "tokens_per_s" in r or "generated_tokens_per_s" in r:
    print(json.dumps({"algo": r["algo"], "tokens_per_s": round(r.get("tokens_per_s", r.get("generated_tokens_per_s")))}))
EOF
