r"""Weighted kNN on frozen features (DINO protocol: k = 20, cosine, votes exp(cos / 0.07)).

Command (ImageNet-1k; features of the train and validation images after Resize 256 ->
CenterCrop 224, the mean of the final patch tokens by default):
  python -m mim_jax.evaluate --config=configs/eval/knn.py --config.init=$WORKDIR/ccvit_vitb \
      --workdir=$WORKDIR/ccvit_vitb_knn
  # cls-token features (models with patch aggregation, e.g. BEiT v2):
  python -m mim_jax.evaluate --config=configs/eval/knn.py:pool=cls --config.init=... --workdir=...

Expected result: none of the five papers reports kNN; it is a cheap monitor (no training)
that ranks checkpoints of one method. Compare it only between runs of one method, and
against config.init=random.

Smoke run on 2 CPU cores (32 px Imagenette from ../shared/data, all 9,469 train and 3,925
test images; a ViT-T/4-sized random encoder with init=random):
  python -m mim_jax.evaluate --config=configs/eval/knn.py:runlocal --config.init=random \
      --workdir=/tmp/knn_random
"""

from mim_jax import config_lib
from mim_jax.evaluation import config_base


def get_config(arg: str = ""):
  a = config_lib.parse_arg(arg, runlocal=False, variant="B/16", pool="mean", k=20, temperature=0.07)
  c = config_base.base("knn")
  c.model.variant = a.variant
  c.pool = a.pool
  c.knn.k, c.knn.temperature = a.k, a.temperature
  if a.runlocal:
    config_base.runlocal(c)
  return c
