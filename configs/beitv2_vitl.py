r"""BEiT v2 ViT-L/16 pre-training on ImageNet-1k with VQ-KD targets (BEiT v2 Table 9).

As configs/beitv2_vitb.py with ViT-L/16: layer scale 1e-5, the patch aggregation reads
layer 21 of 24. FSDP is advisable for the 300M-parameter model plus AdamW state.

Command:
  python -m mim_jax.train --config=configs/beitv2_vitl.py \
      --config.tokenizer.path=$CKPT/vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth \
      --config.mesh.fsdp=8 --workdir=$WORKDIR/beitv2_vitl_300ep

Expected result (BEiT v2 Table 1): ImageNet-1k fine-tuning top-1 86.6 % (300 epochs) /
87.3 % (1600 epochs, `:epochs=1600`), with configs/eval/beitv2_finetune.py:variant=L/16.
Smoke run: python -m mim_jax.train --config=configs/beitv2_vitl.py:runlocal --workdir=/tmp/l
"""

import os

from mim_jax import config_lib

beitv2_vitb = config_lib.load_module(
  os.path.join(os.path.dirname(os.path.abspath(__file__)), "beitv2_vitb.py")
)


def get_config(arg: str = ""):
  """Same arguments as beitv2_vitb.py (runlocal, epochs=300|1600); the variant is L/16."""
  return beitv2_vitb.get_config(",".join(filter(None, [arg, "variant=L/16"])))
