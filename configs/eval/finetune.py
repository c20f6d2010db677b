r"""Fine-tuning with the BEiT protocol (BEiT v2 Table 10, ViT-B/16 column by default).

Per-layer relative position tables copied from the pre-trained shared table (resized when
the grid changes), mean pooling + fc_norm, head init scale 0.001, layer-wise lr decay 0.65,
AdamW lr 5e-4 (batch 1024), betas (0.9, 0.999), weight decay 0.05, 100 epochs with 20
warm-up, cosine to 1e-6, drop path 0.1, label smoothing 0.1, RandAugment(9, 0.5), random
erasing 0.25, mixup 0.8 / cutmix 1.0 (switch 0.5), no gradient clipping.

Command:
  python -m mim_jax.evaluate --config=configs/eval/finetune.py --config.init=$CKPT \
      --workdir=$WORKDIR/finetune
  # weight EMA (timm ModelEmaV2), evaluated beside the raw weights:
  ... --config.ema_decay=0.9999

Expected result: BEiT v2 ViT-B/16 (300 pre-training epochs) 85.0 % top-1 (Table 1); the
other papers' recipes and numbers are in configs/eval/{beitv2,mapet,caev2,ccvit}_finetune.py.

Smoke run on 2 CPU cores (32 px Imagenette, 5 epochs at batch 64, the recipe's augmentation,
layer decay 0.75 for a 4-block encoder, lr 1e-3):
  python -m mim_jax.evaluate --config=configs/eval/finetune.py:runlocal \
      --config.init=/tmp/ccvit_smoke --workdir=/tmp/finetune_smoke
"""

from mim_jax import config_lib
from mim_jax.evaluation import config_base


def get_config(arg: str = ""):
  a = config_lib.parse_arg(arg, runlocal=False, variant="B/16")
  c = config_base.base("finetune")
  c.model.variant = a.variant
  config_base.finetune_recipe(
    c, lr=5e-4, epochs=100, warmup_epochs=20, layer_decay=0.65, drop_path=0.1
  )
  if a.runlocal:
    config_base.runlocal_finetune(c)
  return c
