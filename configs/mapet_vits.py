r"""MaPeT ViT-S/16 pre-training on ImageNet-1k (MaPeT Tables 1, 2, 8).

As configs/mapet_vitb.py (same arguments: mode=mapet|pim|mim, least=N, tokenizer=kclip|vqkd,
runlocal) with ViT-S/16 (384-d, 6 heads, 12 blocks).

Command:
  python -m mim_jax.train --config=configs/mapet_vits.py \
      --config.tokenizer.cache=$DATA/tokens/kclip_train --config.data.source=imagefolder \
      --config.data.path=$DATA/imagenet --workdir=$WORKDIR/mapet_vits

Expected result (MaPeT Table 2, 300 epochs): ViT-S k-CLIP 82.1 % fine-tune / 71.6 % linear
probe; VQ-KD 82.2 % / 69.8 % (configs/eval/mapet_finetune.py:variant=S/16).
Smoke run: python -m mim_jax.train --config=configs/mapet_vits.py:runlocal --workdir=/tmp/m
"""

import os

from mim_jax import config_lib

mapet_vitb = config_lib.load_module(
  os.path.join(os.path.dirname(os.path.abspath(__file__)), "mapet_vitb.py")
)


def get_config(arg: str = ""):
  """Same arguments as mapet_vitb.py; the variant is S/16."""
  return mapet_vitb.get_config(",".join(filter(None, [arg, "variant=S/16"])))
