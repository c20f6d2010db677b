"""CCViT's centroid tokenizer: k-means centroids of raw pixel patches.

A token is the index of the nearest centroid (squared L2) of a [0, 1] pixel
patch flattened in (channel, y, x) order, the layout of
`Cakeyan/CCViT_Public:train_faiss_kmeans.py`
(docs/reference_details.md#ccvit-centroid-tokenizer); the centroid
itself is a patch, so tokens map back to pixels (used by centroid replacing).

Inside a jitted train step use the pure functions `image_tokens` and
`token_pixels` with the centroid array as an argument; the class wraps them
with the centroids and the metadata saved beside them.
"""

import datetime
import json
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.tokenizers import kmeans

PATCH_ORDER = "cyx"
_FORMAT_VERSION = 1


def patchify(images, patch_size: int):
  """(B, H, W, C) images -> (B, N, C*p*p) patches, row-major patches, (c, y, x) inside.

  Works on numpy and JAX arrays alike (returns the same kind) and under jit.
  """
  batch, height, width, channels = images.shape
  if height % patch_size or width % patch_size:
    raise ValueError(f"image size {height}x{width} is not a multiple of patch_size={patch_size}")
  grid_h, grid_w = height // patch_size, width // patch_size
  patches = images.reshape(batch, grid_h, patch_size, grid_w, patch_size, channels)
  patches = patches.transpose(0, 1, 3, 5, 2, 4)  # (B, gh, gw, C, py, px)
  return patches.reshape(batch, grid_h * grid_w, channels * patch_size * patch_size)


def unpatchify(patches, patch_size: int, grid: Sequence[int], channels: int = 3):
  """Inverse of `patchify`: (B, N, C*p*p) -> (B, gh*p, gw*p, C)."""
  grid_h, grid_w = grid
  batch, num_patches, dim = patches.shape
  if num_patches != grid_h * grid_w or dim != channels * patch_size * patch_size:
    raise ValueError(
      f"patches of shape {patches.shape} do not match grid={tuple(grid)}, "
      f"patch_size={patch_size}, channels={channels}"
    )
  images = patches.reshape(batch, grid_h, grid_w, channels, patch_size, patch_size)
  images = images.transpose(0, 1, 4, 2, 5, 3)  # (B, gh, py, gw, px, C)
  return images.reshape(batch, grid_h * patch_size, grid_w * patch_size, channels)


def image_tokens(
  centroids: jax.Array, images01, patch_size: int, chunk_size: int = kmeans.DEFAULT_CHUNK_SIZE
) -> jax.Array:
  """(B, H, W, C) images in [0, 1] -> (B, N) int32 ids of the nearest centroids."""
  return kmeans.assign(
    patchify(jnp.asarray(images01, jnp.float32), patch_size), centroids, chunk_size=chunk_size
  )


def token_pixels(centroids: jax.Array, tokens) -> jax.Array:
  """(B, N) ids -> (B, N, C*p*p) centroid pixels in (c, y, x) order."""
  return jnp.take(centroids, jnp.asarray(tokens), axis=0)


def _split_path(path: str) -> tuple[str, str]:
  """`<path>.npy` and `<path>.json`; a path given with either suffix is accepted."""
  for suffix in (".npy", ".json"):
    if path.endswith(suffix):
      path = path[: -len(suffix)]
  return path + ".npy", path + ".json"


class CentroidTokenizer:
  """Centroids (K, C*p*p) in [0, 1] pixel units, patch size and provenance metadata."""

  def __init__(
    self, centroids, patch_size: int, channels: int = 3, metadata: Optional[dict[str, Any]] = None
  ):
    centroids = jnp.asarray(centroids, jnp.float32)
    if centroids.ndim != 2 or centroids.shape[1] != channels * patch_size * patch_size:
      raise ValueError(
        f"centroids of shape {centroids.shape} do not fit patch_size={patch_size} "
        f"with {channels} channels (expected (K, {channels * patch_size**2}))"
      )
    self.centroids = centroids
    self.patch_size = int(patch_size)
    self.channels = int(channels)
    self.metadata = dict(metadata or {})

  @property
  def num_tokens(self) -> int:
    return self.centroids.shape[0]

  def tokens(self, images01, chunk_size: int = kmeans.DEFAULT_CHUNK_SIZE) -> jax.Array:
    """(B, H, W, C) images in [0, 1] -> (B, N) int32 token ids."""
    return image_tokens(self.centroids, images01, self.patch_size, chunk_size)

  def centroid_pixels(self, tokens) -> jax.Array:
    """(B, N) token ids -> (B, N, C*p*p) centroid patches in (c, y, x) order."""
    return token_pixels(self.centroids, tokens)

  def save(self, path: str) -> tuple[str, str]:
    """Writes `<path>.npy` (K x d float32) and `<path>.json`; returns both paths."""
    npy_path, json_path = _split_path(path)
    directory = os.path.dirname(npy_path)
    if directory:
      os.makedirs(directory, exist_ok=True)
    centroids = np.asarray(self.centroids, np.float32)
    metadata = dict(self.metadata)
    metadata.update(
      format_version=_FORMAT_VERSION,
      k=int(centroids.shape[0]),
      dim=int(centroids.shape[1]),
      patch_size=self.patch_size,
      channels=self.channels,
      patch_order=PATCH_ORDER,
      pixel_range=[0.0, 1.0],
    )
    metadata.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat())
    np.save(npy_path, centroids)
    with open(json_path, "w") as f:
      json.dump(metadata, f, indent=2, sort_keys=True)
      f.write("\n")
    return npy_path, json_path

  @classmethod
  def load(cls, path: str) -> "CentroidTokenizer":
    """Reads what `save` wrote, checking the metadata against the array."""
    npy_path, json_path = _split_path(path)
    for file in (npy_path, json_path):
      if not os.path.isfile(file):
        raise FileNotFoundError(f"centroid tokenizer file {file} does not exist")
    with open(json_path) as f:
      try:
        metadata = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{json_path} is not valid JSON: {e}") from e
    missing = [key for key in ("k", "patch_size", "patch_order") if key not in metadata]
    if missing:
      raise ValueError(f"{json_path} lacks the metadata keys {missing}")
    if metadata["patch_order"] != PATCH_ORDER:
      raise ValueError(
        f"{json_path}: patch_order {metadata['patch_order']!r} is not supported "
        f"(only {PATCH_ORDER!r})"
      )
    centroids = np.load(npy_path, allow_pickle=False)
    patch_size, channels = int(metadata["patch_size"]), int(metadata.get("channels", 3))
    expected = (int(metadata["k"]), channels * patch_size * patch_size)
    if centroids.shape != expected:
      raise ValueError(
        f"{npy_path} holds an array of shape {centroids.shape}, but "
        f"{json_path} says k={expected[0]}, patch_size={patch_size}, "
        f"channels={channels} -> {expected}"
      )
    if centroids.dtype != np.float32:
      raise ValueError(f"{npy_path} has dtype {centroids.dtype}, expected float32")
    if not np.all(np.isfinite(centroids)):
      raise ValueError(f"{npy_path} contains non-finite values")
    return cls(centroids, patch_size, channels, metadata)
