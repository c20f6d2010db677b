r"""Linear probe (BEiT v2 Sec. 4.2 / MaPeT App. 8 recipe by default; CAE v2's LARS recipe
with `:optimizer=lars`).

Frozen encoder -> image feature (mean of the final patch tokens, or the cls token with
`:pool=cls`) -> BatchNorm without affine (CAE v2 / MAE) -> Linear, trained on
RandomResizedCrop + flip views; evaluated on Resize 256 -> CenterCrop 224.
  * adamw (default): lr 4e-3, weight decay 1e-4, 50 epochs, batch 1024, cosine to 0.
  * lars: base lr 0.1 (lr = 0.1 * batch / 256 = 6.4), weight decay 0, momentum 0.9,
    batch 16384, 10 warm-up + 80 epochs (CAE v2 Table 9).

Command:
  python -m mim_jax.evaluate --config=configs/eval/linear_probe.py --config.init=$CKPT \
      --workdir=$WORKDIR/probe
  python -m mim_jax.evaluate --config=configs/eval/linear_probe.py:optimizer=lars,pool=cls ...
  # faster, no augmentation: features computed once
  ... --config.probe.precompute_features=True

Expected result: the papers' per-method numbers are in configs/eval/{beitv2,mapet,caev2}_*.py
(e.g. BEiT v2 ViT-B/16 300 epochs: 80.1 %, Table 2).

Smoke run on 2 CPU cores (32 px Imagenette, features precomputed, 30 epochs of the head):
  python -m mim_jax.evaluate --config=configs/eval/linear_probe.py:runlocal \
      --config.init=/tmp/ccvit_smoke --workdir=/tmp/probe_smoke
"""

from mim_jax import config_lib
from mim_jax.evaluation import config_base


def get_config(arg: str = ""):
  a = config_lib.parse_arg(arg, runlocal=False, variant="B/16", pool="mean", optimizer="adamw")
  c = config_base.base("linear_probe")
  c.model.variant = a.variant
  if a.optimizer == "lars":
    config_base.lars_probe_recipe(c, pool=a.pool)
  elif a.optimizer == "adamw":
    config_base.adamw_probe_recipe(c, pool=a.pool)
  else:
    raise ValueError(f"config argument optimizer must be 'adamw' or 'lars', got {a.optimizer!r}")
  if a.runlocal:
    config_base.runlocal_probe(c)
  return c
