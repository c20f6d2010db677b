"""PeCo-MAE: PeCo's perceptual tokens as the target of an MAE-style asymmetric model
(PeCo paper, "Accelerated BERT pre-training over PeCo", Table 8).

The PeCo code is not public and the paper only says it adopts "the network structure in
(He et al. 2021)" with the perceptual codebook as the prediction target; so this is MAE's
official architecture with a token head:
  encoder  ViT on [cls, visible patches] only (random masking, 75 %), fixed 2-D sin-cos
           positions, timm blocks (q/k/v biases, no layer scale), final LN;
  decoder  Linear(D, 512) -> mask tokens at the masked places (raster order restored) +
           fixed sin-cos positions -> 8 blocks of width 512, 16 heads -> LN -> Linear(512,
           vocab); cross-entropy against the tokenizer's ids at the masked positions only;
  init     xavier-uniform Linear layers with zero bias, cls / mask tokens N(0, 0.02) (MAE).
Targets: any tokenizer through `token_targets.TokenTargets` (PeCo by default).
model.scan_layers / model.remat apply to the encoder's blocks; the decoder stays unrolled.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mim_jax import masking
from mim_jax.data import transforms
from mim_jax.methods import common
from mim_jax.methods import token_targets
from mim_jax.models import vit


class PeCoMAEModel(nn.Module):
  """Logits (B, M, vocab) fp32 at the masked patches (raster order)."""

  vit_kw: dict
  vocab_size: int
  decoder_dim: int = 512
  decoder_depth: int = 8
  decoder_heads: int = 16

  @nn.compact
  def __call__(self, images, visible, masked, *, train: bool = False):
    kw = dict(self.vit_kw, layer_scale_init=None)
    dtype = kw.get("dtype", jnp.float32)
    latents = vit.VisionTransformer(
      **kw,
      abs_pos="sincos",
      rel_pos="none",
      k_bias=True,
      weight_init="xavier",
      depth_rescale=False,
      name="backbone",
    )(images, keep=visible, train=train)["normed"]
    d = self.decoder_dim
    x = common.xavier_dense(d, ("embed", None), "decoder_embed", dtype)(latents)
    b, m = masked.shape
    mask_token = self.param(
      "mask_token",
      nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed")),
      (1, 1, d),
    )
    # Unshuffle: visible latents and mask tokens back to raster order, by a per-example
    # gather with the inverse permutation. A scatter indexed by explicit batch rows made
    # every device gather the global batch under data parallelism (BENCHMARKS.md §10).
    restore = jnp.argsort(jnp.concatenate([visible, masked], axis=1), axis=1)
    tokens = jnp.concatenate([x[:, 1:], jnp.broadcast_to(mask_token.astype(x.dtype), (b, m, d))], 1)
    patches = jnp.take_along_axis(tokens, restore[..., None], axis=1)
    grid = (images.shape[1] // kw["patch_size"], images.shape[2] // kw["patch_size"])
    pos = jnp.asarray(vit.sincos_2d_pos_embed(grid, d), x.dtype)  # cls row = 0
    x = jnp.concatenate([x[:, :1], patches], axis=1) + pos[None]
    for i in range(self.decoder_depth):
      x = vit.Block(
        dim=d,
        num_heads=self.decoder_heads,
        layer_scale_init=None,
        weight_init="xavier",
        k_bias=True,
        dtype=dtype,
        name=f"decoder_blocks_{i}",
      )(x, train=train)
    x = jnp.take_along_axis(x[:, 1:], masked[..., None], axis=1)
    x = vit._apply_norm(vit.layer_norm(1e-6, jnp.float32, "decoder_norm"), x)  # pylint: disable=protected-access
    return common.xavier_dense(self.vocab_size, ("embed", "vocab"), "decoder_pred", dtype)(
      x
    ).astype(jnp.float32)


class PeCoMAE:
  """The PeCo-MAE plug-in (interface: mim_jax/methods/__init__.py)."""

  def __init__(self, config, *, workdir: str | None = None, source=None):
    self.config = config
    m = config.method
    self.vit_kw = common.backbone_kwargs(config.model, config.dtype)
    self.patch, self.grid = common.patch_grid(config)
    self.num_patches = self.grid[0] * self.grid[1]
    if not 0 < m.num_masked < self.num_patches:
      raise ValueError(
        f"config.method.num_masked={m.num_masked} must be in [1, {self.num_patches - 1}]"
      )
    if m.decoder_dim % m.decoder_heads:
      raise ValueError(
        f"config.method.decoder_dim={m.decoder_dim} is not divisible by "
        f"config.method.decoder_heads={m.decoder_heads}"
      )
    self.targets = token_targets.TokenTargets(
      config, self.grid, patch_size=self.patch, workdir=workdir, source=source
    )
    self.model = PeCoMAEModel(
      self.vit_kw, self.targets.vocab_size, m.decoder_dim, m.decoder_depth, m.decoder_heads
    )

  def wrap_source(self, source):
    return self.targets.wrap_source(source)

  def consts(self) -> dict:
    return self.targets.consts()

  def frozen_fingerprint(self) -> dict[str, str]:
    return self.targets.frozen_fingerprint()

  def fingerprint(self) -> dict:
    c = self.config
    fp = {
      "method": "peco_mae",
      "model.variant": c.model.variant,
      "model.width": c.model.width,
      "model.depth": c.model.depth,
      "model.heads": c.model.heads,
      "model.scan_layers": c.model.scan_layers,
      "vocab_size": self.targets.vocab_size,
      "data.image_size": c.data.image_size,
    }
    fp.update({f"method.{k}": v for k, v in c.method.items()})
    return fp

  def prepare(self, example: dict, rng: np.random.Generator) -> dict:
    example["mask"] = masking.random_mask(rng, self.num_patches, self.config.method.num_masked)
    if not self.targets.online:
      example.pop("image2", None)
    return example

  def init(self, rng, batch) -> Any:
    b = batch["image"].shape[0]
    size = self.config.data.image_size
    mask = jnp.zeros((b, self.num_patches), bool).at[:, : self.config.method.num_masked].set(True)
    visible, masked = common.visible_and_masked(mask, self.config.method.num_masked)
    images = jnp.zeros((b, size, size, 3), self.vit_kw["dtype"])
    return self.model.init({"params": rng}, images, visible, masked, train=False)

  def forward(self, params, consts, batch, rng, train: bool):
    visible, masked = common.visible_and_masked(batch["mask"], self.config.method.num_masked)
    x = transforms.normalize(batch["image"], dtype=jnp.float32)
    logits = self.model.apply(
      {"params": params},
      x.astype(self.vit_kw["dtype"]),
      visible,
      masked,
      train=train,
      rngs={"dropout": rng} if train else {},
    )
    targets = jnp.take_along_axis(self.targets(consts, batch), masked, axis=1)
    return logits, targets

  def loss(self, params, extra, consts, batch, rng, train: bool = True):
    del extra
    logits, targets = self.forward(params, consts, batch, rng, train)
    loss = common.token_cross_entropy(logits, targets).mean()
    return loss, {"loss": loss, "token_acc": common.token_accuracy(logits, targets)}, {}

  @staticmethod
  def encoder_params(params):
    return params["backbone"]
