"""PyTorch BEiT checkpoints -> `vit.VisionTransformer` params, and scan layouts.

Accepts the timm `Beit` key layout (timm 1.0.31) and the official BEiT v2
(microsoft/unilm beit2) layout, which share names: `patch_embed.proj.*`,
`cls_token`, `mask_token`, `pos_embed`, `rel_pos_bias.relative_position_bias_table`
(shared table), `blocks.{i}.{norm1,norm2,attn.qkv,attn.proj,mlp.fc1,mlp.fc2}.*`,
`blocks.{i}.attn.{q_bias,v_bias,relative_position_bias_table}`,
`blocks.{i}.gamma_1/gamma_2` (timm's newer ViTs call layer scale `ls1.gamma`,
accepted too) and `norm.*`. timm's `VisionTransformer` layout is read too: its one
`attn.qkv.bias` is split into q, k and v biases (a learned k bias, as MaPeT's ViT has), and
so is MaPeT's own layout with separate `attn.q` and `attn.kv` layers.
Index buffers (`relative_position_index`, `k_bias`) are rebuilt by the model and dropped
silently; every other key that has no home (lm_head, cls_pt_layers, head, fc_norm, ...) is
reported as unused.

Only numpy is used here; torch tensors are converted with .detach().cpu().numpy().
"""

import logging
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# Buffers the JAX model derives itself.
_DERIVED_SUFFIXES = ('relative_position_index', 'k_bias')

# Per-block torch suffix -> (flax path inside the block, transform).
_BLOCK_KEYS = {
  'norm1.weight': (('norm1', 'scale'), None),
  'norm1.bias': (('norm1', 'bias'), None),
  'norm2.weight': (('norm2', 'scale'), None),
  'norm2.bias': (('norm2', 'bias'), None),
  'attn.qkv.weight': (('attn', 'qkv', 'kernel'), 'linear'),
  'attn.q_bias': (('attn', 'q_bias'), None),
  'attn.v_bias': (('attn', 'v_bias'), None),
  'attn.proj.weight': (('attn', 'proj', 'kernel'), 'linear'),
  'attn.proj.bias': (('attn', 'proj', 'bias'), None),
  'attn.relative_position_bias_table': (('rel_pos_bias', 'relative_position_bias_table'), None),
  'mlp.fc1.weight': (('mlp', 'fc1', 'kernel'), 'linear'),
  'mlp.fc1.bias': (('mlp', 'fc1', 'bias'), None),
  'mlp.fc2.weight': (('mlp', 'fc2', 'kernel'), 'linear'),
  'mlp.fc2.bias': (('mlp', 'fc2', 'bias'), None),
  'gamma_1': (('gamma_1',), None),
  'gamma_2': (('gamma_2',), None),
  'ls1.gamma': (('gamma_1',), None),
  'ls2.gamma': (('gamma_2',), None),
}

_TOP_KEYS = {
  'patch_embed.proj.weight': (('patch_embed', 'kernel'), 'conv'),
  'patch_embed.proj.bias': (('patch_embed', 'bias'), None),
  'cls_token': (('cls_token',), None),
  'mask_token': (('mask_token',), None),
  'pos_embed': (('pos_embed',), None),
  'rel_pos_bias.relative_position_bias_table': (
    ('rel_pos_bias', 'relative_position_bias_table'),
    None,
  ),
  'norm.weight': (('norm', 'scale'), None),
  'norm.bias': (('norm', 'bias'), None),
}

_BLOCK_RE = re.compile(r'^blocks\.(\d+)\.(.+)$')

# aimagelab/MaPeT:models/vision_transformer/vision_transformer.py: `attn.q` (D -> D) and
# `attn.kv` (D -> 2D, k rows first), both with biases; one qkv kernel with q/k/v biases here.
_SPLIT_QKV = ('attn.q.weight', 'attn.q.bias', 'attn.kv.weight', 'attn.kv.bias')


def _set_split_qkv(params: dict, layer: int, parts: dict, prefix: str) -> None:
  absent = [k for k in _SPLIT_QKV if k not in parts]
  if absent:
    raise ValueError(
      f'block {layer} has attn.q / attn.kv but no {prefix}blocks.{layer}.{absent[0]}'
    )
  q_w, kv_w = parts['attn.q.weight'], parts['attn.kv.weight']
  dim = q_w.shape[0]
  if q_w.shape != (dim, dim) or kv_w.shape != (2 * dim, dim):
    raise ValueError(
      f'block {layer}: attn.q {q_w.shape} / attn.kv {kv_w.shape} are not (D, D) / (2D, D)'
    )
  attn = (f'blocks_{layer}', 'attn')
  _set(params, attn + ('qkv', 'kernel'), np.ascontiguousarray(np.concatenate([q_w, kv_w]).T))
  k_b, v_b = np.split(parts['attn.kv.bias'], 2)
  for name, value in (('q_bias', parts['attn.q.bias']), ('k_bias', k_b), ('v_bias', v_b)):
    _set(params, attn + (name,), np.ascontiguousarray(value))


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def _transform(value: np.ndarray, how: str | None) -> np.ndarray:
  if how == 'linear':  # torch (out, in) -> flax (in, out)
    return value.T
  if how == 'conv':  # torch (O, I, kh, kw) -> flax (kh, kw, I, O)
    return value.transpose(2, 3, 1, 0)
  return value


def _set(tree: dict, path: tuple, value):
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  if path[-1] in tree:
    raise ValueError(f'two checkpoint keys map to the same parameter {"/".join(path)}')
  tree[path[-1]] = value


def beit_from_torch(
  state_dict: Mapping[str, Any],
  *,
  depth: int,
  scan_layers: bool = False,
  prefix: str = '',
  dtype: Any = np.float32,
  return_unused: bool = False,
):
  """Converts a timm / official BEiT(v2) state dict to VisionTransformer params.

  Args:
    state_dict: torch key -> tensor or array. A {'model': ...} or {'module': ...}
      wrapper (official checkpoints) is unwrapped.
    depth: number of blocks the Flax model has; the checkpoint must hold exactly
      blocks 0..depth-1.
    scan_layers: return the stacked layout of VisionTransformer(scan_layers=True).
    prefix: only keys starting with it are read, with it stripped (e.g.
      'encoder.' for a VQ-KD tokenizer checkpoint).
    dtype: floating values are cast to it (checkpoints are often fp16).
    return_unused: also return the sorted list of ignored keys.

  Returns:
    The 'params' collection (nested dict of numpy arrays), or (params, unused).
  """
  for wrapper in ('model', 'module'):
    if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
      state_dict = state_dict[wrapper]
  params, unused, seen_blocks, split_qkv = {}, [], set(), {}
  for key, value in state_dict.items():
    if not key.startswith(prefix):
      continue
    name = key[len(prefix) :]
    if name.endswith(_DERIVED_SUFFIXES):
      continue
    match = _BLOCK_RE.match(name)
    if match and match.group(2) in _SPLIT_QKV:  # MaPeT: separate q and kv layers
      layer = int(match.group(1))
      if layer >= depth:
        raise ValueError(f'checkpoint key {key!r} is beyond depth={depth}')
      split_qkv.setdefault(layer, {})[match.group(2)] = _to_numpy(value).astype(dtype)
      continue
    if match and match.group(2) == 'attn.qkv.bias':  # timm ViT: one (q, k, v) bias
      layer = int(match.group(1))
      if layer >= depth:
        raise ValueError(f'checkpoint key {key!r} is beyond depth={depth}')
      q, k, v = np.split(_to_numpy(value).astype(dtype), 3)
      for part, array in (('q_bias', q), ('k_bias', k), ('v_bias', v)):
        _set(params, (f'blocks_{layer}', 'attn', part), np.ascontiguousarray(array))
      continue
    if match and match.group(2) in _BLOCK_KEYS:
      layer = int(match.group(1))
      if layer >= depth:
        raise ValueError(f'checkpoint key {key!r} is beyond depth={depth}')
      seen_blocks.add(layer)
      path, how = _BLOCK_KEYS[match.group(2)]
      path = (f'blocks_{layer}',) + path
    elif name in _TOP_KEYS:
      path, how = _TOP_KEYS[name]
    else:
      unused.append(key)
      continue
    array = _transform(_to_numpy(value), how)
    if np.issubdtype(array.dtype, np.floating):
      array = array.astype(dtype)
    _set(params, path, np.ascontiguousarray(array))

  for layer, parts in sorted(split_qkv.items()):
    _set_split_qkv(params, layer, parts, prefix)
    seen_blocks.add(layer)
  missing = sorted(set(range(depth)) - seen_blocks)
  if missing:
    raise ValueError(
      f'checkpoint has no weights for blocks {missing} (depth={depth}, prefix={prefix!r})'
    )
  unused.sort()
  if unused:
    logging.info('beit_from_torch: %d unused keys: %s', len(unused), unused)
  if scan_layers:
    params = stack_layers(params)
  return (params, unused) if return_unused else params


def _stack(*leaves):
  if all(isinstance(leaf, np.ndarray) for leaf in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)


def stack_layers(params: Mapping[str, Any], prefix: str = 'blocks') -> dict:
  """{'blocks_0': t0, 'blocks_1': t1, ...} -> {'blocks': stacked} (scan layout).

  Works on an unboxed 'params' collection (use nn.meta.unbox first).
  """
  pattern = re.compile(rf'^{re.escape(prefix)}_(\d+)$')
  layer_ids = sorted(int(m.group(1)) for m in map(pattern.match, params) if m)
  if not layer_ids:
    raise ValueError(f'no {prefix}_<i> entries to stack in {sorted(params)}')
  if layer_ids != list(range(len(layer_ids))):
    raise ValueError(f'{prefix}_<i> entries are not 0..n-1: {layer_ids}')
  if prefix in params:
    raise ValueError(f'params already hold a stacked {prefix!r} entry')
  out = {k: v for k, v in params.items() if not pattern.match(k)}
  out[prefix] = jax.tree.map(_stack, *[params[f'{prefix}_{i}'] for i in layer_ids])
  return out


def unstack_layers(params: Mapping[str, Any], prefix: str = 'blocks') -> dict:
  """Inverse of stack_layers: {'blocks': stacked} -> {'blocks_0': ..., ...}."""
  if prefix not in params:
    raise ValueError(f'no stacked {prefix!r} entry in {sorted(params)}')
  stacked = params[prefix]
  depth = {leaf.shape[0] for leaf in jax.tree.leaves(stacked)}
  if len(depth) != 1:
    raise ValueError(f'stacked {prefix!r} leaves disagree on the layer axis: {depth}')
  depth = depth.pop()
  out = {k: v for k, v in params.items() if k != prefix}
  for i in range(depth):
    out[f'{prefix}_{i}'] = jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
  return out
