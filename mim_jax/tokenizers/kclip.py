r"""k-CLIP: MaPeT's tokenizer, k-means centroids of CLIP ModifiedResNet layer-4 features.

Official code: `aimagelab/MaPeT:data/kmeans/` (docs/reference_details.md#k-clip-tokens):
CLIP RN50x64, input Resize(448, bicubic, shorter side) -> CenterCrop(448) -> CLIP mean/std;
features = layer-4 output (post-ReLU, before attention pooling), a 14 x 14 x 4096 grid
flattened row-major; plain L2 k-means (faiss, K = 8192, 20 iterations, 5 restarts keeping
the best, at most 512 points per centroid, i.e. ~4.19M patches sampled from all of
ImageNet-train); a token is the nearest centroid. We run the foundation's device-sharded
Lloyd k-means (mim_jax.tokenizers.kmeans) instead of faiss: same objective and iteration
count; `redo` restarts keep the lowest inertia like faiss' nredo.

  python -m mim_jax.tokenizers.kclip --config=configs/kclip_rn50x64.py \
      --config.clip=$DATA/clip/RN50x64.pt --config.data.path=$DATA/imagenet \
      --config.out=$DATA/kclip_rn50x64

A k-CLIP directory holds centroids.npy (K, C) float32 and kclip.json (the CLIP weights it
needs, by path, the view, the k-means settings and inertia). `config.tokenizer.kind='kclip'`
with `path=<dir>` uses it (mim_jax.tokenizers.base.load_tokenizer).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import grain.python as grain
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from ml_collections import config_flags
import numpy as np

from mim_jax import cli
from mim_jax.data import pipeline as data_pipeline
from mim_jax.data import sources as data_sources
from mim_jax.data import transforms
from mim_jax.teachers import clip as clip_lib
from mim_jax.tokenizers import kmeans
from mim_jax.tokenizers.base import Tokenizer
from mim_jax.tokenizers.base import View

META = "kclip.json"
CENTROIDS = "centroids.npy"


class KClipTokenizer:
  """CLIP ResNet layer-4 features -> nearest of K centroids (plain L2)."""

  def __init__(
    self,
    teacher: "clip_lib.CLIPTeacher",
    centroids: np.ndarray,
    *,
    view: View,
    metadata: dict | None = None,
  ):
    if centroids.ndim != 2:
      raise ValueError(f"k-CLIP centroids must be (K, C), got {centroids.shape}")
    self.teacher = teacher
    self.centroids = np.asarray(centroids, np.float32)
    self.view = view
    self.metadata = dict(metadata or {})

  # -------------------------------------------------------------- pure functions
  def features_fn(self):
    teacher = self.teacher

    def fn(clip_params, images_uint8):
      grid = teacher.apply_layer4(clip_params, images_uint8.astype(jnp.float32) / 255.0)
      b, h, w, c = grid.shape
      return grid.reshape(b, h * w, c).astype(jnp.float32)  # row-major, as the reference

    return fn

  def tokenize_fn(self):
    features = self.features_fn()

    def fn(params, images_uint8):
      f = features(params["clip"], images_uint8)
      b, n, c = f.shape
      return kmeans.assign(f.reshape(b * n, c), params["centroids"]).reshape(b, n)

    return fn

  def grid(self) -> tuple[int, int]:
    b = jax.eval_shape(
      self.features_fn(),
      self.teacher.params,
      jax.ShapeDtypeStruct((1, self.view.size, self.view.size, 3), jnp.uint8),
    )
    side = int(round(math.sqrt(b.shape[1])))
    return side, b.shape[1] // side

  def as_tokenizer(self) -> Tokenizer:
    return Tokenizer(
      "kclip",
      self.tokenize_fn(),
      {"clip": self.teacher.params, "centroids": jnp.asarray(self.centroids)},
      codebook_size=self.centroids.shape[0],
      grid=self.grid(),
      view=self.view,
      provenance={k: v for k, v in self.metadata.items() if k not in ("inertia_history",)},
    )

  # -------------------------------------------------------------- files
  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, CENTROIDS + ".tmp.npy")
    np.save(tmp, self.centroids)
    os.replace(tmp, os.path.join(directory, CENTROIDS))
    meta = dict(
      self.metadata,
      view=self.view.to_dict(),
      k=int(self.centroids.shape[0]),
      dim=int(self.centroids.shape[1]),
      clip=self.teacher.spec,
    )
    with open(os.path.join(directory, META + ".tmp"), "w") as f:
      json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(os.path.join(directory, META + ".tmp"), os.path.join(directory, META))

  @classmethod
  def load(cls, directory: str) -> "KClipTokenizer":
    meta_path = os.path.join(directory, META)
    if not os.path.exists(meta_path):
      raise FileNotFoundError(
        f"{directory} is not a k-CLIP tokenizer (no {META}); build one "
        "with `python -m mim_jax.tokenizers.kclip --config=...`"
      )
    with open(meta_path) as f:
      meta = json.load(f)
    centroids = np.load(os.path.join(directory, CENTROIDS))
    spec = meta["clip"]
    if not spec.startswith("random:") and not os.path.isabs(spec):
      spec = os.path.join(directory, spec)
    teacher = clip_lib.CLIPTeacher(spec)
    if centroids.shape[1] != teacher.layer4_channels:
      raise ValueError(
        f"{directory}: centroids have {centroids.shape[1]} dims but the CLIP "
        f"model {meta['clip']} gives {teacher.layer4_channels}-d features"
      )
    return cls(teacher, centroids, view=View.from_dict(meta["view"]), metadata=meta)


# ------------------------------------------------------------------ building
def sample_features(
  teacher,
  source,
  *,
  view: View,
  sample_patches: int,
  batch_size: int,
  seed: int,
  max_images: int = 0,
  worker_count: int = 0,
  log=logging.info,
) -> np.ndarray:
  """An even random sample of layer-4 patch features over (the first max_images of) source:
  ceil(sample_patches / images) random grid cells per image, as the reference's ~1.7 %
  uniform subsample of all ImageNet patches."""
  n_images = len(source) if not max_images else min(max_images, len(source))
  tok = KClipTokenizer(teacher, np.zeros((1, teacher.layer4_channels), np.float32), view=view)
  features = jax.jit(tok.features_fn())
  grid = tok.grid()
  cells = grid[0] * grid[1]
  per_image = min(cells, math.ceil(sample_patches / n_images))
  rng = np.random.default_rng(seed)
  out = np.empty((n_images * per_image, teacher.layer4_channels), np.float32)
  subset = _First(source, n_images)
  loader = data_pipeline.make_eval_loader(
    subset,
    transforms.EvalTransform(view.size, view.resize, view.interpolation),
    global_batch_size=batch_size,
    worker_count=worker_count,
    shard_options=grain.NoSharding(),
  )
  t0, filled = time.time(), 0
  for i, batch in enumerate(loader):
    f = np.asarray(features(teacher.params, batch["image"]))[batch["valid"]]
    for row in f:
      out[filled : filled + per_image] = row[rng.permutation(cells)[:per_image]]
      filled += per_image
    if (i + 1) % 50 == 0:
      done = filled // per_image
      log(f"k-CLIP features: {done}/{n_images} images ({done / (time.time() - t0):.1f} img/s)")
  return out[:filled]


class _First:
  def __init__(self, source, n):
    self._s, self._n = source, n

  def __len__(self):
    return self._n

  def __getitem__(self, i):
    return self._s[int(i)]

  def __repr__(self):
    return f"{self._s!r}[:{self._n}]"


def build(
  teacher,
  source,
  out: str,
  *,
  k: int = 8192,
  iters: int = 20,
  redo: int = 1,
  sample_patches: int = 8192 * 512,
  view: View = View(448, 448),
  batch_size: int = 32,
  seed: int = 1234,
  max_images: int = 0,
  worker_count: int = 0,
  log=logging.info,
) -> KClipTokenizer:
  """Samples features, runs `redo` k-means fits (sharded over all devices), keeps the best."""
  t0 = time.time()
  feats = sample_features(
    teacher,
    source,
    view=view,
    sample_patches=sample_patches,
    batch_size=batch_size,
    seed=seed,
    max_images=max_images,
    worker_count=worker_count,
    log=log,
  )
  if len(feats) < k:
    raise ValueError(
      f"k-CLIP: only {len(feats)} patch features for k={k} centroids; raise "
      "sample_patches / use more images or lower k"
    )
  # The sample is host memory of one process: shard it over that process' devices.
  mesh = Mesh(np.asarray(jax.local_devices()), ("data",))
  best = None
  for r in range(redo):
    res = kmeans.fit(feats, k, iters=iters, seed=seed + r, mesh=mesh)
    inertia = float(res.inertia_history[-1])
    log(f"k-CLIP k-means run {r + 1}/{redo}: inertia {inertia:.4g}")
    if best is None or inertia < best[1]:
      best = (res, inertia)
  res, inertia = best
  meta = {
    "format_version": 1,
    "method": "k-CLIP (aimagelab/MaPeT:data/kmeans/): CLIP ResNet layer-4 features, L2 k-means",
    "iters": iters,
    "redo": redo,
    "seed": seed,
    "num_patches": int(len(feats)),
    "inertia": inertia,
    "inertia_history": [float(x) for x in res.inertia_history],
    "empty_clusters": int((np.asarray(res.counts) == 0).sum()),
    "dataset": repr(source),
    "seconds": round(time.time() - t0, 1),
  }
  tok = KClipTokenizer(teacher, np.asarray(res.centroids), view=view, metadata=meta)
  tok.save(out)
  log(f"k-CLIP tokenizer ({k} x {feats.shape[1]}) written to {out} in {time.time() - t0:.0f}s")
  return tok


def build_from_config(config, source, out: str) -> KClipTokenizer:
  """For `mim_jax.tokenize` with build_if_missing: config.tokenizer carries the settings."""
  t = config.tokenizer
  teacher = clip_lib.CLIPTeacher(t.get("clip", "") or "random:RN50")
  size = int(t.get("clip_image_size", 0) or teacher.image_size)
  return build(
    teacher,
    source,
    out,
    k=t.k,
    iters=t.iters,
    redo=1,
    sample_patches=int(t.get("sample_patches", 0) or t.k * 64),
    view=View(size, size),
    batch_size=config.cache.batch_size,
    seed=config.seed,
    max_images=int(t.get("max_images", 0)),
    worker_count=config.data.worker_count,
  )


# ------------------------------------------------------------------ CLI
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  c = flags.FLAGS.config
  if c is None:
    print("error: --config is required", file=sys.stderr)
    sys.exit(2)
  try:
    if not c.out:
      raise ValueError("config.out is empty: where should the k-CLIP tokenizer go?")
    if not c.clip:
      raise ValueError(
        "config.clip is empty: give the OpenAI RN50x64 checkpoint (RN50x64.pt), "
        "its converted .npz (python -m mim_jax.teachers.clip), or random:<arch>"
      )
    data_sources.validate_data_config(c.data, c.data.split)
    teacher = clip_lib.CLIPTeacher(c.clip)
    source = data_sources.build_source(c.data, c.data.split)
    size = c.image_size or teacher.image_size
    build(
      teacher,
      source,
      c.out,
      k=c.k,
      iters=c.iters,
      redo=c.redo,
      sample_patches=c.sample_patches,
      view=View(size, size),
      batch_size=c.batch_size,
      seed=c.seed,
      max_images=c.max_images,
      worker_count=c.data.worker_count,
    )
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  # Defined here, not at import: this module is imported by processes (the trainer, the
  # token cache) that define their own --config.
  config_flags.DEFINE_config_file("config", None, "k-CLIP build config.", lock_config=True)
  app.run(main, flags_parser=cli.parse)
