r"""MaPeT linear probe (MaPeT Sec. 5 / App. 8, following BEiT v2): a linear head on the
average of the frozen final patch tokens (MaPeT has no patch aggregation), BatchNorm
without affine, AdamW lr 4e-3, weight decay 1e-4, 50 epochs, batch 1024, cosine decay.
`:variant=T/16|S/16|B/16`.

Command:
  python -m mim_jax.evaluate --config=configs/eval/mapet_linear_probe.py:variant=S/16 \
      --config.init=$WORKDIR/mapet_vits --workdir=$WORKDIR/mapet_vits_lin

Expected result (MaPeT Table 2, ImageNet-1k linear probe top-1): k-CLIP tokens T 62.5 %,
S 71.6 %, B 73.5 %; VQ-KD tokens T 59.6 %, S 69.8 %, B 73.8 %.

Smoke run (2 CPU cores, 32 px Imagenette, precomputed features):
  python -m mim_jax.evaluate --config=configs/eval/mapet_linear_probe.py:runlocal \
      --config.init=random --workdir=/tmp/mapet_lin_smoke
"""

from mim_jax import config_lib
from mim_jax.evaluation import config_base

VARIANTS = ("T/16", "S/16", "B/16")


def get_config(arg: str = ""):
  a = config_lib.parse_arg(arg, runlocal=False, variant="B/16")
  if a.variant not in VARIANTS:
    raise ValueError(f"config argument variant must be one of {VARIANTS}, got {a.variant!r}")
  c = config_base.base("linear_probe")
  c.model.variant = a.variant
  config_base.adamw_probe_recipe(c, pool="mean")
  if a.runlocal:
    config_base.runlocal_probe(c)
  return c
