r"""Does CCViT pre-training learn? Pre-train a small ViT on real images, then linear-probe it.

  python benchmarks/learning_signal.py --steps=1500 --out=BENCHMARKS.md

CCViT (configs/ccvit_vitb.py:runlocal geometry: 32 px, patch 4, block mask + replaced
patches rescaled to the 8x8 grid, a 256-centroid codebook built from the training images)
on ../shared/data/imagenette2_32.npz through the real trainer, for a wall-clock budget of at
most ~10 minutes on 2 CPU cores. Then a linear probe (logistic regression on standardised,
mean-pooled final-layer patch features) is fitted on the 9,469 training images and scored
on the full 3,925-image test split, for the pre-trained encoder (read from the workdir by
`mim_jax.evaluation.backbones.load_workdir`, the evaluation's own loader) and for a randomly
initialised encoder of the same architecture (seed config.seed).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mim_jax import config_lib  # noqa: E402
from mim_jax import train  # noqa: E402
from mim_jax.evaluation import backbones  # noqa: E402
from mim_jax.evaluation import extract  # noqa: E402
from mim_jax.models import vit  # noqa: E402

import bench_util  # noqa: E402  (benchmarks/, first on sys.path)


def _config(args):
  c = config_lib.load_config("ccvit_vitb", "runlocal")
  c.data.source, c.data.path, c.data.split = "npz", args.npz, "train"
  c.model.width, c.model.depth, c.model.heads = args.width, args.depth, args.heads
  c.method.early_layers = max(1, args.depth * 3 // 4)
  c.batch_size = args.batch_size
  c.total_steps = args.steps
  c.optim.warmup_steps = max(1, args.steps // 20)
  c.optim.lr = args.lr
  c.optim.b2 = 0.98
  c.log_every = 50
  c.checkpoint_every = args.steps
  c.tokenizer.images_per_class = 100
  return c


def _features(params, vit_kw: dict, images_uint8: np.ndarray, batch_size: int = 256):
  """Mean-pooled final-layer patch features (after the final norm) of uint8 NHWC images."""
  run = jax.jit(extract.encoder_fn(vit_kw, "mean"))
  feats = []
  for i in range(0, len(images_uint8), batch_size):
    chunk = images_uint8[i : i + batch_size]
    pad = batch_size - len(chunk)
    if pad:  # one compiled shape for every batch
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    feats.append(np.asarray(run(params, chunk))[: batch_size - pad])
  return np.concatenate(feats)


def _logistic_probe(train_x, train_y, test_x, test_y, *, max_iter: int = 2000) -> float:
  """Top-1 of multinomial logistic regression on standardised features (scikit-learn)."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.pipeline import make_pipeline  # pylint: disable=g-import-not-at-top
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top

  clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
  clf.fit(train_x, train_y)
  return float((clf.predict(test_x) == test_y).mean())


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--npz", default=os.path.join(ROOT, "..", "shared", "data", "imagenette2_32.npz"))
  p.add_argument("--workdir", default="/tmp/mim_jax_learning_signal")
  p.add_argument("--steps", type=int, default=1500)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--width", type=int, default=192)
  p.add_argument("--depth", type=int, default=6)
  p.add_argument("--heads", type=int, default=3)
  p.add_argument("--lr", type=float, default=1.5e-3)
  p.add_argument("--out", default="", help="append the markdown result to this file")
  args = p.parse_args()
  if not os.path.exists(args.npz):
    sys.exit(f"error: --npz {args.npz} does not exist (see ../shared/data/README.md)")
  subprocess.run(["rm", "-rf", args.workdir], check=True)
  config = _config(args)

  t0 = time.time()
  last = train.train_and_evaluate(config, args.workdir)
  train_s = time.time() - t0

  data = np.load(args.npz)
  xtr, ytr, xte, yte = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
  trained, spec = backbones.load_workdir(args.workdir)
  step = config.total_steps
  vit_kw = spec.vit_kwargs()
  random = vit.VisionTransformer(**vit_kw).init(
    jax.random.PRNGKey(config.seed), np.zeros((1, 32, 32, 3), np.float32)
  )["params"]

  rows = []
  for name, params in (("random init", random), (f"CCViT, {step} steps", trained)):
    t1 = time.time()
    ftr = _features(params, vit_kw, xtr)
    fte = _features(params, vit_kw, xte)
    acc = _logistic_probe(ftr, ytr, fte, yte)
    rows.append((name, acc, time.time() - t1))
    print(f"{name}: linear probe top-1 {acc:.4f}")
  gain = 100 * (rows[1][1] - rows[0][1])
  cmd = "python " + " ".join(sys.argv)
  table = (
    [
      f"### CCViT learning signal ({datetime.date.today().isoformat()})",
      "",
      f"Command: `{cmd}`  ",
      f"Machine: {bench_util.machine()}; JAX {jax.__version__}, backend {jax.default_backend()}.  ",
      f"Model: ViT width {args.width}, depth {args.depth}, heads {args.heads}, patch 4, "
      f"32 px; batch {args.batch_size}, {step} steps "
      f"({step * args.batch_size / len(xtr):.1f} epochs of the 9,469 train images), "
      f"pre-training wall time {train_s / 60:.1f} min (codebook + compile included); "
      f"last logged: loss_token {last.get('loss_token', float('nan')):.3f}, "
      f"loss_pixel {last.get('loss_pixel', float('nan')):.3f}, "
      f"token_acc {last.get('token_acc', float('nan')):.3f}, "
      f"{last.get('img_per_s', float('nan')):.0f} img/s.",
      "",
      "| backbone | linear probe top-1 (3,925 test images) |",
      "| --- | --- |",
    ]
    + [f"| {n} | {100 * a:.2f} % |" for n, a, _ in rows]
    + [
      "",
      f"Gain from pre-training: **{gain:+.2f} points** (standard error of one probe ~0.8 "
      "points). Probe: scikit-learn LogisticRegression on standardised mean-pooled "
      "final-layer patch features.",
      "",
    ]
  )
  text = "\n".join(table)
  print(text)
  if args.out:
    with open(args.out, "a") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
