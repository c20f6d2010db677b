"""End-to-end fine-tuning of a pre-trained encoder for classification (BEiT protocol).

The model is BEiT's `VisionTransformer` (`microsoft/unilm:beit2/modeling_finetune.py`;
docs/reference_details.md#beit-fine-tuning):
  * per-layer relative position tables (`use_rel_pos_bias=True`), filled from the
    pre-trained shared table (backbones.finetune_params), the pre-training's absolute
    positions (none / learned / CAE v2's fixed sin-cos);
  * `use_mean_pooling`: no final norm on the tokens; the mean of the patch tokens goes
    through `fc_norm` (LayerNorm eps 1e-6); with pool='cls' the final norm is kept and the
    cls token is used instead (BEiT's `use_mean_pooling=False`);
  * the head is trunc_normal(0.02) then multiplied by `init_scale` = 0.001 (weights and the
    zero bias), as in `microsoft/unilm:beit2/modeling_finetune.py`;
  * drop path linspace(0, rate, depth), timm-style init (trunc normal +-2) for fresh weights.
The training loss is soft-target cross-entropy on mixup / cutmix targets with label
smoothing (augment.py); layer-wise lr decay is lr_decay.py; EMA of the weights (timm
ModelEmaV2, decay 0.9999 in BEiT's `--model_ema`) is optional.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mim_jax.data import transforms
from mim_jax.evaluation import augment
from mim_jax.models import vit


class ClassifierViT(nn.Module):
  """Encoder ('backbone') + pooling + fc_norm + head; returns fp32 logits."""

  vit_kw: dict
  num_classes: int
  pool: str = "mean"
  head_init_scale: float = 0.001

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    kw = dict(self.vit_kw)
    kw.update(
      rel_pos="per_layer" if kw.get("rel_pos", "shared") != "none" else "none",
      use_mask_token=False,
      final_norm=self.pool == "cls",
    )
    kw.setdefault("weight_init", "timm")
    out = vit.VisionTransformer(**kw, name="backbone")(images, train=train)
    if self.pool == "mean":
      feats = out["last"][:, 1:].astype(jnp.float32).mean(axis=1)
      feats = vit.layer_norm(1e-6, kw.get("param_dtype", jnp.float32), "fc_norm")(feats)
    elif self.pool == "cls":
      feats = out["normed"][:, 0].astype(jnp.float32)
    else:
      raise ValueError(f"config.pool must be 'mean' or 'cls', got {self.pool!r}")
    scale = self.head_init_scale
    base = vit.trunc_normal_init(0.02, "abs2")
    kernel_init = lambda key, shape, dtype=jnp.float32: base(key, shape, dtype) * scale
    return nn.Dense(
      self.num_classes,
      dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(kernel_init, ("embed", "vocab")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
      name="head",
    )(feats)


def normalize_images(
  images: jax.Array, mean=transforms.IMAGENET_MEAN, std=transforms.IMAGENET_STD
) -> jax.Array:
  return transforms.normalize(images, mean, std, dtype=jnp.float32)


def train_loss(
  model: ClassifierViT,
  params,
  batch: dict,
  rng: jax.Array,
  aug_cfg,
  *,
  num_classes: int,
  dtype=jnp.float32,
):
  """Normalise -> random erasing -> mixup/cutmix -> forward (drop path) -> soft CE."""
  k_erase, k_mix, k_drop = jax.random.split(rng, 3)
  images = normalize_images(batch["image"])
  if "erase" in batch:
    images = augment.erase(k_erase, images, batch["erase"])
  images, targets, _ = augment.mixup_cutmix(
    k_mix,
    images,
    batch["label"],
    num_classes=num_classes,
    mixup_alpha=aug_cfg.mixup,
    cutmix_alpha=aug_cfg.cutmix,
    prob=aug_cfg.mixup_prob,
    switch_prob=aug_cfg.mixup_switch_prob,
    label_smoothing=aug_cfg.label_smoothing,
  )
  logits = model.apply(
    {"params": params}, images.astype(dtype), train=True, rngs={"dropout": k_drop}
  )
  loss = augment.soft_cross_entropy(logits, targets)
  return loss, logits


def make_train_step(
  model: ClassifierViT,
  tx: optax.GradientTransformation,
  schedule,
  aug_cfg,
  *,
  num_classes: int,
  ema_decay: float = 0.0,
  dtype=jnp.float32,
):
  """step(state, batch) -> (state, metrics); state = {step, params, opt_state, rng[, ema]}."""

  def step_fn(state, batch):
    rng = jax.random.fold_in(state["rng"], state["step"])
    (loss, logits), grads = jax.value_and_grad(
      lambda p: train_loss(model, p, batch, rng, aug_cfg, num_classes=num_classes, dtype=dtype),
      has_aux=True,
    )(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
    if ema_decay:
      new["ema"] = optax.incremental_update(params, state["ema"], step_size=1.0 - ema_decay)
    metrics = {
      "loss": loss,
      "grad_norm": optax.global_norm(grads),
      "lr": schedule(state["step"]),
      "train_top1": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
    }
    return new, metrics

  return step_fn


def make_eval_step(model: ClassifierViT, dtype=jnp.float32):
  """eval(params, batch) -> {'correct', 'correct5', 'loss_sum', 'count'} over valid rows."""

  def eval_fn(params, batch):
    logits = model.apply(
      {"params": params}, normalize_images(batch["image"]).astype(dtype), train=False
    )
    return classification_sums(logits, batch["label"], batch["valid"])

  return eval_fn


def classification_sums(logits, labels, valid) -> dict:
  """Sums (not means) over the valid rows, so batches and processes can be added up."""
  logits = logits.astype(jnp.float32)
  w = valid.astype(jnp.float32)
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return {
    "correct": jnp.sum(w * (jnp.argmax(logits, -1) == labels)),
    "correct5": jnp.sum(w * jnp.any(top5 == labels[:, None], -1)),
    "loss_sum": jnp.sum(w * losses),
    "count": jnp.sum(w),
  }


def ema_init(params: Any) -> Any:
  """The EMA starts as a copy of the (loaded) weights, as timm's ModelEmaV2."""
  return jax.tree.map(jnp.copy, params)
