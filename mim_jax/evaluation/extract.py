"""Frozen-encoder features over a whole split, on the device mesh.

One ordered pass of `pipeline.make_eval_loader` (Resize -> CenterCrop, padding rows marked
invalid), the batch split over the mesh's data axes, the encoder applied in one jitted
function, and the valid rows gathered back to every process (so kNN and a precomputed probe
see all features on every host).
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from mim_jax import sharding
from mim_jax.data import pipeline
from mim_jax.data import transforms
from mim_jax.evaluation import linear_probe
from mim_jax.models import vit


def encoder_fn(
  vit_kw: dict, pool: str, *, mean=transforms.IMAGENET_MEAN, std=transforms.IMAGENET_STD
) -> Callable:
  """features(params, images_uint8) -> (B, D) fp32 pooled features (eval mode)."""
  model = vit.VisionTransformer(**vit_kw)
  dtype = vit_kw.get("dtype", jnp.float32)

  def fn(params, images):
    x = transforms.normalize(images, mean, std, dtype=jnp.float32).astype(dtype)
    return linear_probe.pool_features(model.apply({"params": params}, x, train=False), pool)

  return fn


def gather(x: jax.Array) -> np.ndarray:
  """A batch-sharded global array as one host numpy array on every process."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def eval_transform(image_size: int, resize_size: int, interpolation: str = "bicubic"):
  return transforms.EvalTransform(image_size, resize_size or None, interpolation)


def extract_features(
  fn: Callable,
  params,
  source,
  mesh,
  *,
  batch_size: int,
  image_size: int,
  resize_size: int,
  interpolation: str = "bicubic",
  worker_count: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
  """(features (N, D) fp32, labels (N,)) of every example of `source`, in some order
  shared by both arrays."""
  loader = pipeline.make_eval_loader(
    source,
    eval_transform(image_size, resize_size, interpolation),
    global_batch_size=batch_size,
    worker_count=worker_count,
  )
  batch_sh = sharding.batch_sharding(mesh)
  jitted = jax.jit(fn, out_shardings=batch_sh)
  feats, labels = [], []
  with jax.set_mesh(mesh):
    for local in loader:
      batch = sharding.global_batch({k: local[k] for k in ("image", "label", "valid")}, mesh)
      out = gather(jitted(params, batch["image"]))
      valid = gather(batch["valid"]).astype(bool)
      feats.append(out[valid])
      labels.append(gather(batch["label"])[valid])
  loader.close()
  return np.concatenate(feats).astype(np.float32), np.concatenate(labels).astype(np.int32)
