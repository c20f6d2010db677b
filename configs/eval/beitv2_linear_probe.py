r"""BEiT v2 linear probe (BEiT v2 Sec. 4.2, Table 2): the cls token (models with patch
aggregation; mean of the patch tokens otherwise, `:pool=mean`), BatchNorm without affine,
AdamW lr 4e-3, wd 1e-4, 50 epochs, batch 1024, cosine, RandomResizedCrop + flip views.

Command:
  python -m mim_jax.evaluate --config=configs/eval/beitv2_linear_probe.py --config.init=$CKPT \
      --workdir=$WORKDIR/beitv2_vitb_lin
  # features computed once, no augmentation (faster, usually within a point):
  ... --config.probe.precompute_features=True

Expected result (BEiT v2 Table 2): ViT-B/16, 300 pre-training epochs, 80.1 % top-1.

Smoke run (2 CPU cores, 32 px Imagenette, precomputed features):
  python -m mim_jax.evaluate --config=configs/eval/beitv2_linear_probe.py:runlocal \
      --config.init=random --workdir=/tmp/beitv2_lin_smoke
"""

from mim_jax import config_lib
from mim_jax.evaluation import config_base


def get_config(arg: str = ""):
  a = config_lib.parse_arg(arg, runlocal=False, variant="B/16", pool="cls")
  if a.variant not in ("B/16", "L/16"):
    raise ValueError(f"config argument variant must be B/16 or L/16, got {a.variant!r}")
  c = config_base.base("linear_probe")
  c.model.variant = a.variant
  config_base.adamw_probe_recipe(c, pool=a.pool)
  if a.runlocal:
    config_base.runlocal_probe(c)
  return c
