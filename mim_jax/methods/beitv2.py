"""BEiT v2: masked image modelling on VQ-KD tokens with patch aggregation
(microsoft/unilm:beit2/modeling_pretrain.py, beit2/engine_for_pretraining.py).
With `method.head_layers=0` it is BEiT-style MIM without aggregation: PeCo's BERT
pre-training (`method.name='peco_mim'`, configs/peco_vitb.py).

Per image a block mask of `num_masked` patches (75 of 196, the v2 generator with the random
top-up to an exact count). The ViT (shared relative position bias, no absolute positions,
mask-token mixing, layer scale) sees the masked image; two cross-entropies over the masked
positions only, summed with equal weights (engine_for_pretraining.py):
  * main: final layer -> final norm -> lm_head;
  * patch aggregation (cls-pt): [final-layer cls (before the norm), layer-`early_layers`
    patch tokens] -> `head_layers` extra blocks (same shared bias; PyTorch-default init +
    depth rescale only, `common.aggregation_blocks`) -> the SAME final norm -> the SAME
    lm_head (shared_lm_head=True, the default). `shared_lm_head=False` gives the ablation's own
    LN + Linear.
Targets: any tokenizer (VQ-KD by default), online on the second view or from a token cache
(`token_targets.TokenTargets`).

The final norm lives beside the backbone (params['norm']), because both branches use it;
`encoder_params` puts it back into the encoder tree, the layout evaluation expects.
model.scan_layers / model.remat apply to the backbone's blocks; the aggregation blocks stay
unrolled.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import masking
from mim_jax import visual
from mim_jax.data import transforms
from mim_jax.methods import common
from mim_jax.methods import token_targets
from mim_jax.models import vit


class BEiTv2Model(nn.Module):
  """Backbone + shared final norm + lm_head + patch-aggregation blocks.

  Returns (main logits, aggregation logits) at the `select` positions, fp32; with
  head_layers=0 (BEiT-style MIM, PeCo) there is no aggregation head and the second is None."""

  vit_kw: dict
  vocab_size: int
  early_layers: int
  head_layers: int
  shared_lm_head: bool = True

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
      final_norm=False,
      name="backbone",
    )
    # The last blocks are read at the selected tokens (and the backbone's at the cls, for
    # the aggregation head) only, and compute those alone (vit.Block's outputs_at).
    patch_tokens = select + 1  # token 0 is the cls
    read = patch_tokens
    if self.head_layers:
      read = jnp.concatenate([jnp.zeros_like(select[:, :1]), patch_tokens], axis=1)
    out = backbone(
      images,
      mask=mask,
      train=train,
      return_layers=(self.early_layers,) if self.head_layers else (),
      last_outputs_at=read,
    )
    norm = vit.layer_norm(kw.get("ln_eps", 1e-6), jnp.float32, "norm")
    lm_head = vit.Dense(
      self.vocab_size,
      dtype=dtype,
      name="lm_head",
      kernel_init=nn.with_logical_partitioning(
        vit.trunc_normal_init(0.02, "std"), ("embed", "vocab")
      ),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
    )
    head = lambda x: lm_head(vit._apply_norm(norm, x)).astype(jnp.float32)  # pylint: disable=protected-access

    logits = head(out["last"][:, 1:] if self.head_layers else out["last"])
    if self.head_layers == 0:  # BEiT (v1) / PeCo MIM: no patch aggregation
      return logits, None

    # Patch aggregation: final cls (pre-norm) + layer-l patches through the extra blocks.
    x = jnp.concatenate([out["last"][:, :1], out["layers"][self.early_layers][:, 1:]], axis=1)
    x = common.aggregation_blocks(
      x,
      kw,
      out["rel_pos_bias"],
      early_layers=self.early_layers,
      head_layers=self.head_layers,
      prefix="cls_pt_block",
      train=train,
      outputs_at=patch_tokens,
    )
    if self.shared_lm_head:
      agg_logits = head(x)
    else:
      own_norm = vit.layer_norm(kw.get("ln_eps", 1e-6), jnp.float32, "cls_pt_norm")
      own_head = vit.Dense(
        self.vocab_size,
        dtype=dtype,
        name="cls_pt_lm_head",
        kernel_init=nn.with_logical_partitioning(
          vit.trunc_normal_init(0.02, "std"), ("embed", "vocab")
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
      )
      agg_logits = own_head(vit._apply_norm(own_norm, x)).astype(jnp.float32)  # pylint: disable=protected-access
    return logits, agg_logits


class BEiTv2:
  """The BEiT v2 method plug-in (interface: mim_jax/methods/__init__.py)."""

  def __init__(self, config, *, workdir: str | None = None, source=None):
    self.config = config
    m = config.method
    self.patch, self.grid = common.patch_grid(config)
    self.num_patches = self.grid[0] * self.grid[1]
    if not 0 < m.num_masked <= self.num_patches:
      raise ValueError(
        f"config.method.num_masked={m.num_masked} must be in [1, {self.num_patches}] patches"
      )
    self.vit_kw = common.backbone_kwargs(config.model, config.dtype)
    if m.head_layers and not 1 <= m.early_layers <= self.vit_kw["depth"]:
      raise ValueError(
        f"config.method.early_layers={m.early_layers} must be in [1, depth={self.vit_kw['depth']}]"
      )
    self.targets = token_targets.TokenTargets(
      config, self.grid, patch_size=self.patch, workdir=workdir, source=source
    )
    self.model = BEiTv2Model(
      self.vit_kw,
      vocab_size=self.targets.vocab_size,
      early_layers=m.early_layers,
      head_layers=m.head_layers,
      shared_lm_head=m.shared_lm_head,
    )

  # ---------------------------------------------------------------- plug-in interface
  def wrap_source(self, source):
    return self.targets.wrap_source(source)

  def consts(self) -> dict:
    return self.targets.consts()

  def frozen_fingerprint(self) -> dict[str, str]:
    return self.targets.frozen_fingerprint()

  def fingerprint(self) -> dict:
    c = self.config
    return {
      "method": c.method.name,
      "model.variant": c.model.variant,
      "model.width": c.model.width,
      "model.depth": c.model.depth,
      "model.heads": c.model.heads,
      "model.scan_layers": c.model.scan_layers,
      "method.early_layers": c.method.early_layers,
      "method.head_layers": c.method.head_layers,
      "method.shared_lm_head": c.method.shared_lm_head,
      "vocab_size": self.targets.vocab_size,
      "data.image_size": c.data.image_size,
    }

  def prepare(self, example: dict, rng: np.random.Generator) -> dict:
    m = self.config.method
    example["mask"] = masking.block_mask(
      rng,
      grid=self.grid,
      num_masked=m.num_masked,
      min_block=m.min_block,
      min_aspect=m.min_aspect,
      exact=True,
    )
    if not self.targets.online:
      example.pop("image2", None)  # the tokens come from the cache
    return example

  def init(self, rng, batch) -> Any:
    b = batch["image"].shape[0]
    size = self.config.data.image_size
    images = jnp.zeros((b, size, size, 3), self.vit_kw["dtype"])
    mask = jnp.zeros((b, self.num_patches), bool)
    select = jnp.zeros((b, self.config.method.num_masked), jnp.int32)
    return self.model.init({"params": rng}, images, mask, select, train=False)

  def forward(self, params, consts, batch, rng, train: bool):
    """(main logits, aggregation logits, targets) at the masked positions."""
    select = common.selected_positions(batch["mask"], self.config.method.num_masked)
    x = transforms.normalize(batch["image"], dtype=jnp.float32)
    logits, agg = self.model.apply(
      {"params": params},
      x.astype(self.vit_kw["dtype"]),
      batch["mask"],
      select,
      train=train,
      rngs={"dropout": rng} if train else {},
    )
    targets = jnp.take_along_axis(self.targets(consts, batch), select, axis=1)
    return logits, agg, targets

  def loss(self, params, extra, consts, batch, rng, train: bool = True):
    del extra
    logits, agg, targets = self.forward(params, consts, batch, rng, train)
    ce = lambda z: common.token_cross_entropy(z, targets).mean()
    loss_main = ce(logits)
    metrics = {"loss_main": loss_main, "token_acc": common.token_accuracy(logits, targets)}
    loss = loss_main
    if agg is not None:
      loss_agg = ce(agg)
      loss = loss_main + loss_agg  # equal weights, engine_for_pretraining.py
      metrics.update(loss_agg=loss_agg, token_acc_agg=common.token_accuracy(agg, targets))
    metrics["loss"] = loss
    return loss, metrics, {}

  @staticmethod
  def encoder_params(params):
    return dict(params["backbone"], norm=params["norm"])

  def visualize(self, params, extra, consts, batch, max_images: int = 8) -> np.ndarray:
    """Rows: input | masked (grey) | predicted tokens at the masked patches, right (green
    tint) or wrong (red tint); columns: the images, with their share of right tokens."""
    del extra
    batch = {k: jnp.asarray(v[:max_images]) for k, v in batch.items()}
    logits, _, targets = jax.jit(lambda p, b: self.forward(p, consts, b, None, False))(
      params, batch
    )
    right = np.asarray(jnp.argmax(logits, -1) == targets)
    select = np.asarray(common.selected_positions(batch["mask"], self.config.method.num_masked))
    img = np.asarray(batch["image"], np.float32) / 255.0
    b, n = img.shape[0], self.grid[0] * self.grid[1]
    flags = {"masked": np.zeros((b, n), bool), "right": np.zeros((b, n), bool)}
    for i in range(b):
      flags["masked"][i, select[i]] = True
      flags["right"][i, select[i][right[i]]] = True
    p, gw = self.patch, self.grid[1]
    masked = visual.tint(img, flags["masked"], (0.5, 0.5, 0.5), p, gw, alpha=1.0)
    verdict = visual.tint(img, flags["right"], (0.2, 0.9, 0.2), p, gw)
    verdict = visual.tint(verdict, flags["masked"] & ~flags["right"], (0.9, 0.2, 0.2), p, gw)
    cols = [f"#{i + 1}: {int(right[i].sum())}/{right.shape[1]} right" for i in range(b)]
    return visual.labelled_grid(
      [("input", img), ("masked", masked), ("predicted (green = right)", verdict)], cols
    )
