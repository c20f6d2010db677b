r"""CAE v2 ViT-S/16 pre-training on ImageNet-1k (CAE v2 Table 8).

As configs/caev2_vitb.py (same arguments: epochs=N, runlocal) with ViT-S/16: 49 masked
patches, a 1-block regressor, 12 heads (the official model definition, not 6).

Command:
  python -m mim_jax.train --config=configs/caev2_vits.py \
      --config.teacher.path=$CKPT/clip_vitb16.npz --workdir=$WORKDIR/caev2_vits

Expected result (CAE v2, 300 epochs, ImageNet-1k): 83.1 % fine-tune / 77.5 % linear probe
(configs/eval/caev2_finetune.py:variant=S/16, configs/eval/caev2_linear_probe.py:variant=S/16).
Smoke run: python -m mim_jax.train --config=configs/caev2_vits.py:runlocal --workdir=/tmp/c
"""

import os

from mim_jax import config_lib

caev2_vitb = config_lib.load_module(
  os.path.join(os.path.dirname(os.path.abspath(__file__)), "caev2_vitb.py")
)


def get_config(arg: str = ""):
  """Same arguments as caev2_vitb.py; the variant is S/16."""
  return caev2_vitb.get_config(",".join(filter(None, [arg, "variant=S/16"])))
