"""One face for every frozen image tokenizer: pixel centroids, VQ-KD, PeCo, k-CLIP.

A `Tokenizer` is a pure function `fn(params, images_uint8) -> ids (B, N) int32` plus what a
token cache and the report must know about it: the codebook size, the token grid, and the
`View` (Resize shorter side -> CenterCrop) its inputs are made with. Methods call `fn` inside
their jitted step (online tokenisation) with `params` as a frozen const; `mim_jax.tokenize`
runs it once over a data set and stores the ids (token cache).

`load_tokenizer(config.tokenizer, image_size)` builds one from a config:
  kind='centroids'  path = prefix of <path>.npy/.json (mim_jax.tokenizers.build_centroids)
  kind='vqkd'       path = a VQ-KD training workdir (configs/vqkd_vitb.py) or the official
                    BEiT v2 tokenizer checkpoint (.pth)
  kind='peco'       path = a PeCo VQ-VAE training workdir (configs/peco_vqvae.py)
  kind='kclip'      path = a k-CLIP directory (python -m mim_jax.tokenizers.kclip)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.data import transforms

KINDS = ("centroids", "vqkd", "peco", "kclip")


@dataclasses.dataclass(frozen=True)
class View:
  """How a tokenizer's input is made from a source image: Resize(shorter side = resize)
  then CenterCrop(size). resize == size keeps the whole short side (the region MaPeT's
  RandomResizedCrop(scale=(1, 1), ratio=(1, 1)) student view covers)."""

  size: int
  resize: int
  interpolation: str = "bicubic"

  def apply(self, image: np.ndarray) -> np.ndarray:
    return transforms.resize_center_crop(image, self.size, self.resize, self.interpolation)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "View":
    return cls(int(d["size"]), int(d["resize"]), str(d.get("interpolation", "bicubic")))


class Tokenizer:
  """A frozen tokenizer: `fn(params, images_uint8 (B, H, W, 3)) -> (B, N) int32`."""

  def __init__(
    self,
    kind: str,
    fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    *,
    codebook_size: int,
    grid: tuple[int, int],
    view: View,
    provenance: dict,
    decode_fn: Callable[[Any, jax.Array], jax.Array] | None = None,
  ):
    self.kind = kind
    self.fn = fn
    self.params = params
    self.codebook_size = int(codebook_size)
    self.grid = (int(grid[0]), int(grid[1]))
    self.view = view
    self.provenance = dict(provenance)
    self.decode_fn = decode_fn  # ids -> [0, 1] images, when the tokenizer has a decoder
    self._jitted = jax.jit(fn)

  @property
  def num_tokens(self) -> int:
    return self.grid[0] * self.grid[1]

  def tokenize(self, images_uint8) -> jax.Array:
    images = jnp.asarray(images_uint8)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"{self.kind} tokenizer: images must be (B, H, W, 3), got {images.shape}")
    if images.shape[1:3] != (self.view.size, self.view.size):
      raise ValueError(
        f"{self.kind} tokenizer expects {self.view.size}px inputs "
        f"(view {self.view}), got {images.shape[1:3]}"
      )
    return self._jitted(self.params, images)

  def fingerprint(self) -> dict:
    """What a token cache records so that a reader can refuse mismatched tokens."""
    digest = hashlib.sha256(
      json.dumps(self.provenance, sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    return {
      "kind": self.kind,
      "codebook_size": self.codebook_size,
      "grid": list(self.grid),
      "view": self.view.to_dict(),
      "provenance_sha": digest,
    }

  def __repr__(self) -> str:
    return f"Tokenizer({self.kind}, K={self.codebook_size}, grid={self.grid}, view={self.view})"


def _centroids(cfg, image_size: int | None, tok=None) -> Tokenizer:
  from mim_jax.tokenizers import centroids as centroid_lib  # pylint: disable=g-import-not-at-top

  if tok is None:
    tok = centroid_lib.CentroidTokenizer.load(cfg.path)
  # Pixel centroids work at any size that the patch divides; default: the size they were fit at.
  image_size = int(image_size or tok.metadata.get("image_size", 224))
  if image_size % tok.patch_size:
    raise ValueError(
      f"config.tokenizer.path: patch size {tok.patch_size} does not divide the "
      f"image size {image_size}"
    )
  patch = tok.patch_size

  def fn(params, images):
    return centroid_lib.image_tokens(params["centroids"], images.astype(jnp.float32) / 255.0, patch)

  def decode(params, ids):
    pixels = centroid_lib.token_pixels(params["centroids"], ids)
    g = image_size // patch
    return centroid_lib.unpatchify(pixels, patch, (g, g))

  g = image_size // patch
  where = cfg.path if cfg.path.startswith(RANDOM) else os.path.abspath(cfg.path)
  return Tokenizer(
    "centroids",
    fn,
    {"centroids": jnp.asarray(tok.centroids, jnp.float32)},
    codebook_size=tok.centroids.shape[0],
    grid=(g, g),
    view=View(image_size, int(cfg.get("resize", 0) or image_size)),
    provenance={"path": where, **tok.metadata},
    decode_fn=decode,
  )


# An untrained tokenizer of the kind's paper architecture, for when the trained one is not at
# hand: compile-only dry runs (mim_jax.aot, docs/aot.md) and smoke tests. Spelled
# config.tokenizer.path='random:' or 'random:K' (K codes; default config.tokenizer.k or 8192).
RANDOM = "random:"


def random_codebook_size(cfg) -> int:
  spec = cfg.path[len(RANDOM) :]
  try:
    return int(spec) if spec else int(cfg.get("k", 0) or 8192)
  except ValueError:
    raise ValueError(
      f"config.tokenizer.path={cfg.path!r}: a random stand-in is 'random:' or 'random:K'"
    ) from None


def random_tokenizer(cfg, *, view_size: int, patch_size: int, seed: int = 0) -> Tokenizer:
  """The stand-in of `cfg.kind` (see RANDOM): VQ-KD's ViT-B encoder + K x 32 codebook
  (tokenize path only), PeCo's VQ-VAE, k-CLIP's RN50x64 + K centroids, or K pixel centroids,
  taking `view_size` px views; weights are drawn, nothing is read."""
  kind, k = cfg.kind, random_codebook_size(cfg)
  provenance = {"random": cfg.path, "codebook_size": k}
  if kind == "centroids":
    from mim_jax.tokenizers import centroids as centroid_lib  # pylint: disable=g-import-not-at-top

    rand = np.random.default_rng(seed).random((k, 3 * patch_size * patch_size), np.float32)
    tok = centroid_lib.CentroidTokenizer(rand, patch_size, metadata={"image_size": view_size})
    return _centroids(cfg, view_size, tok)
  rng = jax.random.PRNGKey(seed)
  if kind == "vqkd":
    from mim_jax.tokenizers import vqkd  # pylint: disable=g-import-not-at-top

    model = vqkd.model_from_config(
      {"model": {"variant": f"B/{patch_size}"}, "vqkd": {"decoder_depth": 0, "num_codes": k}}
    )
    v = vqkd.init_variables(model, rng, view_size)
    return vqkd.VQKDTokenizer(
      model, v["params"], v["codebook"], image_size=view_size, provenance=provenance
    ).as_tokenizer()
  if kind == "peco":
    from mim_jax.tokenizers import peco  # pylint: disable=g-import-not-at-top

    model = peco.vqvae_from_config({"num_codes": k})
    v = peco.init_variables(model, rng, view_size)
    return peco.PeCoTokenizer(
      model, v["params"], v["codebook"], image_size=view_size, provenance=provenance
    ).as_tokenizer()
  from mim_jax.teachers import clip as clip_lib  # pylint: disable=g-import-not-at-top
  from mim_jax.tokenizers import kclip  # pylint: disable=g-import-not-at-top

  teacher = clip_lib.CLIPTeacher(f"random:RN50x64,image_size={view_size}")
  rand = np.random.default_rng(seed).standard_normal((k, teacher.layer4_channels), np.float32)
  return kclip.KClipTokenizer(
    teacher, rand, view=View(view_size, view_size), metadata=provenance
  ).as_tokenizer()


def load_tokenizer(
  cfg, image_size: int | None = None, *, view_size: int | None = None, patch_size: int = 16
) -> Tokenizer:
  """A `Tokenizer` from a `config.tokenizer` section (kind, path, ...); a 'random:' path
  gives `random_tokenizer` with `view_size` px views (default image_size, else 224)."""
  kind = cfg.get("kind", "")
  if kind not in KINDS:
    raise ValueError(f"config.tokenizer.kind must be one of {KINDS}, got {kind!r}")
  if str(cfg.get("path", "")).startswith(RANDOM):
    size = int(view_size or image_size or 224)
    return random_tokenizer(cfg, view_size=size, patch_size=patch_size)
  if not cfg.get("path"):
    raise ValueError(
      f"config.tokenizer.path is empty: point it at a {kind} tokenizer "
      f"(see mim_jax/tokenizers/base.py for what each kind expects)"
    )
  if not os.path.exists(cfg.path) and not os.path.exists(cfg.path + ".npy"):
    raise FileNotFoundError(f"config.tokenizer.path: {cfg.path} does not exist")
  if kind == "centroids":
    return _centroids(cfg, image_size)
  if kind == "kclip":
    from mim_jax.tokenizers import kclip  # pylint: disable=g-import-not-at-top

    return kclip.KClipTokenizer.load(cfg.path).as_tokenizer()
  if kind == "vqkd":
    from mim_jax.tokenizers import vqkd  # pylint: disable=g-import-not-at-top

    return vqkd.load_as_tokenizer(cfg.path)
  from mim_jax.tokenizers import peco  # pylint: disable=g-import-not-at-top

  return peco.load_as_tokenizer(cfg.path)
