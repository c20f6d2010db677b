r"""PeCo BERT pre-training: BEiT-style MIM of ViT-B/16 on PeCo perceptual tokens.

The PeCo code is not public; the paper ("BERT Pre-training Setup") says: the original
ViT-B/16 as in BEiT, 300 / 800 epochs, batch 2048, block-wise masking "with the same setup as
BEiT". So this is BEiT (v1)'s recipe (BEiT paper / unilm beit/): shared relative position
bias, layer scale 0.1, 75 of 196 patches block-masked, CE of final layer -> norm -> lm_head
on the masked positions (no patch aggregation), AdamW lr 1.5e-3, betas (0.9, 0.999), wd
0.05, 10 warm-up epochs, cosine to 1e-5, gradient clipping 3.0, drop path 0.1, ColorJitter 0.4
+ RandomResizedCrop(224, scale (0.08, 1)) + flip, targets from the PeCo tokenizer on the
second view (the same crop; the VQ-VAE takes 224 px). The paper's PeCo-MAE variant (encoder
on visible patches + light decoder) is not implemented yet.

Commands:
  python -m mim_jax.train --config=configs/peco_vqvae.py --config.perceptual.path=... \
      --workdir=$WORKDIR/peco_vqvae                        # the tokenizer first
  python -m mim_jax.train --config=configs/peco_vitb.py \
      --config.tokenizer.path=$WORKDIR/peco_vqvae --workdir=$WORKDIR/peco_vitb_800ep
  python -m mim_jax.train --config=configs/peco_vitb.py:epochs=300 ...

Expected result (PeCo Tables 1-2): ImageNet-1k fine-tuning top-1 84.1 % (300 epochs) /
84.5 % (800 epochs) with ViT-B/16, fine-tuned as the paper says (100 epochs, 20 warm-up to a
peak lr of 4e-3, cosine to 0, layer decay 0.65):
  python -m mim_jax.evaluate --config=configs/eval/finetune.py \
      --config.init=$WORKDIR/peco_vitb_800ep \
      --config.optim.lr=4e-3 --config.optim.min_lr=0 --workdir=$WORKDIR/peco_vitb_ft

Smoke run (2 CPU cores, 32 px, patch 4, a 256-centroid pixel tokenizer standing in):
  python -m mim_jax.train --config=configs/peco_vitb.py:runlocal --workdir=/tmp/peco_mim_smoke
"""

import os

from mim_jax import config_lib

beitv2_vitb = config_lib.load_module(
  os.path.join(os.path.dirname(os.path.abspath(__file__)), "beitv2_vitb.py")
)


def get_config(arg: str = ""):
  a = config_lib.parse_arg(arg, runlocal=False, epochs=800, variant="B/16")
  if a.epochs not in (300, 800):
    raise ValueError(f"config argument epochs must be 300 or 800 (PeCo), got {a.epochs}")
  c = beitv2_vitb.get_config(f"variant={a.variant}")
  c.method.name = "peco_mim"
  c.method.head_layers = 0  # BEiT-style: no patch aggregation
  c.method.early_layers = 0
  c.model.drop_path_rate = 0.1
  c.tokenizer.kind = "peco"
  c.tokenizer.path = ""  # a configs/peco_vqvae.py workdir
  c.data.crop_scale = (0.08, 1.0)
  c.total_steps = config_lib.steps_for_epochs(a.epochs, c.batch_size)
  c.optim.b1, c.optim.b2 = 0.9, 0.999
  if a.runlocal:
    beitv2_vitb.apply_runlocal(c)
    c.method.early_layers = 0
  return c
