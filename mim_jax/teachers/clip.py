r"""OpenAI CLIP vision towers in Flax, with a converter from the official PyTorch weights.

Official code: `openai/CLIP:clip/model.py` (docs/reference_details.md#clip-towers); open_clip's
`model.py`, `transformer.py` and `modified_resnet.py` build the same architectures and are what
the tests compare against (random weights: nothing is downloaded).

* `VisionTransformer` (ViT-B/16, ViT-L/14): conv1 patch embedding without bias, class and
  positional embeddings, ln_pre, pre-norm residual blocks (nn.MultiheadAttention semantics:
  q/k/v projections with full biases, out_proj; MLP c_fc -> QuickGELU -> c_proj), ln_post and
  a bias-free proj. OpenAI applies ln_post + proj to the cls token only; we apply them to every
  token, which is what BEiT v2's VQ-KD (patches) and CAE v2 (cls + patches) regress
  (docs/reference_details.md#which-clip-features-each-method-uses);
  token 0 of that is exactly CLIP's image embedding ('pooled').
* `ModifiedResNet` (RN50 ... RN50x64): 3-conv stem, anti-aliased Bottlenecks (avgpool(stride)
  before the expanding 1x1 conv and in the downsample path), BatchNorm with running statistics,
  AttentionPool2d. 'layer4' is the post-ReLU layer-4 grid before attention pooling, MaPeT's
  k-CLIP features (`aimagelab/MaPeT:data/kmeans/clip.py`); NHWC, so reshape(B, h*w, C) is
  torch's flatten(2).transpose(1, 2).
* Numerics: LayerNorm eps 1e-5 in fp32 (OpenAI's LayerNorm subclass), softmax and BatchNorm in
  fp32, matmuls/convs in `dtype` (bf16 on accelerators); ViT residual stream kept in fp32.
* The teacher is frozen, so BatchNorm running statistics live in 'params' next to the weights:
  one pytree is all a jitted function needs.

Converting the official checkpoint once (torch needed only for this step; the code is in
`clip_convert`):
  python -m mim_jax.teachers.clip --checkpoint=ViT-B-16.pt --out=clip_vitb16.npz
then `CLIPTeacher('clip_vitb16.npz')`. `CLIPTeacher('ViT-B-16.pt')` also works (needs torch),
and `CLIPTeacher('random:ViT-B/16,width=64,layers=2')` is a random-weight stand-in for smoke runs.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.data.transforms import CLIP_MEAN  # noqa: F401  (re-exported)
from mim_jax.data.transforms import CLIP_STD  # noqa: F401  (re-exported)

LN_EPS = 1e-5  # torch default; OpenAI computes LN in fp32 (clip/model.py:157-163)
BN_EPS = 1e-5
QUICK_GELU_ALPHA = 1.702
HEAD_WIDTH = 64  # OpenAI build_model: ViT heads = width // 64, ResNet heads = width * 32 // 64

# As OpenAI's checkpoints (build_model's inference) and open_clip's model_configs/*.json.
CLIP_VISION_CONFIGS = {
  'ViT-B/16': dict(
    kind='vit', image_size=224, patch_size=16, width=768, layers=12, heads=12, output_dim=512
  ),
  'ViT-L/14': dict(
    kind='vit', image_size=224, patch_size=14, width=1024, layers=24, heads=16, output_dim=768
  ),
  'RN50': dict(
    kind='resnet', image_size=224, width=64, layers=(3, 4, 6, 3), heads=32, output_dim=1024
  ),
  'RN101': dict(
    kind='resnet', image_size=224, width=64, layers=(3, 4, 23, 3), heads=32, output_dim=512
  ),
  'RN50x4': dict(
    kind='resnet', image_size=288, width=80, layers=(4, 6, 10, 6), heads=40, output_dim=640
  ),
  'RN50x16': dict(
    kind='resnet', image_size=384, width=96, layers=(6, 8, 18, 8), heads=48, output_dim=768
  ),
  'RN50x64': dict(
    kind='resnet', image_size=448, width=128, layers=(3, 15, 36, 10), heads=64, output_dim=1024
  ),
}
_FIELDS = {
  'vit': ('image_size', 'patch_size', 'width', 'layers', 'heads', 'output_dim'),
  'resnet': ('image_size', 'width', 'layers', 'heads', 'output_dim'),
}


def canonical_name(name: str) -> str:
  """'ViT-B/16' or open_clip's 'ViT-B-16' -> the CLIP_VISION_CONFIGS key."""
  for key in CLIP_VISION_CONFIGS:
    if name in (key, key.replace('/', '-')):
      return key
  raise ValueError(
    f'Unknown CLIP vision model {name!r}: expected one of {sorted(CLIP_VISION_CONFIGS)}'
  )


def arch_name(arch: Mapping[str, Any]) -> str:
  """The config name `arch` equals, else a short description."""
  arch = validate_arch(arch)
  for name, cfg in CLIP_VISION_CONFIGS.items():
    if validate_arch(cfg) == arch:
      return name
  return f"custom {arch['kind']} " + ','.join(f'{k}={arch[k]}' for k in _FIELDS[arch['kind']])


def validate_arch(arch: Mapping[str, Any]) -> dict:
  """Checks an arch dict (e.g. read back from JSON) and returns a normalised copy."""
  kind = arch.get('kind')
  if kind not in _FIELDS:
    raise ValueError(f"CLIP arch: 'kind' must be 'vit' or 'resnet', got {kind!r} in {arch}")
  missing = [f for f in _FIELDS[kind] if f not in arch]
  extra = sorted(set(arch) - set(_FIELDS[kind]) - {'kind'})
  if missing or extra:
    raise ValueError(f'CLIP {kind} arch: missing fields {missing}, unknown fields {extra}')
  out = {'kind': kind}
  for f in _FIELDS[kind]:
    v = arch[f]
    out[f] = tuple(int(x) for x in v) if f == 'layers' and kind == 'resnet' else int(v)
  if kind == 'vit':
    if out['image_size'] % out['patch_size'] or out['width'] % out['heads']:
      raise ValueError(
        f'CLIP ViT arch: image_size must be a multiple of patch_size and width of heads, got {out}'
      )
  else:
    if len(out['layers']) != 4 or out['image_size'] % 32 or (out['width'] * 32) % out['heads']:
      raise ValueError(
        f'CLIP ResNet arch: 4 stage depths, image_size a multiple of 32 and '
        f'width*32 a multiple of heads needed, got {out}'
      )
  return out


# ----------------------------------------------------------------------------- modules
def _layer_norm(name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
    epsilon=LN_EPS, dtype=jnp.float32, param_dtype=jnp.float32, use_fast_variance=False, name=name
  )


def _dense(features: int, dtype, name: str):
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


def _attention(q, k, v, heads: int, dtype):
  """Scaled dot-product attention as torch's multi_head_attention_forward; fp32 softmax."""
  b, lq, d = q.shape
  hd = d // heads
  q = q.reshape(b, lq, heads, hd).astype(dtype)
  k = k.reshape(b, k.shape[1], heads, hd).astype(dtype)
  v = v.reshape(b, v.shape[1], heads, hd).astype(dtype)
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(logits * (hd**-0.5), axis=-1)
  out = jnp.einsum('bhqk,bkhd->bqhd', weights.astype(dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, lq, d)


class MultiheadAttention(nn.Module):
  """nn.MultiheadAttention self-attention; in_proj split into q, k, v (each with a bias)."""

  width: int
  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    q = _dense(self.width, self.dtype, 'q')(x)
    k = _dense(self.width, self.dtype, 'k')(x)
    v = _dense(self.width, self.dtype, 'v')(x)
    out = _attention(q, k, v, self.heads, self.dtype)
    return _dense(self.width, self.dtype, 'out_proj')(out)


class ResidualAttentionBlock(nn.Module):
  """Pre-norm block: x + attn(ln_1(x)); x + c_proj(QuickGELU(c_fc(ln_2(x))))."""

  width: int
  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = x + MultiheadAttention(self.width, self.heads, self.dtype, name='attn')(
      _layer_norm('ln_1')(x)
    ).astype(jnp.float32)
    h = _dense(4 * self.width, self.dtype, 'c_fc')(_layer_norm('ln_2')(x)).astype(jnp.float32)
    h = h * jax.nn.sigmoid(QUICK_GELU_ALPHA * h)  # QuickGELU (openai/CLIP:clip/model.py)
    return x + _dense(self.width, self.dtype, 'c_proj')(h).astype(jnp.float32)


class VisionTransformer(nn.Module):
  """OpenAI CLIP ViT. Input: normalised NHWC images of exactly image_size x image_size.

  Returns {'tokens': (B, 1+N, output_dim) ln_post + proj of every token, 'pooled': token 0
  (CLIP's image embedding), and with return_intermediates 'layers': each block's output
  (B, 1+N, width)}, all float32.
  """

  image_size: int
  patch_size: int
  width: int
  layers: int
  heads: int
  output_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, return_intermediates: bool = False):
    if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(
        f'CLIP ViT expects (B, {self.image_size}, {self.image_size}, 3) images '
        f'(its positional_embedding is fixed), got {images.shape}'
      )
    p, w = self.patch_size, self.width
    grid = self.image_size // p
    scale = w**-0.5
    x = nn.Conv(
      w,
      (p, p),
      strides=(p, p),
      padding='VALID',
      use_bias=False,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name='conv1',
    )(images)
    b = x.shape[0]
    x = x.reshape(b, grid * grid, w).astype(jnp.float32)  # row-major patches, as torch
    cls = self.param('class_embedding', nn.initializers.normal(scale), (w,))
    pos = self.param('positional_embedding', nn.initializers.normal(scale), (grid * grid + 1, w))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, w)), x], axis=1) + pos
    x = _layer_norm('ln_pre')(x)
    layers = []
    for i in range(self.layers):
      x = ResidualAttentionBlock(w, self.heads, self.dtype, name=f'resblocks_{i}')(x)
      if return_intermediates:
        layers.append(x)
    x = _layer_norm('ln_post')(x)
    proj = self.param('proj', nn.initializers.normal(scale), (w, self.output_dim))
    tokens = jnp.einsum(
      'bnd,de->bne',
      x.astype(self.dtype),
      proj.astype(self.dtype),
      preferred_element_type=jnp.float32,
    )
    out = {'tokens': tokens, 'pooled': tokens[:, 0]}
    if return_intermediates:
      out['layers'] = layers
    return out


class FrozenBatchNorm(nn.Module):
  """Inference-mode BatchNorm2d; running statistics are (frozen) params 'mean' and 'var'."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    ones, zeros, c = nn.initializers.ones_init(), nn.initializers.zeros_init(), (self.features,)
    scale, bias, mean, var = (
      self.param(n, init, c)
      for n, init in (('scale', ones), ('bias', zeros), ('mean', zeros), ('var', ones))
    )
    y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + BN_EPS) * scale + bias
    return y.astype(self.dtype)


def _conv(features: int, kernel: int, dtype, name: str, stride: int = 1):
  pad = kernel // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )


def _avg_pool(x, size: int):
  """nn.AvgPool2d(size): kernel = stride = size, no padding, floor."""
  return nn.avg_pool(x, (size, size), strides=(size, size), padding='VALID')


def resnet_blocks(arch: Mapping[str, Any]) -> Iterator[tuple[int, int, int, int, bool]]:
  """(stage 1-4, index, planes, stride, has_downsample) of every Bottleneck, in order."""
  inplanes, width = arch['width'], arch['width']
  for stage, depth in enumerate(arch['layers'], 1):
    planes = width * 2 ** (stage - 1)
    for j in range(depth):
      stride = 2 if stage > 1 and j == 0 else 1
      yield stage, j, planes, stride, stride > 1 or inplanes != planes * 4
      inplanes = planes * 4


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> avgpool(stride) -> 1x1 (x4); downsample = avgpool -> 1x1 -> BN."""

  planes: int
  stride: int
  downsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = self.dtype
    out = nn.relu(
      FrozenBatchNorm(self.planes, dtype=d, name='bn1')(_conv(self.planes, 1, d, 'conv1')(x))
    )
    out = nn.relu(
      FrozenBatchNorm(self.planes, dtype=d, name='bn2')(_conv(self.planes, 3, d, 'conv2')(out))
    )
    if self.stride > 1:
      out = _avg_pool(out, self.stride)
    out = FrozenBatchNorm(self.planes * 4, dtype=d, name='bn3')(
      _conv(self.planes * 4, 1, d, 'conv3')(out)
    )
    identity = x
    if self.downsample:
      if self.stride > 1:
        identity = _avg_pool(identity, self.stride)
      identity = FrozenBatchNorm(self.planes * 4, dtype=d, name='downsample_1')(
        _conv(self.planes * 4, 1, d, 'downsample_0')(identity)
      )
    return nn.relu(out + identity)


class AttentionPool2d(nn.Module):
  """Mean token prepended, positional embedding, one-query multi-head attention, c_proj."""

  spacial_dim: int
  embed_dim: int
  heads: int
  output_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    pos = self.param(
      'positional_embedding', nn.initializers.normal(c**-0.5), (self.spacial_dim**2 + 1, c)
    )
    if h * w + 1 != pos.shape[0]:
      raise ValueError(
        f'CLIP attnpool: a {h}x{w} layer-4 grid does not match its '
        f'{self.spacial_dim}x{self.spacial_dim} positional_embedding (feed '
        f'{self.spacial_dim * 32}px images, or use layer4 only)'
      )
    x = x.reshape(b, h * w, c).astype(jnp.float32)  # = torch flatten(2) of NCHW
    x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1) + pos
    # Only the mean token's output is kept (x[0] in torch), so only its query is computed.
    q = _dense(c, self.dtype, 'q_proj')(x[:, :1])
    k = _dense(c, self.dtype, 'k_proj')(x)
    v = _dense(c, self.dtype, 'v_proj')(x)
    out = _attention(q, k, v, self.heads, self.dtype)
    return _dense(self.output_dim, self.dtype, 'c_proj')(out)[:, 0].astype(jnp.float32)


class ModifiedResNet(nn.Module):
  """OpenAI CLIP ResNet. Input: normalised NHWC images (any size for layer4 only).

  Returns {'layer4': (B, h, w, 32*width) float32 post-ReLU grid before attention pooling} and,
  with attnpool=True (needs image_size inputs), 'pooled': (B, output_dim) float32.
  """

  image_size: int
  width: int
  layers: tuple
  heads: int
  output_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, attnpool: bool = True):
    d, w = self.dtype, self.width
    x = images
    for i, (features, stride) in enumerate(((w // 2, 2), (w // 2, 1), (w, 1)), 1):
      x = nn.relu(
        FrozenBatchNorm(features, dtype=d, name=f'bn{i}')(
          _conv(features, 3, d, f'conv{i}', stride)(x)
        )
      )
    x = _avg_pool(x, 2)
    for stage, j, planes, stride, downsample in resnet_blocks(dict(width=w, layers=self.layers)):
      x = Bottleneck(planes, stride, downsample, d, name=f'layer{stage}_{j}')(x)
    out = {'layer4': x.astype(jnp.float32)}
    if attnpool:
      out['pooled'] = AttentionPool2d(
        self.image_size // 32, w * 32, self.heads, self.output_dim, d, name='attnpool'
      )(x)
    return out


def build_vision_model(arch: Mapping[str, Any], dtype: Any = jnp.float32) -> nn.Module:
  arch = validate_arch(arch)
  cls = VisionTransformer if arch['kind'] == 'vit' else ModifiedResNet
  return cls(**{f: arch[f] for f in _FIELDS[arch['kind']]}, dtype=dtype)


def abstract_params(arch: Mapping[str, Any]) -> dict:
  """ShapeDtypeStructs of the params of `arch` (nothing allocated)."""
  model, size = build_vision_model(arch), arch['image_size']
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)['params']


def init_params(arch: Mapping[str, Any], seed: int = 0) -> dict:
  """Random float32 numpy params: a stand-in teacher for smoke runs and tests.

  Drawn with NumPy from the model's shapes (compiling jax.random for every leaf takes tens of
  seconds on CPU): kernels N(0, gain / fan_in) (gain 2 for the ReLU convs, 1 for Dense),
  embeddings and proj N(0, 1 / width) like OpenAI's, norm scales 1 and biases 0, BN statistics
  mean 0 / var 1. ResNet bn3 scales are 1/sqrt(#blocks) so the residual sum of a deep random
  net stays bounded.
  """
  arch = validate_arch(arch)
  rng = np.random.default_rng(seed)
  bn3_scale = 1.0 / math.sqrt(sum(arch['layers'])) if arch['kind'] == 'resnet' else 1.0

  def draw(path, leaf):
    names = [getattr(k, 'key', str(k)) for k in path]
    shape, name = leaf.shape, names[-1]
    if name == 'kernel':
      gain = 2.0 if len(shape) == 4 else 1.0
      std = math.sqrt(gain / math.prod(shape[:-1]))
    elif name in ('class_embedding', 'positional_embedding', 'proj'):
      std = (shape[0] if name == 'proj' else shape[-1]) ** -0.5
    elif name in ('scale', 'var'):
      return np.full(
        shape, bn3_scale if names[-2] == 'bn3' and len(names) == 3 else 1.0, np.float32
      )
    else:  # bias, mean
      return np.zeros(shape, np.float32)
    return rng.standard_normal(shape, np.float32) * np.float32(std)

  return jax.tree_util.tree_map_with_path(draw, abstract_params(arch))


def vit_tokens(model: VisionTransformer, params, images) -> jax.Array:
  """(B, 1+N, output_dim): ln_post + proj of every token; images already CLIP-normalised."""
  return model.apply({'params': params}, images)['tokens']


def resnet_layer4(model: ModifiedResNet, params, images) -> jax.Array:
  """(B, h, w, C) layer-4 grid before attention pooling; images already CLIP-normalised."""
  return model.apply({'params': params}, images, attnpool=False)['layer4']


# ----------------------------------------------------------------------------- conversion
# The checkpoint conversion and .npz files live in clip_convert (torch-facing code);
# these names stay reachable from here for callers of the one-module API.
_CONVERT_NAMES = (
  'infer_openai_arch',
  'conversion_plan',
  'check_params',
  'convert_openai_state_dict',
  'load_openai_checkpoint',
  'save_params',
  'load_params',
)


def __getattr__(name: str):
  if name in _CONVERT_NAMES or name == 'main':
    from mim_jax.teachers import clip_convert  # pylint: disable=g-import-not-at-top

    return getattr(clip_convert, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


# ----------------------------------------------------------------------------- teacher
_OVERRIDES = ('width', 'layers', 'heads', 'image_size', 'patch_size', 'output_dim', 'seed')


def parse_random_spec(spec: str) -> tuple[dict, int]:
  """'random:RN50' / 'random:RN50,width=8,layers=1-1-1-1' / 'random:ViT-B/16,width=64,layers=2'.

  Overrides: width, layers (ResNet: four '-'-separated depths), heads (default: OpenAI's rule
  from the width), image_size, patch_size (ViT), output_dim, seed. -> (arch, seed).
  """
  name, *items = spec[len('random:') :].split(',')
  arch = dict(CLIP_VISION_CONFIGS[canonical_name(name)])
  overrides = {}
  for item in items:
    key, eq, value = item.partition('=')
    if not eq or key not in _OVERRIDES:
      raise ValueError(
        f'{spec!r}: bad override {item!r}; expected key=value with key in {_OVERRIDES}'
      )
    try:
      if key == 'layers' and arch['kind'] == 'resnet':
        overrides[key] = tuple(int(x) for x in value.split('-'))
      else:
        overrides[key] = int(value)
    except ValueError as e:
      raise ValueError(
        f'{spec!r}: {key}={value!r} must be an integer (ResNet layers: four, e.g. 1-1-1-1)'
      ) from e
  seed = overrides.pop('seed', 0)
  if 'width' in overrides and 'heads' not in overrides:
    scale = 1 if arch['kind'] == 'vit' else 32
    overrides['heads'] = max(1, overrides['width'] * scale // HEAD_WIDTH)
  arch.update(overrides)
  return validate_arch(arch), seed


class CLIPTeacher:
  """A frozen CLIP vision tower fed with [0, 1] NHWC images (CLIP mean/std applied inside).

  spec: a converted .npz (`clip_convert.save_params`), an OpenAI checkpoint (.pt; needs torch), or
  'random:<name>[,overrides]' (see `parse_random_spec`). Outputs are wrapped in stop_gradient.
  `apply_*` are pure functions of (params, images01) for use inside jit; `tokens`,
  `layer4`, `pooled` use `self.params`.
  """

  def __init__(self, spec: str, *, dtype: Any = jnp.float32):
    from mim_jax.teachers import clip_convert  # pylint: disable=g-import-not-at-top

    self.spec = spec
    if spec.startswith('random:'):
      self.arch, seed = parse_random_spec(spec)
      params = init_params(self.arch, seed)
    elif spec.endswith('.npz'):
      self.arch, params = clip_convert.load_params(spec)
    elif os.path.isfile(spec):
      self.arch, params = clip_convert.load_openai_checkpoint(spec)
    else:
      raise FileNotFoundError(
        f'CLIP teacher {spec!r}: no such file (give a converted .npz, an '
        "OpenAI .pt checkpoint, or 'random:<name>' with a name in "
        f'{sorted(CLIP_VISION_CONFIGS)})'
      )
    self.dtype = jnp.dtype(dtype)
    self.model = build_vision_model(self.arch, self.dtype)
    self.params = jax.tree.map(jnp.asarray, params)
    self._jitted = {}

  kind = property(lambda self: self.arch['kind'])
  image_size = property(lambda self: self.arch['image_size'])
  output_dim = property(lambda self: self.arch['output_dim'])

  @property
  def layer4_channels(self) -> int:
    self._require('resnet', 'layer4_channels')
    return self.arch['width'] * 32

  def _require(self, kind: str, what: str) -> None:
    if self.kind != kind:
      raise ValueError(f'CLIP teacher {self.spec!r} is a {self.kind}; {what} needs a {kind}')

  @staticmethod
  def normalize(images01):
    x = jnp.asarray(images01, jnp.float32)
    return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)

  def apply_tokens(self, params, images01) -> jax.Array:
    """ViT: (B, 1+N, output_dim) float32, ln_post + proj of every token (cls first)."""
    self._require('vit', 'tokens')
    return jax.lax.stop_gradient(vit_tokens(self.model, params, self.normalize(images01)))

  def apply_layer4(self, params, images01) -> jax.Array:
    """ResNet: (B, h, w, 32*width) float32 layer-4 grid before attention pooling."""
    self._require('resnet', 'layer4')
    return jax.lax.stop_gradient(resnet_layer4(self.model, params, self.normalize(images01)))

  def apply_pooled(self, params, images01) -> jax.Array:
    """(B, output_dim) CLIP image embedding (ViT: cls token; ResNet: attention pooling)."""
    out = self.model.apply({'params': params}, self.normalize(images01))
    return jax.lax.stop_gradient(out['pooled'])

  def _run(self, name: str, images01):
    if name not in self._jitted:
      self._jitted[name] = jax.jit(getattr(self, 'apply_' + name))
    return self._jitted[name](self.params, images01)

  def tokens(self, images01) -> jax.Array:
    return self._run('tokens', images01)

  def layer4(self, images01) -> jax.Array:
    return self._run('layer4', images01)

  def pooled(self, images01) -> jax.Array:
    return self._run('pooled', images01)

  def __repr__(self) -> str:
    return f'CLIPTeacher({self.spec!r}: {arch_name(self.arch)}, {self.dtype.name})'


if __name__ == '__main__':
  from mim_jax.teachers import clip_convert  # pylint: disable=g-import-not-at-top

  sys.exit(clip_convert.main())
