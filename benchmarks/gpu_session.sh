#!/usr/bin/env bash
# The GPU benchmarks of BENCHMARKS.md §13, as one script for a rented or lent GPU machine:
#   bash benchmarks/gpu_session.sh [OUT_DIR]
# 1. every method's ViT-B/16 paper config, batch 128 per chip, bf16 (accelerator_step_bench.py):
#    images/s per chip, MFU, XLA's memory figures beside the allocator's peak;
# 2. CCViT ViT-B/16 side by side with the PyTorch/timm reference on the same chip
#    (ccvit_step_bench.py: JAX bf16 against PyTorch eager under bf16 autocast);
# 3. the trainer itself (python -m mim_jax.train) on the embedded photos with loader worker
#    processes: its metrics.jsonl (img/s per chip, MFU) and whether the input keeps up.
# Stages have deadlines so that a short lease still returns what finished. Packages the
# machine lacks can come as wheels in ./.whl (pip download ... -d .whl), installed to /tmp/site.
# A smoke run on a CPU machine (minutes): CONFIGS=ccvit_vitb CONFIG_ARG=runlocal BATCH=2
#   CCVIT_VARIANT=T/16 TORCH_DEVICE=cpu TRAIN_STEPS=4 WORKERS=2 bash benchmarks/gpu_session.sh /tmp/smoke
set -u
OUT_DIR=${1:-${OUT:-/tmp/gpu_session}}
mkdir -p "$OUT_DIR"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
T0=$(date +%s)
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import sys, jax, flax, optax, torch; print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"
  nproc
} 2>&1 | tee "$OUT_DIR/env.txt"
# Fail fast (seconds, not a lease) when the project does not import on this machine's jax.
python3 -c "import mim_jax.train, mim_jax.aot" 2>&1 | tail -5 | tee -a "$OUT_DIR/env.txt"
[ "${PIPESTATUS[0]}" = 0 ] || exit 3

timeout "${METHODS_TIMEOUT:-300}" python3 benchmarks/accelerator_step_bench.py \
  --configs="${CONFIGS:-ccvit_vitb,beitv2_vitb,caev2_vitb,mapet_vitb,peco_vitb}" \
  --arg="${CONFIG_ARG:-}" --batch_size="${BATCH:-128}" --dtype=bfloat16 --rounds=3 --steps=10 --warmup=2 \
  --deadline_s="${METHODS_DEADLINE:-200}" --timeout_s=150 --out_dir="$OUT_DIR/methods" \
  2>&1 | grep -v "^WARNING: All log\|cudart_stub" | tee "$OUT_DIR/methods.log" | tail -40
echo "methods done at $(($(date +%s) - T0)) s"

# JAX keeps 60 % of the GPU's memory, the PyTorch process the rest.
XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout "${CCVIT_TIMEOUT:-170}" python3 \
  benchmarks/ccvit_step_bench.py --variants "${CCVIT_VARIANT:-B/16}" --batch_sizes "${BATCH:-128}" --dtype bf16 \
  --torch_device "${TORCH_DEVICE:-cuda}" --torch_amp bf16 --torch_threads 8 --rounds 5 --steps 10 --warmup 3 \
  --out "$OUT_DIR/ccvit_vs_torch.md" 2>&1 | grep -v "^WARNING: All log\|cudart_stub" \
  | tee "$OUT_DIR/ccvit.log" | tail -25
echo "side by side done at $(($(date +%s) - T0)) s"

# No TensorBoard: clu and TensorFlow are not on every GPU image; metrics.jsonl has the rows.
rm -rf /tmp/gpu_session_train  # a fresh run, not a resumed one
timeout "${TRAIN_TIMEOUT:-200}" python3 -m mim_jax.train \
  --config="configs/ccvit_vitb.py${CONFIG_ARG:+:$CONFIG_ARG}" \
  --config.data.source=embedded --config.data.path= --config.tokenizer.path=random: \
  --config.batch_size="${BATCH:-128}" --config.total_steps="${TRAIN_STEPS:-100}" \
  --config.log_every=20 --config.checkpoint_every=100000 --config.tensorboard=False \
  --config.data.worker_count="${WORKERS:-$(($(nproc) - 2))}" --workdir=/tmp/gpu_session_train \
  >"$OUT_DIR/train.log" 2>&1
echo "train rc=$?"
cp /tmp/gpu_session_train/metrics.jsonl "$OUT_DIR/train_metrics.jsonl" 2>/dev/null
grep -v cudart_stub "$OUT_DIR/train.log" | grep "step \|compiled\|rror" | cut -c1-300 | tail -12
echo "all done at $(($(date +%s) - T0)) s"
