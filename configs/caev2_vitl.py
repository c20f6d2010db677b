r"""CAE v2 ViT-L/16 pre-training on ImageNet-1k (CAE v2 Table 8).

As configs/caev2_vitb.py (same arguments: epochs=N, runlocal) with ViT-L/16: 118 masked
patches, a 4-block regressor with 16 heads, drop path 0.2, CLIP ViT-L/14 at 196 px as the teacher.

Command:
  python -m mim_jax.train --config=configs/caev2_vitl.py \
      --config.teacher.path=$CKPT/clip_vitl14.npz --workdir=$WORKDIR/caev2_vitl

Expected result (CAE v2, 300 epochs, ImageNet-1k): 87.6 % fine-tune / 84.4 % linear probe
(configs/eval/caev2_finetune.py:variant=L/16, configs/eval/caev2_linear_probe.py:variant=L/16).
Smoke run: python -m mim_jax.train --config=configs/caev2_vitl.py:runlocal --workdir=/tmp/c
"""

import os

from mim_jax import config_lib

caev2_vitb = config_lib.load_module(
  os.path.join(os.path.dirname(os.path.abspath(__file__)), "caev2_vitb.py")
)


def get_config(arg: str = ""):
  """Same arguments as caev2_vitb.py; the variant is L/16."""
  return caev2_vitb.get_config(",".join(filter(None, [arg, "variant=L/16"])))
