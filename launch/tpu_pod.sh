#!/usr/bin/env bash
# Launch a mim_jax pre-training run on every host of a Cloud TPU VM pod slice.
#
#   export TPU_NAME=mim-v4-64 ZONE=us-central2-b ACCELERATOR=v4-64 \
#     REPO=https://github.com/<you>/mim_jax.git \
#     CONFIG=configs/ccvit_vitb.py WORKDIR=/mnt/shared/runs/ccvit_vitb \
#     EXTRA="--config.tokenizer.path=/mnt/shared/ccvit_centroids_8192"
#   bash launch/tpu_pod.sh create     # the slice
#   bash launch/tpu_pod.sh setup      # clone REPO (at REF) + venv on every host
#   bash launch/tpu_pod.sh train      # start (or resume) the run on every host
#   bash launch/tpu_pod.sh logs       # follow host 0's log
#   bash launch/tpu_pod.sh delete
#
# Every host runs the same command; `--config.distributed=True` makes the trainer find the
# other hosts through jax's Cloud TPU detection (mim_jax/distributed.py). WORKDIR must be a
# path on a filesystem that every host mounts at the same place (e.g. a Filestore / NFS
# share): the trainer writes checkpoints, metrics and its lock with local file calls and
# does not support gs:// workdirs yet. Re-running `train` resumes from the newest
# checkpoint; a preempted slice gets SIGTERM, and every host saves the same step first.
set -euo pipefail

usage() {
  echo "usage: TPU_NAME=... ZONE=... [REPO=...] [CONFIG=... WORKDIR=...]" \
    "$0 create|setup|train|logs|delete" >&2
  exit 2
}
CMD="${1:-}"
case "$CMD" in create|setup|train|logs|delete) ;; *) usage ;; esac

# Every variable a subcommand needs is checked here, before anything runs.
: "${TPU_NAME:?set TPU_NAME (the TPU VM name, e.g. mim-v4-64)}"
: "${ZONE:?set ZONE (e.g. us-central2-b)}"
ACCELERATOR="${ACCELERATOR:-v4-64}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
REF="${REF:-}"                      # branch / tag / commit for `setup`; empty: default branch
JAX_VERSION="${JAX_VERSION:-0.10.2}"
EXTRA="${EXTRA:-}"
case "$CMD" in
  setup)
    : "${REPO:?set REPO (git URL of your mim_jax repository, cloned on every host)}" ;;
  train)
    : "${CONFIG:?set CONFIG (a config file inside the repository, e.g. configs/ccvit_vitb.py)}"
    : "${WORKDIR:?set WORKDIR (a directory on a filesystem mounted on every host)}"
    if [[ "$WORKDIR" == *://* ]]; then
      echo "WORKDIR=$WORKDIR: the trainer writes local paths only; use a shared mount" \
        "(Filestore / NFS) visible to every host at the same path" >&2
      exit 2
    fi
    if [[ "$WORKDIR" != /* ]]; then
      echo "WORKDIR=$WORKDIR must be an absolute path (each host starts in its home)" >&2
      exit 2
    fi ;;
esac
command -v gcloud > /dev/null || { echo "gcloud is not installed or not on PATH" >&2; exit 2; }

ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"; }

case "$CMD" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
      --accelerator-type "$ACCELERATOR" --version "$RUNTIME" ;;
  setup)
    ssh_all "set -e; [ -d mim_jax ] || git clone '$REPO' mim_jax; cd mim_jax; git fetch -q;
      if [ -n '$REF' ]; then git checkout -q '$REF'; else git pull -q; fi
      python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]==$JAX_VERSION'" ;;
  train)
    ssh_all "cd mim_jax && nohup .venv/bin/python -m mim_jax.train --config='$CONFIG' \
      --workdir='$WORKDIR' --config.distributed=True $EXTRA > train.log 2>&1 &" ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=0 \
      --command "tail -n 50 -f mim_jax/train.log" ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" --quiet ;;
esac
