r"""Converting OpenAI CLIP checkpoints to the Flax towers of `mim_jax.teachers.clip`, and
the converted .npz files.

  python -m mim_jax.teachers.clip --checkpoint=ViT-B-16.pt --out=clip_vitb16.npz

`load_openai_checkpoint` takes the TorchScript archive OpenAI distributes or a plain state
dict (fp16 or fp32; torch is imported only here); `infer_openai_arch` reads the architecture
from the weights as OpenAI's `build_model` does; every key must find a home
(`conversion_plan`), so a layout surprise is an error, not a silently random weight.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from mim_jax.teachers.clip import abstract_params
from mim_jax.teachers.clip import arch_name
from mim_jax.teachers.clip import HEAD_WIDTH
from mim_jax.teachers.clip import resnet_blocks
from mim_jax.teachers.clip import validate_arch

# ----------------------------------------------------------------------------- conversion
_IGNORED_SUFFIXES = ('num_batches_tracked',)


def _visual_subdict(sd: Mapping[str, Any]) -> dict:
  """The vision tower's entries without 'visual.'; a dict without that prefix is all vision."""
  keys = list(sd)
  if keys and all(k.startswith('module.') for k in keys):  # saved from a DDP wrapper
    sd = {k[len('module.') :]: v for k, v in sd.items()}
  if any(k.startswith('visual.') for k in sd):
    # The text tower, logit_scale and the JIT extras (input_resolution, ...) are not ours.
    return {k[len('visual.') :]: v for k, v in sd.items() if k.startswith('visual.')}
  return dict(sd)


def _shape(sd: Mapping[str, Any], key: str) -> tuple:
  if key not in sd:
    raise ValueError(f"CLIP state dict: cannot infer the architecture without 'visual.{key}'")
  return tuple(sd[key].shape)


def infer_openai_arch(sd: Mapping[str, Any]) -> dict:
  """The arch dict of a state dict (with or without 'visual.'), as OpenAI's build_model.

  Only `.shape` of the values is read, so meta tensors or stubs work.
  """
  v = _visual_subdict(sd)
  if 'proj' in v:  # build_model: vit = "visual.proj" in state_dict
    width, _, _, patch = _shape(v, 'conv1.weight')
    layers = len([k for k in v if k.endswith('.attn.in_proj_weight')])
    grid = round((_shape(v, 'positional_embedding')[0] - 1) ** 0.5)
    return validate_arch(
      dict(
        kind='vit',
        image_size=patch * grid,
        patch_size=patch,
        width=width,
        layers=layers,
        heads=width // HEAD_WIDTH,
        output_dim=_shape(v, 'proj')[1],
      )
    )
  if 'attnpool.positional_embedding' in v:
    layers = tuple(
      len({k.split('.')[1] for k in v if k.startswith(f'layer{b}.')}) for b in (1, 2, 3, 4)
    )
    width = _shape(v, 'layer1.0.conv1.weight')[0]
    tokens = _shape(v, 'attnpool.positional_embedding')[0]
    side = round((tokens - 1) ** 0.5)
    if side * side + 1 != tokens:
      raise ValueError(
        f'CLIP state dict: attnpool.positional_embedding has {tokens} rows, not a square grid + 1'
      )
    return validate_arch(
      dict(
        kind='resnet',
        image_size=side * 32,
        width=width,
        layers=layers,
        heads=width * 32 // HEAD_WIDTH,
        output_dim=_shape(v, 'attnpool.c_proj.weight')[0],
      )
    )
  raise ValueError(
    "CLIP state dict: neither 'visual.proj' (ViT) nor "
    "'visual.attnpool.positional_embedding' (ModifiedResNet) is present; "
    f'first keys: {sorted(sd)[:10]}'
  )


# torch parameter name -> flax name, per layer type.
_LAYER_PARAMS = {
  'ln': (('weight', 'scale'), ('bias', 'bias')),
  'linear': (('weight', 'kernel'), ('bias', 'bias')),
  'bn': (('weight', 'scale'), ('bias', 'bias'), ('running_mean', 'mean'), ('running_var', 'var')),
}


def _layer_plan(layer: str, torch_name: str, path: tuple) -> list:
  return [
    (f'{torch_name}.{t}', path + (f,), 'linear' if f == 'kernel' else None)
    for t, f in _LAYER_PARAMS[layer]
  ]


def conversion_plan(arch: Mapping[str, Any]) -> list[tuple[str, tuple, str | None]]:
  """(torch key without 'visual.', flax param path, transform) for every expected key."""
  arch = validate_arch(arch)
  if arch['kind'] == 'vit':
    plan = [
      ('conv1.weight', ('conv1', 'kernel'), 'conv'),
      ('class_embedding', ('class_embedding',), None),
      ('positional_embedding', ('positional_embedding',), None),
      ('proj', ('proj',), None),
    ]
    plan += _layer_plan('ln', 'ln_pre', ('ln_pre',)) + _layer_plan('ln', 'ln_post', ('ln_post',))
    for i in range(arch['layers']):
      t, f = f'transformer.resblocks.{i}.', (f'resblocks_{i}',)
      plan += [
        (t + 'attn.in_proj_weight', f + ('attn',), 'in_proj_weight'),
        (t + 'attn.in_proj_bias', f + ('attn',), 'in_proj_bias'),
      ]
      for layer, torch_name, flax_path in (
        ('linear', 'attn.out_proj', ('attn', 'out_proj')),
        ('ln', 'ln_1', ('ln_1',)),
        ('ln', 'ln_2', ('ln_2',)),
        ('linear', 'mlp.c_fc', ('c_fc',)),
        ('linear', 'mlp.c_proj', ('c_proj',)),
      ):
        plan += _layer_plan(layer, t + torch_name, f + flax_path)
    return plan

  def conv_bn(torch_conv, torch_bn, path, conv, bn):
    return [(f'{torch_conv}.weight', path + (conv, 'kernel'), 'conv')] + _layer_plan(
      'bn', torch_bn, path + (bn,)
    )

  plan = []
  for i in (1, 2, 3):
    plan += conv_bn(f'conv{i}', f'bn{i}', (), f'conv{i}', f'bn{i}')
  for stage, j, _, _, downsample in resnet_blocks(arch):
    t, f = f'layer{stage}.{j}.', (f'layer{stage}_{j}',)
    for i in (1, 2, 3):
      plan += conv_bn(f'{t}conv{i}', f'{t}bn{i}', f, f'conv{i}', f'bn{i}')
    if downsample:
      plan += conv_bn(f'{t}downsample.0', f'{t}downsample.1', f, 'downsample_0', 'downsample_1')
  plan += [('attnpool.positional_embedding', ('attnpool', 'positional_embedding'), None)]
  for name in ('q_proj', 'k_proj', 'v_proj', 'c_proj'):
    plan += _layer_plan('linear', f'attnpool.{name}', ('attnpool', name))
  return plan


def _to_numpy(value: Any) -> np.ndarray:
  """float32 numpy (fp16/bf16 -> fp32); no copy when already float32 numpy."""
  if hasattr(value, 'detach'):  # a torch tensor
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    value = value.numpy()
  value = np.asarray(value)
  return value.astype(np.float32, copy=False) if value.dtype.kind == 'f' else value


def _set(tree: dict, path: tuple, value) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def _store(params: dict, key: str, path: tuple, how: str | None, value: np.ndarray) -> None:
  if how == 'linear':  # torch (out, in) -> flax (in, out)
    _set(params, path, value.T)
  elif how == 'conv':  # torch (O, I, kh, kw) -> flax (kh, kw, I, O)
    _set(params, path, value.transpose(2, 3, 1, 0))
  elif how in ('in_proj_weight', 'in_proj_bias'):  # rows are [q; k; v]
    if value.shape[0] % 3:
      raise ValueError(f'CLIP state dict: {key} has {value.shape[0]} rows, not 3 x width')
    for name, part in zip('qkv', np.split(value, 3, axis=0)):
      _set(
        params,
        path + (name, 'kernel' if how == 'in_proj_weight' else 'bias'),
        part.T if how == 'in_proj_weight' else part,
      )
  else:
    _set(params, path, value)


def check_params(params: Mapping[str, Any], arch: Mapping[str, Any], source: str) -> None:
  """Raises ValueError listing every param whose presence or shape differs from the model."""
  want = {
    jax.tree_util.keystr(p, simple=True, separator='/'): tuple(v.shape)
    for p, v in jax.tree_util.tree_flatten_with_path(abstract_params(arch))[0]
  }
  have = {
    jax.tree_util.keystr(p, simple=True, separator='/'): tuple(np.shape(v))
    for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  problems = [f'missing {k}' for k in sorted(set(want) - set(have))]
  problems += [f'unexpected {k}' for k in sorted(set(have) - set(want))]
  problems += [
    f'{k}: shape {have[k]}, the model needs {want[k]}'
    for k in sorted(set(want) & set(have))
    if want[k] != have[k]
  ]
  if problems:
    raise ValueError(
      f'{source}: params do not fit CLIP {arch_name(arch)}: '
      + '; '.join(problems[:20])
      + (' ...' if len(problems) > 20 else '')
    )


def convert_openai_state_dict(
  sd: Mapping[str, Any], *, source: str = 'CLIP state dict'
) -> tuple[dict, dict]:
  """OpenAI (or open_clip, same names) state dict -> (arch, Flax params of the vision tower).

  Keys may carry 'visual.' (then everything else, the text tower included, is ignored) or not
  (then every key must belong to the vision tower). Values: torch tensors or arrays, any float
  dtype (converted to float32). Unknown or missing keys raise ValueError listing them.
  """
  visual = _visual_subdict(sd)
  arch = infer_openai_arch(visual)
  plan = conversion_plan(arch)
  expected = {key for key, _, _ in plan}
  present = {k for k in visual if not k.endswith(_IGNORED_SUFFIXES)}
  missing, unexpected = sorted(expected - present), sorted(present - expected)
  if missing or unexpected:

    def show(keys):
      return str(keys[:20]) + (f' (+{len(keys) - 20} more)' if len(keys) > 20 else '')

    raise ValueError(
      f'{source}: keys do not match CLIP {arch_name(arch)} (names without '
      f"'visual.'): missing {show(missing)}, unexpected {show(unexpected)}"
    )
  params: dict = {}
  for key, path, how in plan:
    _store(params, key, path, how, _to_numpy(visual[key]))
  check_params(params, arch, source)
  return arch, params


def load_openai_checkpoint(path: str) -> tuple[dict, dict]:
  """An OpenAI .pt (TorchScript archive) or a torch.save'd (state) dict -> (arch, params)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'CLIP checkpoint not found: {path}')
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      f'Reading the CLIP checkpoint {path} needs PyTorch (pip install torch); '
      'or convert it once where torch is installed (python -m '
      'mim_jax.teachers.clip --checkpoint=X.pt --out=X.npz) and load the .npz'
    ) from e
  try:
    sd = torch.jit.load(path, map_location='cpu').state_dict()
  except RuntimeError:
    # Not TorchScript: a state dict, the fallback of clip.load (clip.py:138-139).
    try:
      sd = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
        f'{path}: neither a TorchScript archive nor a torch.save state dict '
        f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})'
      ) from e
  if isinstance(sd, Mapping) and isinstance(sd.get('state_dict'), Mapping):
    sd = sd['state_dict']
  if not isinstance(sd, Mapping):
    raise ValueError(f'{path}: expected a state dict, got {type(sd).__name__}')
  return convert_openai_state_dict(sd, source=path)


# ----------------------------------------------------------------------------- npz files
_ARCH_KEY = '__clip_arch__'


def save_params(path: str, arch: Mapping[str, Any], params: Mapping[str, Any]) -> None:
  """One .npz: the arch as JSON plus every param under its '/'-joined path (atomic write)."""
  arch = validate_arch(arch)
  flat = {
    jax.tree_util.keystr(p, simple=True, separator='/'): np.asarray(v, np.float32)
    for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:  # a file object: np.savez would append '.npz' to a name
    np.savez(f, **{_ARCH_KEY: np.asarray(json.dumps(arch))}, **flat)
  os.replace(tmp, path)


def load_params(path: str) -> tuple[dict, dict]:
  """(arch, params) from a `save_params` file; no torch needed."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'converted CLIP file not found: {path}')
  with np.load(path, allow_pickle=False) as z:
    if _ARCH_KEY not in z.files:
      raise ValueError(
        f'{path}: not a converted CLIP file (no {_ARCH_KEY}); make one with '
        'python -m mim_jax.teachers.clip --checkpoint=X.pt --out=X.npz'
      )
    arch = validate_arch(json.loads(str(z[_ARCH_KEY])))
    params: dict = {}
    for key in z.files:
      if key != _ARCH_KEY:
        _set(params, tuple(key.split('/')), z[key])
  check_params(params, arch, path)
  return arch, params


# ----------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
  """python -m mim_jax.teachers.clip --checkpoint=ViT-B-16.pt --out=clip_vitb16.npz"""
  parser = argparse.ArgumentParser(
    prog='python -m mim_jax.teachers.clip',
    description='Convert an OpenAI CLIP checkpoint (vision tower) to a Flax .npz once.',
    epilog='example: python -m mim_jax.teachers.clip --checkpoint=ViT-B-16.pt --out=clip.npz',
  )
  parser.add_argument('--checkpoint', required=True, help='OpenAI .pt or a torch.save state dict')
  parser.add_argument('--out', required=True, help='output .npz')
  args = parser.parse_args(argv)
  try:
    arch, params = load_openai_checkpoint(args.checkpoint)
    save_params(args.out, arch, params)
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  count = sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(params))
  print(
    f'{args.checkpoint}: CLIP {arch_name(arch)} vision tower, {count / 1e6:.1f}M params '
    f'-> {args.out}'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
