r"""Builds CCViT's centroid tokenizer: k-means on [0, 1] pixel patches.

The official code (`Cakeyan/CCViT_Public:train_faiss_kmeans.py`,
docs/reference_details.md#ccvit-centroid-tokenizer) clusters 50 images per
ImageNet class, Resize(256, bicubic) -> CenterCrop(224) -> [0, 1], 16x16
patches in (c, y, x) order, K = 8192, 20 iterations, seed 1:

  python -m mim_jax.tokenizers.build_centroids --source=imagefolder \
      --path=/data/imagenet/train --images_per_class=50 --k=8192 --iters=20 \
      --patch_size=16 --image_size=224 --seed=1 --out=runs/ccvit/centroids

Sources: `npz` (x_train / y_train uint8 HWC), `imagefolder` (root/<class>/*.JPEG
or *.png) and `embedded` (scikit-learn's two sample photos, random crops; a
demo that needs no data). Writes `<out>.npy` and `<out>.json`.

The loading here is deliberately minimal (PIL + numpy) and independent of
`mim_jax.data`.
"""

import math
import os
import sys
import time
from typing import Optional

import jax
from jax.sharding import Mesh
import numpy as np
from PIL import Image

from mim_jax import cli
from mim_jax.data import transforms
from mim_jax.tokenizers import centroids as centroids_lib
from mim_jax.tokenizers import kmeans

SOURCES = ("npz", "imagefolder", "embedded")
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


class BuildError(ValueError):
  """A bad argument or unusable input data (reported without a traceback)."""


def resize_center_crop(image, image_size: int) -> np.ndarray:
  """Resize(shorter side to image_size / 0.875, bicubic) -> CenterCrop(image_size), uint8 HWC.

  The reference's 256 -> 224 at its size (timm's crop_pct 0.875 otherwise); the crop
  arithmetic is torchvision's, shared with the data pipeline.
  """
  if isinstance(image, Image.Image):
    image = image.convert("RGB")
  return transforms.resize_center_crop(
    image, image_size, resize_size=int(math.floor(image_size / 0.875))
  )


def _chosen(count: int, per_class: int, seed: int) -> np.ndarray:
  """`per_class` of `count` indices; re-seeded per class like the reference."""
  rng = np.random.default_rng(seed)
  return rng.choice(count, min(per_class, count), replace=False)


def load_npz(path: str, images_per_class: int, image_size: int, seed: int):
  with np.load(path, allow_pickle=False) as data:
    for key in ("x_train", "y_train"):
      if key not in data:
        raise BuildError(f"{path} has no {key!r} array (found {sorted(data.keys())})")
    images, labels = data["x_train"], data["y_train"]
  picked = []
  for label in np.unique(labels):
    rows = np.flatnonzero(labels == label)
    picked.extend(rows[_chosen(rows.size, images_per_class, seed)])
  out = np.stack([resize_center_crop(Image.fromarray(images[i]), image_size) for i in picked])
  return out, f"npz {path} (x_train, {np.unique(labels).size} classes)"


def load_imagefolder(root: str, images_per_class: int, image_size: int, seed: int):
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  if not classes:
    raise BuildError(f"{root} has no class sub-folders (expected root/<class>/*.JPEG)")
  out = []
  for name in classes:
    folder = os.path.join(root, name)
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(_IMAGE_SUFFIXES))
    for i in _chosen(len(files), images_per_class, seed):
      with Image.open(os.path.join(folder, files[i])) as image:
        out.append(resize_center_crop(image, image_size))
  if not out:
    raise BuildError(f"no .JPEG/.jpg/.png images under {root}/<class>/")
  return np.stack(out), f"imagefolder {root} ({len(classes)} classes)"


def load_embedded(images_per_class: int, image_size: int, seed: int):
  """Random square crops of scikit-learn's two sample photos (each photo a 'class')."""
  from sklearn.datasets import load_sample_images  # only this demo source needs it

  rng = np.random.default_rng(seed)
  out = []
  for photo in load_sample_images().images:
    height, width = photo.shape[:2]
    short = min(height, width)
    for _ in range(images_per_class):
      side = int(rng.integers(short // 4, short, endpoint=True))
      top = int(rng.integers(0, height - side, endpoint=True))
      left = int(rng.integers(0, width - side, endpoint=True))
      crop = Image.fromarray(photo[top : top + side, left : left + side])
      out.append(resize_center_crop(crop, image_size))
  return np.stack(out), "embedded: scikit-learn sample images (china.jpg, flower.jpg), random crops"


def fit_codebook(
  images: np.ndarray,
  *,
  k: int,
  iters: int,
  patch_size: int,
  seed: int,
  images_per_class: int,
  description: str,
  chunk_size: int = kmeans.DEFAULT_CHUNK_SIZE,
  reseed_empty: bool = True,
  log=print,
) -> centroids_lib.CentroidTokenizer:
  """k-means over the (c, y, x) patches of uint8 NHWC centre crops, on all local devices."""
  image_size = int(images.shape[1])
  # uint8 patches keep host memory at a quarter of float32 (7.5 GB for the
  # reference's 9.8 M patches); Lloyd's algorithm commutes with scaling, so the
  # centroids are divided by 255 afterwards instead of the pixels before.
  patches = centroids_lib.patchify(images, patch_size).reshape(-1, 3 * patch_size * patch_size)
  log(
    f"{len(images)} images -> {patches.shape[0]} patches of {patches.shape[1]} values "
    f"({description})"
  )
  if k > patches.shape[0]:
    raise BuildError(f"k={k} exceeds the number of patches ({patches.shape[0]})")

  mesh = Mesh(np.asarray(jax.local_devices()), ("data",))
  log(f"k-means: k={k}, iters={iters}, {mesh.size} device(s) ({jax.local_devices()[0].platform})")

  def progress(iteration, inertia, seconds):
    log(f"  iteration {iteration:3d}  inertia {inertia / 255.0**2:.6g}  {seconds:.1f}s")

  result = kmeans.fit(
    patches,
    k,
    iters=iters,
    seed=seed,
    chunk_size=chunk_size,
    mesh=mesh,
    reseed_empty=reseed_empty,
    callback=progress,
  )
  empty = int(np.sum(result.counts == 0))
  metadata = dict(
    image_size=image_size,
    num_images=int(len(images)),
    num_patches=int(patches.shape[0]),
    images_per_class=images_per_class,
    iterations=iters,
    seed=seed,
    dataset=description,
    preprocessing=f"Resize({int(math.floor(image_size / 0.875))}, bicubic) -> "
    f"CenterCrop({image_size}) -> [0, 1]",
    init="random distinct points (jax.random.key(seed))",
    reseed_empty=reseed_empty,
    inertia_history=[float(v) / 255.0**2 for v in result.inertia_history],
    empty_clusters=empty,
  )
  return centroids_lib.CentroidTokenizer(
    np.asarray(result.centroids) / 255.0, patch_size, metadata=metadata
  )


def build(
  source: str,
  out: str,
  path: Optional[str] = None,
  images_per_class: int = 50,
  k: int = 8192,
  iters: int = 20,
  patch_size: int = 16,
  image_size: int = 224,
  seed: int = 1,
  chunk_size: int = kmeans.DEFAULT_CHUNK_SIZE,
  reseed_empty: bool = True,
  log=print,
) -> centroids_lib.CentroidTokenizer:
  """Loads the images, clusters their patches over all local devices, saves `out`.

  `reseed_empty` (default on) moves empty clusters onto far points each
  iteration: faiss, which the reference used, never leaves a cluster empty
  either (it splits a large one), and duplicate patches in the random init
  would otherwise waste tokens.
  """
  if source not in SOURCES:
    raise BuildError(f"source={source!r} must be one of {SOURCES}")
  if source != "embedded":
    if not path:
      raise BuildError(f"source={source} needs --path")
    if not os.path.exists(path):
      raise BuildError(f"--path {path} does not exist")
  if image_size % patch_size:
    raise BuildError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
  if images_per_class < 1 or k < 1 or iters < 0:
    raise BuildError(
      f"need images_per_class >= 1, k >= 1, iters >= 0 (got {images_per_class}, {k}, {iters})"
    )

  start = time.perf_counter()
  if source == "npz":
    images, description = load_npz(path, images_per_class, image_size, seed)
  elif source == "imagefolder":
    images, description = load_imagefolder(path, images_per_class, image_size, seed)
  else:
    images, description = load_embedded(images_per_class, image_size, seed)
  log(f"{len(images)} images ({description}); {time.perf_counter() - start:.1f}s")
  tokenizer = fit_codebook(
    images,
    k=k,
    iters=iters,
    patch_size=patch_size,
    seed=seed,
    images_per_class=images_per_class,
    description=description,
    chunk_size=chunk_size,
    reseed_empty=reseed_empty,
    log=log,
  )
  npy_path, json_path = tokenizer.save(out)
  log(
    f"wrote {npy_path} and {json_path} "
    f"({tokenizer.metadata['empty_clusters']} empty clusters); "
    f"{time.perf_counter() - start:.1f}s in all"
  )
  return tokenizer


def _define_flags():
  # Defined only when run as a command, so importing this module never
  # registers generic names like --k or --seed in the global absl FLAGS.
  from absl import flags

  flags.DEFINE_enum("source", "npz", list(SOURCES), "Where the images come from.")
  flags.DEFINE_string("path", None, "npz file or ImageFolder root (unused for 'embedded').")
  flags.DEFINE_integer("images_per_class", 50, "Images drawn per class (per photo for 'embedded').")
  flags.DEFINE_integer("k", 8192, "Number of centroids.")
  flags.DEFINE_integer("iters", 20, "Lloyd iterations.")
  flags.DEFINE_integer("patch_size", 16, "Patch size in pixels.")
  flags.DEFINE_integer("image_size", 224, "Centre-crop size.")
  flags.DEFINE_integer("seed", 1, "Seeds the image choice and the k-means init.")
  flags.DEFINE_integer("chunk_size", kmeans.DEFAULT_CHUNK_SIZE, "Points per distance block.")
  flags.DEFINE_bool("reseed_empty", True, "Move empty clusters onto far points each iteration.")
  flags.DEFINE_string("out", None, "Output prefix: writes <out>.npy and <out>.json.")
  flags.mark_flag_as_required("out")
  return flags.FLAGS


def main(argv):
  del argv
  from absl import flags

  f = flags.FLAGS
  build(
    f.source,
    f.out,
    path=f.path,
    images_per_class=f.images_per_class,
    k=f.k,
    iters=f.iters,
    patch_size=f.patch_size,
    image_size=f.image_size,
    seed=f.seed,
    chunk_size=f.chunk_size,
    reseed_empty=f.reseed_empty,
    log=lambda message: print(message, flush=True),
  )


if __name__ == "__main__":
  from absl import app

  _define_flags()
  try:
    app.run(main, flags_parser=cli.parse)
  except BuildError as e:  # argument or data problems: one line, no traceback
    print(f"build_centroids: error: {e}", file=sys.stderr)
    sys.exit(2)
