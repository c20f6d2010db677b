r"""CCViT ImageNet-1k fine-tuning (CCViT Table 6): ViT-B/16 (default) or `:variant=L/16`.

lr 2e-3, 100 epochs, 20 warm-up, layer decay 0.65, batch 1024, AdamW (0.9, 0.999), wd 0.05,
cosine to 1e-6, label smoothing 0.1, drop path 0.1, RandAugment 9/0.5, random erasing 0.25,
mixup 0.8 / cutmix 1.0, no gradient clipping, relative positions (the shared pre-training
table copied into per-layer tables). Table 6 gives one column; for ViT-L we keep it and only
raise the drop path to 0.2 and the layer decay to 0.8 (BEiT v2's ViT-L values), flagged here
because the CCViT paper does not list them.

Command (a mim_jax CCViT workdir):
  python -m mim_jax.evaluate --config=configs/eval/ccvit_finetune.py \
      --config.init=$WORKDIR/ccvit_vitb --workdir=$WORKDIR/ccvit_vitb_ft

Expected result (CCViT Table 1 / abstract, ImageNet-1k top-1): ViT-B 84.3 % (300 epochs) /
84.4 % (800), ViT-L 86.0 %.

Smoke run (2 CPU cores, 32 px Imagenette, 5 epochs; init from the CCViT smoke run):
  python -m mim_jax.train --config=configs/ccvit_vitb.py:runlocal --workdir=/tmp/ccvit_smoke
  python -m mim_jax.evaluate --config=configs/eval/ccvit_finetune.py:runlocal \
      --config.init=/tmp/ccvit_smoke --workdir=/tmp/ccvit_ft_smoke
"""

from mim_jax import config_lib
from mim_jax.evaluation import config_base

RECIPES = {  # layer decay, drop path
  "B/16": (0.65, 0.1),
  "L/16": (0.8, 0.2),
}


def get_config(arg: str = ""):
  a = config_lib.parse_arg(arg, runlocal=False, variant="B/16")
  if a.variant not in RECIPES:
    raise ValueError(f"config argument variant must be one of {sorted(RECIPES)}, got {a.variant!r}")
  decay, drop_path = RECIPES[a.variant]
  c = config_base.base("finetune")
  c.model.variant = a.variant
  config_base.finetune_recipe(
    c, lr=2e-3, epochs=100, warmup_epochs=20, layer_decay=decay, drop_path=drop_path
  )
  if a.runlocal:
    config_base.runlocal_finetune(c)
  return c
