#!/usr/bin/env bash
# Launch a mim_jax pre-training run on every host of a Cloud TPU VM pod slice.
#
#   TPU_NAME=mim-v4-64 ZONE=us-central2-b ACCELERATOR=v4-64 \
#   CONFIG=configs/ccvit_vitb.py WORKDIR=gs://my-bucket/ccvit_vitb \
#   EXTRA="--config.tokenizer.path=/data/ccvit_centroids_8192 --config.data.data_dir=gs://my-bucket/tfds" \
#   bash launch/tpu_pod.sh [create|setup|train|logs|delete]
#
# Every host runs the same command; `--config.distributed=True` makes the trainer call
# jax.distributed.initialize(), each host reads its own shard of the data, and orbax writes
# one checkpoint (to a gs:// workdir) that any slice shape can restore. Re-running `train`
# resumes from the newest checkpoint; a preempted slice gets SIGTERM, which saves first.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR="${ACCELERATOR:-v4-64}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
CONFIG="${CONFIG:-configs/ccvit_vitb.py}"
WORKDIR="${WORKDIR:?set WORKDIR (a gs:// path for multi-host)}"
REPO="${REPO:-https://github.com/your-org/mim_jax.git}"
EXTRA="${EXTRA:-}"
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"; }

case "${1:-train}" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
      --accelerator-type "$ACCELERATOR" --version "$RUNTIME" ;;
  setup)
    ssh_all "set -e; [ -d mim_jax ] || git clone $REPO mim_jax; cd mim_jax && git pull -q;
      python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]==0.10.2'" ;;
  train)
    ssh_all "cd mim_jax && nohup .venv/bin/python -m mim_jax.train --config=$CONFIG \
      --workdir=$WORKDIR --config.distributed=True $EXTRA > train.log 2>&1 &" ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=0 \
      --command "tail -n 50 -f mim_jax/train.log" ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" --quiet ;;
  *) echo "usage: $0 [create|setup|train|logs|delete]" >&2; exit 2 ;;
esac
