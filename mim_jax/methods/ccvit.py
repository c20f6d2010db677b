"""CCViT: centroid-centred masked image modelling (Cakeyan/CCViT_Public, a fork of
microsoft/unilm:beit2).

Per image: a BEiT v2 block mask of `num_masked` patches, plus `num_replaced` patches drawn
uniformly from the unmasked ones whose pixels are replaced by the centroid of their own
token (computed from the *original* pixels, before normalisation; `kmeans_mask` in
Cakeyan/CCViT_Public:utils.py, applied in engine_for_pretraining.py). The ViT sees the
replaced image with masked patch embeddings mixed with the mask token. Two losses, both
over masked ∪ replaced positions:
  * token: final layer -> norm -> lm_head, cross-entropy against the centroid ids;
  * pixel: a 2-block "pixel block" fed with [final-layer cls, layer-l patches], its own LN
    and Linear(D, p*p*3), MSE against the original patch normalised per patch (unbiased
    variance, eps 1e-6) in the official code's (c, y, x) order
    (Cakeyan/CCViT_Public:modeling_pretrain.py, engine_for_pretraining.py).
The pixel block reuses the BEiT v2 aggregation-head quirk: its Linear layers keep PyTorch's
default init (only the depth rescale is applied; `common.aggregation_blocks`).
model.scan_layers / model.remat apply to the backbone's blocks; the pixel block stays
unrolled.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import masking
from mim_jax import visual
from mim_jax.data import transforms
from mim_jax.methods import common
from mim_jax.models import vit
from mim_jax.tokenizers import base as tok_base
from mim_jax.tokenizers import centroids as centroid_lib
from mim_jax.tokenizers import kmeans


class CCViTModel(nn.Module):
  """Backbone + token head + pixel block. Returns predictions at `select` positions."""

  vit_kw: dict
  vocab_size: int
  early_layers: int
  head_layers: int
  pixel_dim: int

  @nn.compact
  def __call__(self, images, mask, select, *, train: bool = False):
    kw = dict(self.vit_kw)
    dtype = kw.get("dtype", jnp.float32)
    backbone = vit.VisionTransformer(
      **kw,
      use_mask_token=True,
      rel_pos="shared",
      abs_pos="none",
      weight_init="beit",
      name="backbone",
    )
    # Tokens are read at the cls and the selected patches only: the last block of the
    # backbone and of the pixel block compute those alone (BENCHMARKS.md §11).
    patch_tokens = select + 1  # token 0 is the cls
    cls_and_selected = jnp.concatenate([jnp.zeros_like(select[:, :1]), patch_tokens], axis=1)
    out = backbone(
      images,
      mask=mask,
      train=train,
      return_layers=(self.early_layers,),
      last_outputs_at=cls_and_selected,
    )
    dense = lambda n, names, name: vit.Dense(
      n,
      dtype=dtype,
      name=name,
      kernel_init=nn.with_logical_partitioning(vit.trunc_normal_init(0.02, "std"), names),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (names[1],)),
    )

    # Token branch: final norm -> lm_head, only at the selected positions.
    patches = out["normed"][:, 1:]
    token_logits = dense(self.vocab_size, ("embed", "vocab"), "lm_head")(patches)

    # Pixel block: final cls (before the final norm) + layer-l patch tokens.
    x = jnp.concatenate([out["last"][:, :1], out["layers"][self.early_layers][:, 1:]], axis=1)
    x = common.aggregation_blocks(
      x,
      kw,
      out["rel_pos_bias"],
      early_layers=self.early_layers,
      head_layers=self.head_layers,
      prefix="pixel_block",
      train=train,
      outputs_at=patch_tokens,
    )
    x = nn.LayerNorm(
      epsilon=1e-6,
      dtype=jnp.float32,
      name="pixel_norm",
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
    )(x)
    pixel_pred = dense(self.pixel_dim, ("embed", None), "pixel_head")(x.astype(dtype))
    return token_logits, pixel_pred


def per_patch_normalize(patches: jax.Array, eps: float = 1e-6) -> jax.Array:
  """(x - mean) / sqrt(var + eps) over the last axis, var unbiased (torch's default)."""
  mean = patches.mean(-1, keepdims=True)
  var = patches.var(-1, ddof=1, keepdims=True)
  return (patches - mean) / jnp.sqrt(var + eps)


def per_patch_denormalize(normalized: jax.Array, original: jax.Array, eps: float = 1e-6):
  """Inverse of `per_patch_normalize` with the statistics of `original` (MAE's way of showing
  a per-patch-normalised prediction in pixel space)."""
  mean = original.mean(-1, keepdims=True)
  std = jnp.sqrt(original.var(-1, ddof=1, keepdims=True) + eps)
  return normalized * std + mean


class CCViT:
  """The CCViT method plug-in (see mim_jax/methods/__init__.py for the interface)."""

  def __init__(self, config, *, workdir: str | None = None, source=None):
    self.config = config
    m, d = config.method, config.data
    self.patch, self.grid = common.patch_grid(config)
    if d.second_image_size != d.image_size:
      raise ValueError(
        "config.data.second_image_size must equal config.data.image_size "
        "for CCViT: replaced patches and pixel targets index the same grid"
      )
    self.num_patches = self.grid[0] * self.grid[1]
    if m.num_masked + m.num_replaced > self.num_patches:
      raise ValueError(
        f"config.method: num_masked + num_replaced = "
        f"{m.num_masked + m.num_replaced} exceeds the {self.num_patches} patches"
      )
    self.num_selected = m.num_masked + m.num_replaced
    self.vit_kw = common.backbone_kwargs(config.model, config.dtype)
    if not 1 <= m.early_layers <= self.vit_kw["depth"]:
      raise ValueError(
        f"config.method.early_layers={m.early_layers} must be in [1, depth={self.vit_kw['depth']}]"
      )
    self.tokenizer = self._load_tokenizer(workdir, source)
    self.model = CCViTModel(
      self.vit_kw,
      vocab_size=self.tokenizer.centroids.shape[0],
      early_layers=m.early_layers,
      head_layers=m.head_layers,
      pixel_dim=3 * self.patch * self.patch,
    )
    self.mean = jnp.asarray(transforms.IMAGENET_MEAN, jnp.float32)
    self.std = jnp.asarray(transforms.IMAGENET_STD, jnp.float32)

  # ---------------------------------------------------------------- tokenizer
  def _load_tokenizer(self, workdir, source) -> centroid_lib.CentroidTokenizer:
    t = self.config.tokenizer
    if t.path.startswith(tok_base.RANDOM):  # an untrained stand-in (mim_jax.aot)
      k = tok_base.random_codebook_size(t)
      rand = np.random.default_rng(0).random((k, 3 * self.patch * self.patch), np.float32)
      tok = centroid_lib.CentroidTokenizer(rand, self.patch)
    elif t.path:
      tok = centroid_lib.CentroidTokenizer.load(t.path)
    else:
      cached = os.path.join(workdir, "centroids") if workdir else None
      if cached and os.path.exists(cached + ".npy"):
        tok = centroid_lib.CentroidTokenizer.load(cached)
      elif t.build_if_missing and source is not None:
        tok = common.build_codebook_from_source(
          source,
          k=t.k,
          images_per_class=t.images_per_class,
          iters=t.iters,
          patch_size=self.patch,
          image_size=self.config.data.image_size,
          seed=t.seed,
        )
        if cached and jax.process_index() == 0:
          tok.save(cached)
      else:
        raise ValueError(
          "config.tokenizer.path is empty: build the centroid codebook first, e.g. "
          "`python -m mim_jax.tokenizers.build_centroids --source=imagefolder "
          "--path=/data/imagenet/train --images_per_class=50 --k=8192 --iters=20 "
          "--out=/data/ccvit_centroids` and pass --config.tokenizer.path=/data/ccvit_centroids "
          "(or set --config.tokenizer.build_if_missing=True for small data)"
        )
    if tok.patch_size != self.patch:
      raise ValueError(
        f"config.tokenizer.path: codebook patch size {tok.patch_size} != "
        f"model patch size {self.patch}"
      )
    return tok

  def consts(self) -> dict:
    return {"centroids": jnp.asarray(self.tokenizer.centroids, jnp.float32)}

  def frozen_fingerprint(self) -> dict[str, str]:
    """The codebook: the files of config.tokenizer.path, or the content of the one built
    into (or read back from) the workdir."""
    t = self.config.tokenizer
    if t.path.startswith(tok_base.RANDOM):
      return {"tokenizer.path": f"{t.path} (untrained stand-in, seed 0)"}
    if t.path:
      return {"tokenizer.path": common.codebook_fingerprint(t.path)}
    return {
      "tokenizer.path": "codebook built in the workdir from the training data, "
      + common.array_fingerprint(self.tokenizer.centroids)
    }

  def fingerprint(self) -> dict:
    c = self.config
    return {
      "method": "ccvit",
      "model.variant": c.model.variant,
      "model.width": c.model.width,
      "model.depth": c.model.depth,
      "model.heads": c.model.heads,
      "model.scan_layers": c.model.scan_layers,
      "method.early_layers": c.method.early_layers,
      "method.head_layers": c.method.head_layers,
      "tokenizer.k": int(self.tokenizer.centroids.shape[0]),
      "data.image_size": c.data.image_size,
    }

  # ---------------------------------------------------------------- host side
  def prepare(self, example: dict, rng: np.random.Generator) -> dict:
    m = self.config.method
    mask = masking.block_mask(
      rng,
      grid=self.grid,
      num_masked=m.num_masked,
      min_block=m.min_block,
      min_aspect=m.min_aspect,
      exact=True,
    )
    replaced = masking.replaced_positions(rng, mask, m.num_replaced)
    example["mask"] = mask
    example["replaced"] = replaced
    return example

  # ---------------------------------------------------------------- device side
  def _corrupt(self, batch, centroids):
    """(select, tokens, student, patches2): the masked ∪ replaced positions (B, S) in raster
    order, view 2's token ids there, the replaced + normalised student image, and view 2's
    patches.

    Only these positions need a token: the token loss's targets and the replaced patches (a
    subset of them). The official code tokenises every patch of the image
    (Cakeyan/CCViT_Public:utils.py, kmeans_mask) and uses the same ids where it uses any;
    tokenising the selected ones alone does S / N of the distance products (95 of 196 at
    224², BENCHMARKS.md §11).
    """
    select_mask = batch["mask"] | batch["replaced"]
    select = common.selected_positions(select_mask, self.num_selected)
    x1 = batch["image"].astype(jnp.float32) / 255.0
    x2 = batch["image2"].astype(jnp.float32) / 255.0
    patches2 = centroid_lib.patchify(x2, self.patch)  # (B, N, d), (c,y,x)
    dim = patches2.shape[-1]
    picked = jnp.take_along_axis(patches2, select[..., None], axis=1)
    tokens = kmeans.assign(picked.reshape(-1, dim), centroids).reshape(select.shape)
    # A selected position's slot in `select` is the number of selected positions before it.
    slot = jnp.maximum(jnp.cumsum(select_mask.astype(jnp.int32), axis=1) - 1, 0)
    own_centroid = centroids[jnp.take_along_axis(tokens, slot, axis=1)]
    patches1 = centroid_lib.patchify(x1, self.patch)
    patches1 = jnp.where(batch["replaced"][..., None], own_centroid, patches1)
    student = centroid_lib.unpatchify(patches1, self.patch, self.grid)
    student = (student - self.mean) / self.std  # after replacing
    return select, tokens, student, patches2

  def _forward(self, params, batch, consts, rng, train):
    select, targets, student, patches2 = self._corrupt(batch, consts["centroids"])
    dtype = self.vit_kw["dtype"]
    logits, pixels = self.model.apply(
      {"params": params},
      student.astype(dtype),
      batch["mask"],
      select,
      train=train,
      rngs={"dropout": rng} if train else {},
    )
    pixel_targets = per_patch_normalize(jnp.take_along_axis(patches2, select[..., None], axis=1))
    return logits, pixels, targets, pixel_targets, select

  def init(self, rng, batch) -> Any:
    b = batch["image"].shape[0]
    size = self.config.data.image_size
    images = jnp.zeros((b, size, size, 3), self.vit_kw["dtype"])
    mask = jnp.zeros((b, self.num_patches), bool)
    select = jnp.zeros((b, self.num_selected), jnp.int32)
    return self.model.init({"params": rng}, images, mask, select, train=False)

  def loss(self, params, extra, consts, batch, rng, train: bool = True):
    del extra  # CCViT has no mutable collections.
    m = self.config.method
    logits, pixels, targets, pixel_targets, _ = self._forward(params, batch, consts, rng, train)
    logits = logits.astype(jnp.float32)
    loss_token = common.token_cross_entropy(logits, targets).mean()
    loss_pixel = jnp.mean((pixels.astype(jnp.float32) - pixel_targets) ** 2)
    loss = m.token_loss_weight * loss_token + m.pixel_loss_weight * loss_pixel
    acc = common.token_accuracy(logits, targets)
    metrics = {"loss": loss, "loss_token": loss_token, "loss_pixel": loss_pixel, "token_acc": acc}
    return loss, metrics, {}

  @staticmethod
  def encoder_params(params):
    return params["backbone"]

  def visualize(self, params, extra, consts, batch, max_images: int = 4) -> np.ndarray:
    """Rows: input | masked (grey) and replaced (their centroid) | predicted tokens'
    centroids at masked + replaced | the pixel block's prediction in pixel space (its
    per-patch-normalised output de-normalised with each original patch's mean and variance,
    as MAE's visualisation does) | target tokens (the tokenizer's own reconstruction)."""
    del extra
    batch = {k: v[:max_images] for k, v in batch.items()}
    centroids = consts["centroids"]
    logits, pixels, targets, _, select = jax.jit(
      lambda p, b: self._forward(p, b, consts, None, False)
    )(params, batch)
    _, _, _, patches2 = self._corrupt(jax.tree.map(jnp.asarray, batch), centroids)
    b, n, dim = patches2.shape
    tokens = kmeans.assign(patches2.reshape(b * n, dim), centroids).reshape(b, n)
    pred = jnp.argmax(logits, -1)
    rows = jnp.arange(patches2.shape[0])[:, None]
    predicted = patches2.at[rows, select].set(centroids[pred])
    original = jnp.take_along_axis(patches2, select[..., None], axis=1)
    in_pixels = patches2.at[rows, select].set(
      per_patch_denormalize(pixels.astype(jnp.float32), original)
    )
    corrupted = jnp.where(batch["replaced"][..., None], centroids[tokens], patches2)
    corrupted = jnp.where(batch["mask"][..., None], 0.5, corrupted)
    panels = [
      ("input", patches2),
      ("masked + replaced", corrupted),
      ("predicted tokens", predicted),
      ("predicted pixels", in_pixels),
      ("target tokens", centroids[tokens]),
    ]
    right = np.asarray(pred == targets).sum(1)
    cols = [f"#{i + 1}: {int(r)}/{pred.shape[1]} tokens right" for i, r in enumerate(right)]
    return visual.labelled_grid(
      [(name, np.asarray(centroid_lib.unpatchify(x, self.patch, self.grid))) for name, x in panels],
      cols,
    )
