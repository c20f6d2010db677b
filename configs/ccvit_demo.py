r"""The `make demo` job: CCViT on a small ViT over photos embedded in installed packages.

  python -m mim_jax.train --config=configs/ccvit_demo.py --workdir=runs/demo

Needs no data at all (scikit-learn / matplotlib ship the photos). ~3 minutes on 2 CPU
cores: builds a 256-centroid codebook, trains a 4-layer width-128 ViT (patch 8, 64 px)
for 300 steps, writes runs/demo/metrics.jsonl, TensorBoard events, checkpoints and
runs/demo/visualization.png (rows: input, masked (grey) + replaced (centroids) input,
centroids of the predicted tokens, the tokenizer's own reconstruction).
Expected: loss_token falls from ~5.5 (ln 256) towards ~3 and token_acc rises above 0.1.
"""

import os

from mim_jax import config_lib

ccvit_vitb = config_lib.load_module(
  os.path.join(os.path.dirname(os.path.abspath(__file__)), "ccvit_vitb.py")
)


def get_config(arg: str = ""):
  c = ccvit_vitb.get_config("runlocal")
  c.data.source, c.data.path = "embedded", ""
  c.data.image_size = c.data.second_image_size = 64
  c.model.variant = "T/8"
  n = (64 // 8) ** 2
  c.method.num_masked = round(75 / 196 * n)
  c.method.num_replaced = round(20 / 196 * n)
  c.method.min_block = max(1, round(16 / 196 * n))
  c.total_steps = 300
  c.log_every = 20
  c.checkpoint_every = 100
  c.optim.warmup_steps = 20
  c.vis_every = 100
  del arg
  return c
