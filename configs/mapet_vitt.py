r"""MaPeT ViT-T/16 pre-training on ImageNet-1k (MaPeT Tables 1, 2, 8).

As configs/mapet_vitb.py (same arguments: mode=mapet|pim|mim, least=N, tokenizer=kclip|vqkd,
runlocal) with ViT-T/16 (192-d, 3 heads, 12 blocks).

Command:
  python -m mim_jax.train --config=configs/mapet_vitt.py \
      --config.tokenizer.cache=$DATA/tokens/kclip_train --config.data.source=imagefolder \
      --config.data.path=$DATA/imagenet --workdir=$WORKDIR/mapet_vitt

Expected result (MaPeT Table 2, 300 epochs): ViT-T k-CLIP 75.5 % fine-tune / 62.5 % linear
probe; VQ-KD 74.5 % / 59.6 % (configs/eval/mapet_finetune.py:variant=T/16).
Smoke run: python -m mim_jax.train --config=configs/mapet_vitt.py:runlocal --workdir=/tmp/m
"""

import os

from mim_jax import config_lib

mapet_vitb = config_lib.load_module(
  os.path.join(os.path.dirname(os.path.abspath(__file__)), "mapet_vitb.py")
)


def get_config(arg: str = ""):
  """Same arguments as mapet_vitb.py; the variant is T/16."""
  return mapet_vitb.get_config(",".join(filter(None, [arg, "variant=T/16"])))
