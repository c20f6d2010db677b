r"""Judges tokenizers: codebook usage, perplexity, and token stability (CCViT Tables 4, 11).

  python -m mim_jax.tokenizer_report --tokenizer=centroids:/data/ccvit_centroids_8192 \
      --tokenizer=vqkd:/runs/vqkd_vitb --tokenizer=kclip:/data/kclip_rn50x64 \
      --source=imagefolder --path=/data/imagenet --split=val --num_images=1000 \
      --out=/runs/tokenizer_report

Protocol (CCViT §5.5 / Appendix, Tables 4 and 11): tokens of the clean centre crop are
compared with tokens of a corrupted copy; the table gives the percentage of token positions
whose id is unchanged (over all positions of all images):
  * masking: a random `ratio` of the tokenizer's patches set to black (0) in pixel space
    (the paper does not say the fill value; black is our choice, configurable);
  * Gaussian noise: N(0, sigma^2) added on the 0-255 scale, rounded and clipped;
  * Gaussian blur: per-channel Gaussian filter with standard deviation sigma pixels
    (scipy.ndimage, reflect borders like torchvision's GaussianBlur).
Usage: codes used by the images' clean tokens, their share of the codebook, and the
perplexity exp(H) of the code histogram (K at most; higher = more even use).
Outputs in --out: report.md (the table), report.json, codes_<kind>.png (rows of patches that
share a code: the papers' codebook visualisations).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from absl import app
from absl import flags
import numpy as np

from mim_jax import cli

MASK_RATIOS = (0.1, 0.2, 0.5)
NOISE_SIGMAS = (1.0, 10.0, 25.0)
BLUR_SIGMAS = (0.5, 1.0, 2.0)


# ------------------------------------------------------------------ corruptions (numpy)
def mask_patches(
  images: np.ndarray, grid: tuple[int, int], ratio: float, rng: np.random.Generator, fill: int = 0
) -> np.ndarray:
  """Sets round(ratio * N) random patches of each image's token grid to `fill`."""
  b, h, w, _ = images.shape
  gh, gw = grid
  ph, pw = h // gh, w // gw
  n = gh * gw
  count = int(round(ratio * n))
  out = images.copy()
  for i in range(b):
    for j in rng.permutation(n)[:count]:
      y, x = divmod(int(j), gw)
      out[i, y * ph : (y + 1) * ph, x * pw : (x + 1) * pw] = fill
  return out


def gaussian_noise(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
  noisy = images.astype(np.float32) + rng.normal(0.0, sigma, images.shape).astype(np.float32)
  return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
  from scipy import ndimage  # pylint: disable=g-import-not-at-top

  x = images.astype(np.float32)
  blurred = ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode="reflect")
  return np.clip(np.round(blurred), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ statistics
def usage(ids: np.ndarray, codebook_size: int) -> dict:
  counts = np.bincount(np.asarray(ids).ravel(), minlength=codebook_size).astype(np.float64)
  p = counts / counts.sum()
  nz = p[p > 0]
  return {
    "codes_used": int((counts > 0).sum()),
    "usage_pct": 100.0 * float((counts > 0).mean()),
    "perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
  }


def unchanged_pct(a: np.ndarray, b: np.ndarray) -> float:
  return 100.0 * float((np.asarray(a) == np.asarray(b)).mean())


def tokenize_all(tok, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
  out = []
  for i in range(0, len(images), batch_size):
    chunk = images[i : i + batch_size]
    pad = batch_size - len(chunk)
    if pad:  # one compiled shape
      chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, 0)])
    out.append(np.asarray(tok.tokenize(chunk))[: batch_size - pad])
  return np.concatenate(out)


def evaluate(
  tok,
  images: np.ndarray,
  *,
  seed: int = 0,
  mask_ratios=MASK_RATIOS,
  noise_sigmas=NOISE_SIGMAS,
  blur_sigmas=BLUR_SIGMAS,
  batch_size: int = 64,
) -> dict:
  """Usage + stability of one tokenizer on uint8 images already in its view."""
  rng = np.random.default_rng(seed)
  clean = tokenize_all(tok, images, batch_size)
  row = {
    "tokenizer": tok.kind,
    "codebook_size": tok.codebook_size,
    "num_images": int(len(images)),
    **usage(clean, tok.codebook_size),
  }
  for r in mask_ratios:
    row[f"mask_{r:g}"] = unchanged_pct(
      clean, tokenize_all(tok, mask_patches(images, tok.grid, r, rng), batch_size)
    )
  for s in noise_sigmas:
    row[f"noise_{s:g}"] = unchanged_pct(
      clean, tokenize_all(tok, gaussian_noise(images, s, rng), batch_size)
    )
  for s in blur_sigmas:
    row[f"blur_{s:g}"] = unchanged_pct(
      clean, tokenize_all(tok, gaussian_blur(images, s), batch_size)
    )
  return row, clean


def table_markdown(rows: Sequence[dict]) -> str:
  if not rows:
    return ""
  stab = [k for k in rows[0] if k.startswith(("mask_", "noise_", "blur_"))]
  head = ["tokenizer", "K", "images", "codes used", "usage %", "perplexity"] + [
    k.replace("_", " ") for k in stab
  ]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [
      r.get("name", r["tokenizer"]),
      str(r["codebook_size"]),
      str(r["num_images"]),
      str(r["codes_used"]),
      f"{r['usage_pct']:.1f}",
      f"{r['perplexity']:.1f}",
    ]
    cells += [f"{r[k]:.2f}" for k in stab]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + (
    "\n\nStability columns: % of token ids unchanged; mask = ratio of "
    "patches blacked out, noise = Gaussian sigma on 0-255, blur = "
    "Gaussian sigma in pixels.\n"
  )


def code_grid(
  images: np.ndarray,
  ids: np.ndarray,
  grid: tuple[int, int],
  *,
  num_codes: int = 12,
  per_code: int = 12,
  seed: int = 0,
  patch_px: int = 32,
) -> np.ndarray:
  """uint8 picture: one row per code (the most frequent ones, titled with the code and its
  count), patches that share it."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from mim_jax import visual  # pylint: disable=g-import-not-at-top

  b, h, w, _ = images.shape
  gh, gw = grid
  ph, pw = h // gh, w // gw
  flat = ids.reshape(b, gh * gw)
  counts = np.bincount(flat.ravel())
  codes = np.argsort(-counts, kind="stable")[:num_codes]
  codes = codes[counts[codes] > 0]
  rng = np.random.default_rng(seed)
  rows = []
  for code in codes:
    where = np.argwhere(flat == code)
    pick = where[rng.permutation(len(where))[:per_code]]
    patches = []
    for i, j in pick:
      y, x = divmod(int(j), gw)
      patch = images[i, y * ph : (y + 1) * ph, x * pw : (x + 1) * pw]
      patches.append(np.asarray(Image.fromarray(patch).resize((patch_px, patch_px), Image.NEAREST)))
    rows.append((f"code {int(code)} ({int(counts[code])} patches)", np.stack(patches)))
  return visual.labelled_grid(rows, None, cell=patch_px, title="patches that share a code")


# ------------------------------------------------------------------ CLI
flags.DEFINE_multi_string(
  "tokenizer",
  [],
  "kind:path, repeatable (kinds: centroids, vqkd, "
  "peco, kclip); kind:path@size for centroids at another image size",
)
flags.DEFINE_string(
  "source",
  "",
  "npz | imagefolder | tfds | embedded (default: "
  "../shared/data/imagenette2_32.npz when present, else embedded)",
)
flags.DEFINE_string("path", "", "npz file or imagefolder root")
flags.DEFINE_string("name", "imagenet2012", "tfds name")
flags.DEFINE_string("split", "test", "split to read")
flags.DEFINE_integer("num_images", 1000, "images evaluated (the first N of a seeded shuffle)")
flags.DEFINE_integer("seed", 0, "seed of the image choice and the corruptions")
flags.DEFINE_string("out", "", "output directory")
flags.DEFINE_integer("batch_size", 64, "tokenizer batch size")


def _images_for(tok, source, indices) -> np.ndarray:
  return np.stack([tok.view.apply(source[int(i)]["image"]) for i in indices])


def run(
  specs: Sequence[str],
  source,
  *,
  num_images: int,
  seed: int,
  out: str,
  batch_size: int = 64,
  log=print,
) -> list[dict]:
  import ml_collections as mlc  # pylint: disable=g-import-not-at-top

  from mim_jax.tokenizers import base as tok_base  # pylint: disable=g-import-not-at-top

  if not specs:
    raise ValueError("--tokenizer: give at least one kind:path")
  parsed = []
  for spec in specs:
    kind, _, path = spec.partition(":")
    path, _, size = path.partition("@")
    if kind not in tok_base.KINDS or not path:
      raise ValueError(f"--tokenizer={spec!r}: expected kind:path with kind in {tok_base.KINDS}")
    parsed.append((kind, path, int(size) if size else None))
  os.makedirs(out, exist_ok=True)
  indices = np.random.default_rng(seed).permutation(len(source))[:num_images]
  rows = []
  for kind, path, size in parsed:
    tok = tok_base.load_tokenizer(mlc.ConfigDict({"kind": kind, "path": path}), size)
    images = _images_for(tok, source, indices)
    row, clean = evaluate(tok, images, seed=seed, batch_size=batch_size)
    row["name"] = f"{kind}:{os.path.basename(os.path.normpath(path))}"
    rows.append(row)
    png = os.path.join(out, f"codes_{kind}_{len(rows)}.png")
    from PIL import Image  # pylint: disable=g-import-not-at-top

    Image.fromarray(code_grid(images, clean, tok.grid, seed=seed)).save(png)
    log(f"{row['name']}: {json.dumps({k: v for k, v in row.items() if k != 'name'})}")
  with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(rows, f, indent=1)
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write(table_markdown(rows))
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import ml_collections as mlc  # pylint: disable=g-import-not-at-top

  from mim_jax import config_lib  # pylint: disable=g-import-not-at-top
  from mim_jax.data import sources  # pylint: disable=g-import-not-at-top

  f = flags.FLAGS
  if not f.out:
    print("error: --out is required", file=sys.stderr)
    sys.exit(2)
  kind, path, split = f.source, f.path, f.split
  if not kind:
    npz = config_lib.shared_npz()
    kind, path = ("npz", npz) if npz else ("embedded", "")
  cfg = mlc.ConfigDict(
    {"source": kind, "path": path, "name": f.name, "split": split, "data_dir": "", "length": 1024}
  )
  try:
    source = sources.build_source(cfg, split)
    rows = run(
      f.tokenizer, source, num_images=f.num_images, seed=f.seed, out=f.out, batch_size=f.batch_size
    )
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)
  print(table_markdown(rows))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse)
