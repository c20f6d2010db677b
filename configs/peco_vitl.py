r"""PeCo BERT pre-training of ViT-L/16 on PeCo perceptual tokens, 800 epochs.

As configs/peco_vitb.py with ViT-L/16 (layer scale 1e-5, as BEiT's large models). FSDP is
advisable for the 300M-parameter model plus AdamW state.

Command:
  python -m mim_jax.train --config=configs/peco_vitl.py \
      --config.tokenizer.path=$WORKDIR/peco_vqvae --config.mesh.fsdp=8 \
      --workdir=$WORKDIR/peco_vitl_800ep

Expected result (PeCo Table 1): 86.5 % ImageNet-1k top-1 after fine-tuning
(configs/eval/finetune.py:variant=L/16).
Smoke run: python -m mim_jax.train --config=configs/peco_vitl.py:runlocal --workdir=/tmp/l
"""

import os

from mim_jax import config_lib

peco_vitb = config_lib.load_module(
  os.path.join(os.path.dirname(os.path.abspath(__file__)), "peco_vitb.py")
)


def get_config(arg: str = ""):
  """Same arguments as peco_vitb.py (runlocal, epochs=300|800); the variant is L/16."""
  return peco_vitb.get_config(",".join(filter(None, [arg, "variant=L/16"])))
