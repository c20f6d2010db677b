r"""CCViT ViT-L/16 pre-training on ImageNet-1k, 300 epochs (CCViT Table 2).

The large recipe is `Cakeyan/CCViT_Public:bash/large_pt_im1k.bash`
(docs/reference_details.md#ccvit-recipe).

Command:
  python -m mim_jax.train --config=configs/ccvit_vitl.py \
      --config.tokenizer.path=$DATA/ccvit_centroids_8192 --workdir=$WORKDIR/ccvit_vitl \
      --config.mesh.fsdp=8

Expected result: 86.0 % ImageNet-1k top-1 after fine-tuning (paper, Table 2 / abstract).

Differences from ViT-B (official large script): layer scale 1e-5, the pixel block reads
layer 21 of 24; batch 2048 (32/GPU x update_freq 16 in the official run). FSDP is advisable
(config.mesh.fsdp) for the 300M-parameter model plus AdamW state.
Smoke run: python -m mim_jax.train --config=configs/ccvit_vitl.py:runlocal --workdir=/tmp/l
"""

import os

from mim_jax import config_lib

ccvit_vitb = config_lib.load_module(
  os.path.join(os.path.dirname(os.path.abspath(__file__)), "ccvit_vitb.py")
)


def get_config(arg: str = ""):
  """Same arguments as ccvit_vitb.py (runlocal, epochs=...); the variant is L/16."""
  return ccvit_vitb.get_config(",".join(filter(None, [arg, "variant=L/16"])))
