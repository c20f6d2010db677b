"""Layer-wise learning-rate decay (`microsoft/unilm:beit2/optim_factory.py`), from optax parts.

docs/reference_details.md#beit-fine-tuning summarises the official rule.

With L blocks, parameter p gets lr * decay ** (L + 1 - layer_id(p)), where layer_id is
  0      cls_token, mask_token, pos_embed, patch_embed.*
  k + 1  blocks.k.*   (every block parameter, its relative position table included)
  L + 1  rel_pos_bias.* (a shared table) and everything else: final norm, fc_norm, head.
So the head learns at the full lr and the patch embedding at decay ** (L + 1).

The reference scales each parameter group's lr, which torch's AdamW applies to both the Adam
step and the decoupled weight decay; here the same is
  scale_by_adam -> add_decayed_weights(mask) -> multi_transform(scale per layer id) -> lr,
one `optax.scale` per layer id chosen by label.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

from mim_jax import optim

_BLOCK = re.compile(r"^blocks_(\d+)$")
_EMBEDDING_NAMES = ("cls_token", "mask_token", "pos_embed", "patch_embed")


def layer_id(path: tuple[str, ...], depth: int, backbone_key: str = "backbone") -> int:
  """The reference's `get_num_layer_for_vit` on a Flax parameter path (names, not keys).

  Paths outside `backbone_key` (fc_norm, head) are 'everything else' -> depth + 1.
  """
  if not path or path[0] != backbone_key:
    return depth + 1
  rest = path[1:]
  if not rest:
    return depth + 1
  if rest[0] in _EMBEDDING_NAMES:
    return 0
  match = _BLOCK.match(rest[0])
  if match:
    k = int(match.group(1))
    if k >= depth:
      raise ValueError(f"parameter {'/'.join(path)} is beyond depth={depth}")
    return k + 1
  if rest[0] == "blocks":
    raise ValueError(
      "layer-wise lr decay needs unrolled blocks (blocks_0..); set "
      "config.model.scan_layers=False for fine-tuning"
    )
  return depth + 1  # rel_pos_bias (shared), norm, fc_norm, ...


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def layer_ids(params: Any, depth: int, backbone_key: str = "backbone") -> Any:
  return jax.tree_util.tree_map_with_path(
    lambda p, _: layer_id(_names(p), depth, backbone_key), params
  )


def layer_scales(depth: int, decay: float) -> list[float]:
  """values[i] = decay ** (depth + 1 - i), i = 0 .. depth + 1 (`LayerDecayValueAssigner`)."""
  return [float(decay ** (depth + 1 - i)) for i in range(depth + 2)]


def scale_by_layer(
  depth: int, decay: float, backbone_key: str = "backbone"
) -> optax.GradientTransformation:
  """Multiplies each update by its layer's decay factor (optax.multi_transform by label)."""
  scales = layer_scales(depth, decay)

  def labels(params):
    return jax.tree.map(lambda i: f"layer_{i:03d}", layer_ids(params, depth, backbone_key))

  return optax.multi_transform(
    {f"layer_{i:03d}": optax.scale(s) for i, s in enumerate(scales)}, labels
  )


def make_finetune_optimizer(cfg, total_steps: int, depth: int, *, backbone_key: str = "backbone"):
  """AdamW with layer-wise lr decay, optional clipping, and the reference cosine schedule.

  `cfg` is config.optim of a fine-tuning config (lr, min_lr, warmup_steps, b1, b2, eps,
  weight_decay, clip_grad_norm, layer_decay, no_decay_names). Returns (tx, schedule).
  """
  schedule = optim.cosine_schedule(cfg.lr, total_steps, cfg.warmup_steps, cfg.min_lr)
  mask = lambda p: optim.weight_decay_mask(p, tuple(cfg.no_decay_names))
  parts = []
  if cfg.clip_grad_norm and cfg.clip_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
  parts += [
    optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
    optax.add_decayed_weights(cfg.weight_decay, mask=mask),
  ]
  if cfg.layer_decay != 1.0:
    parts.append(scale_by_layer(depth, cfg.layer_decay, backbone_key))
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts), schedule
