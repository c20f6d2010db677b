r"""CAE v2 ViT-T/16 pre-training on ImageNet-1k (CAE v2 Table 8).

As configs/caev2_vitb.py (same arguments: epochs=N, runlocal) with ViT-T/16: 30 masked
patches, a 1-block regressor of width 96 (encoder_to_regresser Linear + LN), 12 heads.

Command:
  python -m mim_jax.train --config=configs/caev2_vitt.py \
      --config.teacher.path=$CKPT/clip_vitb16.npz --workdir=$WORKDIR/caev2_vitt

Expected result (CAE v2, 300 epochs, ImageNet-1k): 77.8 % fine-tune / 69.3 % linear probe
(configs/eval/caev2_finetune.py:variant=T/16, configs/eval/caev2_linear_probe.py:variant=T/16).
Smoke run: python -m mim_jax.train --config=configs/caev2_vitt.py:runlocal --workdir=/tmp/c
"""

import os

from mim_jax import config_lib

caev2_vitb = config_lib.load_module(
  os.path.join(os.path.dirname(os.path.abspath(__file__)), "caev2_vitb.py")
)


def get_config(arg: str = ""):
  """Same arguments as caev2_vitb.py; the variant is T/16."""
  return caev2_vitb.get_config(",".join(filter(None, [arg, "variant=T/16"])))
