r"""CAE v2 linear probe (CAE v2 Table 9, MAE's protocol): the frozen cls token, BatchNorm
without affine, LARS (base lr 0.1, lr = 0.1 x batch / 256, momentum 0.9, weight decay 0),
10 warm-up + 80 epochs, RandomResizedCrop + flip views. `:variant=T/16|S/16|B/16|L/16`.

The batch is the official script's 1024 (--use_cls, blr 0.1, bs 1024, 90 epochs;
`Atten4Vis/CAE:project/CAEv2/scripts/caev2_base_300e.sh`); the paper's Table 9 says 16384.
`--config.batch_size=16384` gives the paper's (lr 6.4).

Command:
  python -m mim_jax.evaluate --config=configs/eval/caev2_linear_probe.py:variant=B/16 \
      --config.init=$CKPT --workdir=$WORKDIR/caev2_vitb_lin

Expected result (CAE v2, 300 pre-training epochs, ImageNet-1k linear probe top-1): T 69.3 %,
S 77.5 %, B 80.7 %, L 84.4 %.

Smoke run (2 CPU cores, 32 px Imagenette, precomputed features):
  python -m mim_jax.evaluate --config=configs/eval/caev2_linear_probe.py:runlocal \
      --config.init=random --workdir=/tmp/caev2_lin_smoke
"""

from mim_jax import config_lib
from mim_jax.evaluation import config_base

VARIANTS = ("T/16", "S/16", "B/16", "L/16")


def get_config(arg: str = ""):
  a = config_lib.parse_arg(arg, runlocal=False, variant="B/16")
  if a.variant not in VARIANTS:
    raise ValueError(f"config argument variant must be one of {VARIANTS}, got {a.variant!r}")
  c = config_base.base("linear_probe")
  c.model.variant = a.variant
  c.model.abs_pos = "sincos"
  c.model.rel_pos = "none"
  config_base.lars_probe_recipe(c, pool="cls")
  c.batch_size = 1024  # the official script (paper: 16384)
  config_base.set_epochs(c, 90, warmup_epochs=10)
  c.eval_every = c.checkpoint_every
  if a.runlocal:
    config_base.runlocal_probe(c)
  return c
