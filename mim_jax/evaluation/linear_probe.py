"""Linear probe: a BatchNorm without affine parameters, then one linear layer, on frozen features.

Recipes (the configs in configs/eval/ cite them):
  * BEiT v2 (Sec. 4.2 "Linear probing", and MaPeT App. 8 which follows it): AdamW, lr 4e-3,
    weight decay 1e-4, 50 epochs, batch 1024, cosine to 0; the image representation is the
    cls token for models with patch aggregation, the mean of the patch tokens otherwise.
  * CAE v2 (App. A, Table 9; "following He et al. (2022)", i.e. MAE's main_linprobe.py): an
    extra BatchNorm *without affine transformation* after the encoder, LARS with base lr 0.1
    (lr = base * batch / 256), weight decay 0, momentum 0.9, batch 16384, 10 warm-up epochs,
    90 epochs, cls token (`--use_cls` in `Atten4Vis/CAE:project/CAEv2/scripts/caev2_base_300e.sh`;
    docs/reference_details.md#cae-v2-recipe-and-evaluation).
The BatchNorm is MAE's `BatchNorm1d(affine=False, eps=1e-6)` (momentum 0.1 in PyTorch's
convention = 0.9 in Flax's). Its statistics are over the global batch (the batch axis is
sharded, so the mean is a cross-device reduction inside jit). One difference that cannot
matter at these batch sizes: PyTorch's running variance uses the unbiased batch variance,
Flax's the biased one. The head is initialised like MAE's / BEiT's probe head:
weights N(0, 0.01), bias 0.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mim_jax import optim

POOLS = ("cls", "mean")


def pool_features(out: dict, pool: str) -> jax.Array:
  """Image representation from VisionTransformer outputs, fp32.

  'cls': the cls token after the final norm; 'mean': the mean of the patch tokens after the
  final norm (BEiT v2 Sec. 4.2, CAE's `VisionTransformerForLinearProbing` without --use_cls).
  """
  tokens = out["normed"].astype(jnp.float32)
  if pool == "cls":
    return tokens[:, 0]
  if pool == "mean":
    return tokens[:, 1:].mean(axis=1)
  raise ValueError(f"config.pool must be one of {POOLS}, got {pool!r}")


class ProbeHead(nn.Module):
  """BatchNorm1d(affine=False) -> Linear, all in fp32."""

  num_classes: int
  batch_norm: bool = True
  momentum: float = 0.9
  epsilon: float = 1e-6
  init_std: float = 0.01

  @nn.compact
  def __call__(self, features: jax.Array, *, train: bool) -> jax.Array:
    x = features.astype(jnp.float32)
    if self.batch_norm:
      x = nn.BatchNorm(
        use_running_average=not train,
        momentum=self.momentum,
        epsilon=self.epsilon,
        use_scale=False,
        use_bias=False,
        dtype=jnp.float32,
        name="bn",
      )(x)
    return nn.Dense(
      self.num_classes,
      dtype=jnp.float32,
      kernel_init=nn.initializers.normal(self.init_std),
      bias_init=nn.initializers.zeros,
      name="head",
    )(x)


def probe_lr(cfg, batch_size: int) -> float:
  """Absolute lr: `cfg.lr` when set, else `cfg.base_lr * batch / 256` (MAE / CAE v2 rule)."""
  if cfg.lr:
    return float(cfg.lr)
  return float(cfg.base_lr) * batch_size / 256.0


def _matrices(params) -> Any:
  """True for parameters with ndim > 1 (MAE's LARS: only these get decay and trust ratio)."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def lars(
  learning_rate,
  *,
  weight_decay: float = 0.0,
  momentum: float = 0.9,
  trust_coefficient: float = 0.001,
) -> optax.GradientTransformation:
  """MAE's LARS (`util/lars.py`), from optax parts.

  For ndim > 1: d = g + wd p, then d *= trust * ||p|| / ||d|| (1 where either norm is 0);
  biases take g unchanged. Then mu = momentum mu + d and p -= lr mu. The momentum buffer
  holds lr-free updates as in MAE; `optax.lars` would scale by lr before the momentum,
  which differs while the lr changes (warm-up, cosine).
  """
  return optax.chain(
    optax.add_decayed_weights(weight_decay, mask=_matrices),
    optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), _matrices),
    optax.trace(decay=momentum, nesterov=False),
    optax.scale_by_learning_rate(learning_rate),
  )


def make_probe_optimizer(cfg, total_steps: int, batch_size: int):
  """(optax transformation, schedule) from config.optim of a linear-probe config."""
  lr = probe_lr(cfg, batch_size)
  schedule = optim.cosine_schedule(lr, total_steps, cfg.warmup_steps, cfg.min_lr)
  if cfg.name == "adamw":
    # torch.optim.AdamW over every head parameter (BEiT's probe passes them all, biases too).
    tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  elif cfg.name == "lars":
    tx = lars(
      schedule,
      weight_decay=cfg.weight_decay,
      momentum=cfg.momentum,
      trust_coefficient=cfg.trust_coefficient,
    )
  else:
    raise ValueError(f"config.optim.name must be 'adamw' or 'lars', got {cfg.name!r}")
  return tx, schedule


def cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None):
  """Mean integer-label cross-entropy in fp32 (optionally over rows with weight 1)."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  if weights is None:
    return losses.mean()
  weights = weights.astype(jnp.float32)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def head_step(head: ProbeHead, tx, params, batch_stats, opt_state, features, labels):
  """One update of the probe on a batch of (frozen) features.

  Returns (params, batch_stats, opt_state, metrics).
  """

  def loss_fn(p):
    logits, updates = head.apply(
      {"params": p, "batch_stats": batch_stats}, features, train=True, mutable=["batch_stats"]
    )
    return cross_entropy(logits, labels), (logits, updates["batch_stats"])

  (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  acc = jnp.mean(jnp.argmax(logits, -1) == labels)
  return (
    params,
    new_stats,
    opt_state,
    {"loss": loss, "train_top1": acc, "grad_norm": optax.global_norm(grads)},
  )


def head_logits(head: ProbeHead, params, batch_stats, features):
  return head.apply({"params": params, "batch_stats": batch_stats}, features, train=False)
