r"""BEiT v2 ImageNet-1k fine-tuning (BEiT v2 Table 10): ViT-B/16 (default) or `:variant=L/16`.

  B/16: lr 5e-4, 100 epochs, 20 warm-up, layer decay 0.65, drop path 0.1
  L/16: lr 5e-4,  50 epochs,  5 warm-up, layer decay 0.8,  drop path 0.2
  both: batch 1024, AdamW (0.9, 0.999) eps 1e-8, wd 0.05, cosine to 1e-6, label smoothing
  0.1, RandAugment 9/0.5, random erasing 0.25, mixup 0.8 / cutmix 1.0, no gradient clipping;
  per-layer relative position tables copied from the pre-trained shared table (Table 10:
  "shared relative positional embeddings x"), mean pooling + fc_norm, head init 0.001.

Command (a mim_jax BEiT v2 workdir, or the official beitv2_base_patch16_224_pt1k.pth):
  python -m mim_jax.evaluate --config=configs/eval/beitv2_finetune.py --config.init=$CKPT \
      --workdir=$WORKDIR/beitv2_vitb_ft
  python -m mim_jax.evaluate --config=configs/eval/beitv2_finetune.py:variant=L/16 ...

Expected result (BEiT v2 Table 1, ImageNet-1k top-1): ViT-B/16 85.0 % (300 pre-training
epochs) / 85.5 % (1600); ViT-L/16 86.6 % (300) / 87.3 % (1600).

Smoke run (2 CPU cores, 32 px Imagenette, 5 epochs):
  python -m mim_jax.evaluate --config=configs/eval/beitv2_finetune.py:runlocal \
      --config.init=random --workdir=/tmp/beitv2_ft_smoke
"""

from mim_jax import config_lib
from mim_jax.evaluation import config_base

RECIPES = {  # lr, epochs, warm-up epochs, layer decay, drop path
  "B/16": (5e-4, 100, 20, 0.65, 0.1),
  "L/16": (5e-4, 50, 5, 0.8, 0.2),
}


def get_config(arg: str = ""):
  a = config_lib.parse_arg(arg, runlocal=False, variant="B/16")
  if a.variant not in RECIPES:
    raise ValueError(
      f"config argument variant must be one of {sorted(RECIPES)} (BEiT v2 "
      f"Table 10), got {a.variant!r}"
    )
  lr, epochs, warmup, decay, drop_path = RECIPES[a.variant]
  c = config_base.base("finetune")
  c.model.variant = a.variant
  config_base.finetune_recipe(
    c, lr=lr, epochs=epochs, warmup_epochs=warmup, layer_decay=decay, drop_path=drop_path
  )
  if a.runlocal:
    config_base.runlocal_finetune(c)
  return c
