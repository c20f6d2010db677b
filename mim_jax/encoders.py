"""`mim_jax.load_encoder(path)`: the pre-trained encoder of any source, as one object.

  enc = mim_jax.load_encoder("runs/beitv2")           # a pre-training workdir (any method)
  enc = mim_jax.load_encoder("runs/beitv2", step=800)  # one of its checkpoints
  enc = mim_jax.load_encoder("beitv2_base.pth")        # an official checkpoint (torch)
  enc = mim_jax.load_encoder("exports/beitv2")         # `python -m mim_jax.export` output
  feats = enc.tokens(images)  # (B, 1 + N, D), cls first

Sources (mim_jax/evaluation/backbones.py reads them all, and `config.init` of
`mim_jax.evaluate` takes the same paths): a mim_jax workdir; an official PyTorch checkpoint
of BEiT v2, PeCo (BEiT layout), CCViT (`model`), CAE v2 (`encoder.*`) or MaPeT
(`state_dict`, separate q / kv layers); a converted `.npz`; a timm or full export folder.

`tokens(images)` takes float32 NHWC images already normalised as the model expects
(`enc.mean` / `enc.std`, ImageNet's for every method here) and returns the final-layer token
features: the last block's output through the final LayerNorm, exactly what timm's
`forward_features` gives for the exported model on the same images in NCHW
(tests/test_export.py). A fine-tuned classifier that pools with its own `fc_norm` (MaPeT's
released models) has no final norm: its tokens leave the last block as they are.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.data import transforms
from mim_jax.evaluation import backbones
from mim_jax.models import vit


@dataclasses.dataclass(frozen=True)
class Encoder:
  """An encoder's parameters (nested numpy, blocks unstacked) and its architecture."""

  params: dict
  spec: backbones.BackboneSpec
  source: str
  mean: tuple[float, ...] = transforms.IMAGENET_MEAN
  std: tuple[float, ...] = transforms.IMAGENET_STD

  @property
  def image_size(self) -> int | None:
    """The pre-training resolution where the weights fix it (relative or learned
    positions), else None (any multiple of the patch size)."""
    return self.spec.grid[0] * self.spec.patch_size if self.spec.grid else None

  def module(self, dtype=jnp.float32) -> vit.VisionTransformer:
    return vit.VisionTransformer(**self.spec.vit_kwargs(dtype=dtype))

  @functools.cached_property
  def _apply(self):
    model = self.module()
    return jax.jit(lambda p, x: model.apply({"params": p}, x)["normed"])

  def tokens(self, images, *, batch_size: int = 64) -> np.ndarray:
    """(B, 1 + N, D) float32 final-layer token features of normalised NHWC images."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be (B, H, W, 3) float32 NHWC, got shape {images.shape}")
    size = self.image_size
    if size is not None and images.shape[1:3] != (size, size):
      raise ValueError(
        f"{self.spec.source}: this encoder's positions are fixed to {size}x{size} images, "
        f"got {images.shape[1]}x{images.shape[2]}"
      )
    if images.shape[1] % self.spec.patch_size or images.shape[2] % self.spec.patch_size:
      raise ValueError(
        f"image size {images.shape[1:3]} is not a multiple of the patch {self.spec.patch_size}"
      )
    out = [
      np.asarray(self._apply(self.params, jnp.asarray(images[i : i + batch_size])))
      for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out, axis=0).astype(np.float32)

  def describe(self) -> str:
    s = self.spec
    return (
      f"ViT {s.embed_dim}x{s.depth} ({s.num_heads} heads, patch {s.patch_size}, rel_pos "
      f"{s.rel_pos}, abs_pos {s.abs_pos}) from {self.source}"
    )


def load_encoder(path: str, *, step: int | None = None, heads: int | None = None) -> Encoder:
  """The encoder stored at `path` (see the module docstring). `step` picks a checkpoint of a
  workdir; `heads` is needed only for weights that do not determine the head count (an
  official checkpoint without a relative position table and without a config)."""
  model_cfg = {"heads": int(heads)} if heads else None
  params, spec = backbones.load(str(path), model_cfg, step)
  if params is None:
    raise ValueError("load_encoder needs weights; 'random' is an evaluation baseline only")
  return Encoder(params=params, spec=spec, source=str(path))
