"""CAE v2: a visible-patch encoder and a latent contextual regressor aligned to CLIP
latents (Atten4Vis/CAE `--model_type caev2`: models/modeling_cae.py,
models/modeling_cae_helper.py, furnace/engine_for_pretraining.py).

  encoder    ViT on [cls, visible patches] only, fixed 2-D sin-cos positions (zero for cls),
             q/v bias, layer scale 0.1, final LN (eps 1e-6), no relative position bias;
  regressor  `encoder_to_regresser` Linear + LN when the regressor is narrower (tiny: 96);
             mask queries (one learned token per masked patch, raster order) through `depth`
             cross-attention blocks: q = LN_q(x_q + pos_q), k = LN_k(kv + pos_k),
             v = LN_v(kv) with kv = [visible latents, current queries] (positions enter
             queries and keys only, never values), then y = LN2(x_q + g1 attn),
             y = y + g2 MLP(y) (post-norm on the residual stream); no final LN (caev2);
  head       one shared LN, applied separately to cls, visible and masked, concatenated as
             [cls, visible, masked], Linear(d, 512), l2-normalised;
  loss       mean over all B x 197 tokens of 1 - cos against the CLIP ViT-B/16 tokens
             (ln_post + proj on every token, cls included) in the same [cls, visible,
             masked] order.
Init (`_init_weights` in Atten4Vis/CAE:models/modeling_cae.py): every Linear xavier_uniform
with zero bias (`--fix_init_weight` off), no depth rescale; patch conv, cls and mask tokens
trunc_normal(0.02, +-std).
model.scan_layers / model.remat apply to the encoder's blocks; the regressor's few
cross-attention blocks stay unrolled.
The teacher sees the second view (the same crop) with CLIP's mean/std.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mim_jax import masking
from mim_jax.data import transforms
from mim_jax.methods import common
from mim_jax.models import vit

_dense = common.xavier_dense


class CrossAttention(nn.Module):
  """Bias-free q/k/v Linear layers plus learned q and v biases (the k bias is zero)."""

  dim: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q_in, k_in, v_in):
    b, nq, _ = q_in.shape
    hd = self.dim // self.num_heads
    zeros = nn.with_logical_partitioning(nn.initializers.zeros, ("qkv",))
    q = _dense(self.dim, ("embed", "qkv"), "q", self.dtype, use_bias=False)(q_in)
    q = q + self.param("q_bias", zeros, (self.dim,)).astype(q.dtype)
    k = _dense(self.dim, ("embed", "qkv"), "k", self.dtype, use_bias=False)(k_in)
    v = _dense(self.dim, ("embed", "qkv"), "v", self.dtype, use_bias=False)(v_in)
    v = v + self.param("v_bias", zeros, (self.dim,)).astype(v.dtype)
    split = lambda t: t.reshape(b, t.shape[1], self.num_heads, hd).transpose(0, 2, 1, 3)
    q, k, v = split(q), split(k), split(v)
    logits = jnp.einsum(
      "bhqd,bhkd->bhqk", q * jnp.asarray(hd**-0.5, q.dtype), k, preferred_element_type=jnp.float32
    )
    probs = vit.softmax(logits).astype(self.dtype)
    out = jnp.einsum("bhqk,bhkd->bqhd", probs, v).reshape(b, nq, self.dim)
    return _dense(self.dim, ("qkv", "embed"), "proj", self.dtype)(out)


class RegressorBlock(nn.Module):
  dim: int
  num_heads: int
  layer_scale_init: float = 0.1
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_q, kv, pos_q, pos_k, *, train: bool = False):
    ln = lambda name: vit.layer_norm(1e-6, jnp.float32, name)
    norm = lambda name, t: vit._apply_norm(ln(name), t)  # pylint: disable=protected-access
    attn = CrossAttention(self.dim, self.num_heads, self.dtype, name="cross_attn")(
      norm("norm1_q", x_q + pos_q), norm("norm1_k", kv + pos_k), norm("norm1_v", kv)
    )
    scale = nn.with_logical_partitioning(
      nn.initializers.constant(self.layer_scale_init), ("embed",)
    )
    g1 = self.param("gamma_1", scale, (self.dim,)).astype(self.dtype)
    g2 = self.param("gamma_2", scale, (self.dim,)).astype(self.dtype)
    y = x_q + vit._drop_path(self, g1 * attn, self.drop_path, train)  # pylint: disable=protected-access
    y = norm("norm2", y)  # post-norm on the residual stream
    mlp = vit.Mlp(self.dim, 4 * self.dim, "xavier", None, self.dtype, name="mlp")
    return y + vit._drop_path(self, g2 * mlp(y), self.drop_path, train)  # pylint: disable=protected-access


class CAEv2Model(nn.Module):
  """Returns l2-normalised predictions (B, 1 + V + M, target_dim) in [cls, visible, masked]
  order, fp32."""

  vit_kw: dict
  regressor_dim: int
  regressor_depth: int
  regressor_heads: int
  target_dim: int = 512
  regressor_drop_path: float = 0.1

  @nn.compact
  def __call__(self, images, visible, masked, *, train: bool = False):
    kw = dict(self.vit_kw)
    dtype = kw.get("dtype", jnp.float32)
    backbone = vit.VisionTransformer(
      **kw,
      abs_pos="sincos",
      rel_pos="none",
      weight_init="xavier",
      depth_rescale=False,
      name="backbone",
    )
    latents = backbone(images, keep=visible, train=train)["normed"]  # (B, 1 + V, D)
    d = self.regressor_dim
    if d != kw["embed_dim"]:
      latents = _dense(d, ("embed", None), "encoder_to_regresser", dtype)(latents)
      latents = vit._apply_norm(
        vit.layer_norm(1e-6, jnp.float32, "encoder_to_regresser_norm"),  # pylint: disable=protected-access
        latents,
      )
    grid = (images.shape[1] // kw["patch_size"], images.shape[2] // kw["patch_size"])
    table = jnp.asarray(vit.sincos_2d_pos_embed(grid, d, cls_token=False), dtype)
    pos_v, pos_m = table[visible], table[masked]  # (B, V|M, d)
    b, m = masked.shape
    mask_token = self.param(
      "mask_token",
      nn.with_logical_partitioning(vit.trunc_normal_init(0.02, "std"), (None, None, "embed")),
      (1, 1, d),
    )
    x = jnp.broadcast_to(mask_token.astype(dtype), (b, m, d))
    vis = latents[:, 1:].astype(dtype)
    rates = vit.drop_path_rates(self.regressor_drop_path, self.regressor_depth)
    for i in range(self.regressor_depth):
      x = RegressorBlock(
        d,
        self.regressor_heads,
        kw.get("layer_scale_init", 0.1),
        rates[i],
        dtype,
        name=f"regressor_{i}",
      )(
        x,
        jnp.concatenate([vis, x], axis=1),
        pos_m,
        jnp.concatenate([pos_v, pos_m], axis=1),
        train=train,
      )
    shared = vit.layer_norm(1e-6, jnp.float32, "head_norm")
    parts = [vit._apply_norm(shared, t) for t in (latents[:, :1], vis, x)]  # pylint: disable=protected-access
    out = _dense(self.target_dim, ("embed", None), "head", dtype)(
      jnp.concatenate(parts, axis=1).astype(dtype)
    )
    out = out.astype(jnp.float32)
    return out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)


class CAEv2:
  """The CAE v2 plug-in (interface: mim_jax/methods/__init__.py)."""

  def __init__(self, config, *, workdir: str | None = None, source=None):
    del workdir, source
    self.config = config
    m, d = config.method, config.data
    self.vit_kw = common.backbone_kwargs(config.model, config.dtype)
    self.patch, self.grid = common.patch_grid(config)
    self.num_patches = self.grid[0] * self.grid[1]
    if not 0 < m.num_masked < self.num_patches:
      raise ValueError(
        f"config.method.num_masked={m.num_masked} must be in [1, {self.num_patches - 1}]"
      )
    for f in ("regressor_dim", "regressor_heads"):
      if m[f] <= 0 or m.regressor_dim % m.regressor_heads:
        raise ValueError(
          f"config.method.{f}: regressor_dim={m.regressor_dim} must be a "
          f"positive multiple of regressor_heads={m.regressor_heads}"
        )
    self.teacher = common.build_clip_teacher(config)
    arch = self.teacher.arch
    if (
      arch["image_size"] != d.second_image_size
      or arch["image_size"] // arch["patch_size"] != self.grid[0]
    ):
      raise ValueError(
        f"teacher/student grid mismatch: the student has {self.grid[0]}x{self.grid[1]} "
        f"patches (config.data.image_size, config.model.variant) but the CLIP teacher "
        f"({self.teacher.spec}) takes {arch['image_size']}px with patch "
        f"{arch['patch_size']}, and config.data.second_image_size={d.second_image_size}"
      )
    self.model = CAEv2Model(
      self.vit_kw,
      regressor_dim=m.regressor_dim,
      regressor_depth=m.regressor_depth,
      regressor_heads=m.regressor_heads,
      target_dim=arch["output_dim"],
      regressor_drop_path=m.regressor_drop_path,
    )

  # ---------------------------------------------------------------- plug-in interface
  def consts(self) -> dict:
    return {"teacher": self.teacher.params}

  def frozen_fingerprint(self) -> dict[str, str]:
    return common.clip_teacher_fingerprint(self.config, self.teacher)

  def fingerprint(self) -> dict:
    c = self.config
    fp = {
      "method": "caev2",
      "model.variant": c.model.variant,
      "model.width": c.model.width,
      "model.depth": c.model.depth,
      "model.heads": c.model.heads,
      "model.scan_layers": c.model.scan_layers,
      "data.image_size": c.data.image_size,
    }
    fp.update({f"method.{k}": v for k, v in c.method.items()})
    return fp

  def prepare(self, example: dict, rng: np.random.Generator) -> dict:
    m = self.config.method
    example["mask"] = masking.block_mask(
      rng,
      grid=self.grid,
      num_masked=m.num_masked,
      min_block=m.min_block,
      min_aspect=m.min_aspect,
      exact="loop",
    )
    return example

  def init(self, rng, batch) -> Any:
    b = batch["image"].shape[0]
    size = self.config.data.image_size
    mask = jnp.zeros((b, self.num_patches), bool).at[:, : self.config.method.num_masked].set(True)
    visible, masked = common.visible_and_masked(mask, self.config.method.num_masked)
    images = jnp.zeros((b, size, size, 3), self.vit_kw["dtype"])
    return self.model.init({"params": rng}, images, visible, masked, train=False)

  def forward(self, params, consts, batch, rng, train: bool):
    """(predictions, CLIP targets) (B, 1 + N, 512), both in [cls, visible, masked] order."""
    visible, masked = common.visible_and_masked(batch["mask"], self.config.method.num_masked)
    x = transforms.normalize(batch["image"], dtype=jnp.float32)
    pred = self.model.apply(
      {"params": params},
      x.astype(self.vit_kw["dtype"]),
      visible,
      masked,
      train=train,
      rngs={"dropout": rng} if train else {},
    )
    tokens = self.teacher.apply_tokens(
      consts["teacher"], batch["image2"].astype(jnp.float32) / 255.0
    )
    order = jnp.concatenate([jnp.zeros_like(visible[:, :1]), visible + 1, masked + 1], axis=1)
    return pred, jnp.take_along_axis(tokens, order[..., None], axis=1)

  def loss(self, params, extra, consts, batch, rng, train: bool = True):
    del extra
    pred, target = self.forward(params, consts, batch, rng, train)
    loss = common.cosine_rec_loss(pred, target)  # mean of 1 - cos over all tokens
    v = self.num_patches - self.config.method.num_masked
    cos = jnp.sum(pred * target / jnp.linalg.norm(target, axis=-1, keepdims=True), -1)
    return (
      loss,
      {
        "loss": loss,
        "cos_visible": jnp.mean(cos[:, 1 : 1 + v]),
        "cos_masked": jnp.mean(cos[:, 1 + v :]),
      },
      {},
    )

  @staticmethod
  def encoder_params(params):
    return params["backbone"]
