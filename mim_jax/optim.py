"""Optimizer and learning-rate schedules, built from optax parts.

The schedule reproduces the per-step `cosine_scheduler` of BEiT, CCViT and CAE
(`microsoft/unilm:beit2/utils.py`; docs/reference_details.md#learning-rate-schedule): warm-up
is `linspace(0, base, warmup)` (it starts at 0 and *reaches* `base` on the last warm-up step),
then `final + (base - final)/2 * (1 + cos(pi * i / n))` per step.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

# Parameters never decayed by name, beyond the ndim <= 1 rule: BEiT's `no_weight_decay()` =
# {pos_embed, cls_token} (`microsoft/unilm:beit2/optim_factory.py`). Note that `mask_token` and
# the shared relative-position table ARE decayed in the official code, and so are they here
# (docs/reference_details.md#weight-decay).
DEFAULT_NO_DECAY_NAMES = ("cls_token", "pos_embed")


def cosine_schedule(
  base_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0
) -> optax.Schedule:
  """Per-step linear warm-up from 0 to `base_lr`, then cosine to `min_lr`."""
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}")
  warmup_steps = max(0, min(warmup_steps, total_steps))
  decay_steps = max(total_steps - warmup_steps, 1)
  # optax's cosine at step i: min + (base - min)/2 (1 + cos(pi i / n)): the reference.
  cosine = optax.cosine_decay_schedule(
    init_value=base_lr, decay_steps=decay_steps, alpha=(min_lr / base_lr) if base_lr else 0.0
  )
  if warmup_steps == 0:
    return cosine
  if warmup_steps == 1:
    warmup = optax.constant_schedule(0.0)
  else:
    # linspace(0, base, W): value base * i / (W - 1) for i < W.
    warmup = optax.linear_schedule(0.0, base_lr, warmup_steps - 1)
  return optax.join_schedules([warmup, cosine], boundaries=[warmup_steps])


def _path_name(path) -> str:
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return "/".join(parts)


def weight_decay_mask(
  params: Any,
  no_decay_names: Sequence[str] = DEFAULT_NO_DECAY_NAMES,
  scanned_prefix: str | None = None,
) -> Any:
  """True where a parameter is decayed: ndim > 1 and not named in `no_decay_names`.

  Biases, LayerNorm scales, layer-scale gammas and q/v biases have ndim <= 1 and are
  excluded, as in the reference's param groups. Scanned (stacked) layers carry an extra
  leading axis: parameters under `scanned_prefix` have their ndim counted without it.
  """
  pattern = re.compile("|".join(rf"(^|/){re.escape(n)}($|/)" for n in no_decay_names))

  def decide(path, leaf):
    name = _path_name(path)
    ndim = jnp.ndim(leaf)
    if scanned_prefix and re.search(rf"(^|/){re.escape(scanned_prefix)}(/|$)", name):
      ndim -= 1
    if ndim <= 1:
      return False
    return not (no_decay_names and pattern.search(name))

  return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(cfg, total_steps: int, *, scanned_prefix: str | None = None):
  """AdamW + global-norm clipping + the reference schedule.

  Returns (optax transformation, schedule). `cfg` is `config.optim`.
  """
  schedule = cosine_schedule(cfg.lr, total_steps, cfg.warmup_steps, cfg.min_lr)
  mask = lambda p: weight_decay_mask(p, tuple(cfg.no_decay_names), scanned_prefix)
  parts = []
  if cfg.clip_grad_norm and cfg.clip_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
  parts.append(
    optax.adamw(
      schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask
    )
  )
  return optax.chain(*parts), schedule
