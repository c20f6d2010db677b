"""Tests of the ViT backbone (mim_jax/models/vit.py) and its torch converter."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax.models import convert
from mim_jax.models import vit

# Tiny model used throughout: 32x32 images, patch 4 -> 8x8 grid, 65 tokens.
TINY = dict(patch_size=4, embed_dim=64, depth=3, num_heads=4)
IMG = 32


def _images(batch=2, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(batch, IMG, IMG, 3).astype(np.float32))


def _key(seed):
  # The 'rbg' generator compiles several times faster than threefry on CPU,
  # which dominates init time for these tiny models.
  return jax.random.key(seed, impl='rbg')


# Compiling dominates this file's run time on 2 cores, so jitted functions are
# memoised by model config + static arguments, and tests that only need some
# parameter values draw them with numpy on the eval_shape'd tree.
_JITTED = {}


def _jitted(kind, model, static):
  key = (kind, repr(model), repr(sorted(static.items())))
  if key not in _JITTED:
    if kind == 'init':
      fn = lambda rng, *a, **dyn: model.init(rng, *a, **dyn, **static)
    else:
      fn = lambda v, rngs, *a, **dyn: model.apply(v, *a, rngs=rngs, **dyn, **static)
    _JITTED[key] = jax.jit(fn)
  return _JITTED[key]


def _split_kwargs(kwargs):
  dynamic = {k: v for k, v in kwargs.items() if isinstance(v, (jax.Array, np.ndarray))}
  static = {k: v for k, v in kwargs.items() if k not in dynamic}
  return dynamic, static


def _init(model, *args, seed=0, **kwargs):
  """Jitted model.init (boxed variables)."""
  dynamic, static = _split_kwargs(kwargs)
  return _jitted('init', model, static)(_key(seed), *args, **dynamic)


def _params(model, *args, seed=0, **kwargs):
  return nn.meta.unbox(_init(model, *args, seed=seed, **kwargs))['params']


def _apply(model, params, *args, rngs=None, **kwargs):
  """Jitted model.apply on a 'params' collection."""
  dynamic, static = _split_kwargs(kwargs)
  return _jitted('apply', model, static)({'params': params}, rngs, *args, **dynamic)


def _param_shapes(model, *args):
  shapes = jax.eval_shape(lambda: model.init(_key(0), *args))
  return nn.meta.unbox(shapes)['params']


def _random_params(model, *args, seed=0):
  """Parameters near a trained model's: LN scales ~1, gammas ~0.1, the rest small."""
  rs = np.random.RandomState(seed)

  def draw(path, shape):
    name = path[-1].key
    noise = rs.randn(*shape.shape).astype(np.float32)
    if name == 'scale':
      return 1 + 0.1 * noise
    if name.startswith('gamma'):
      return 0.1 + 0.02 * noise
    return (0.5 if name == 'relative_position_bias_table' else 0.05) * noise

  return jax.tree_util.tree_map_with_path(draw, _param_shapes(model, *args))


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


# ----------------------------------------------------------------------------
# 1. Relative position index and variant parsing.
# ----------------------------------------------------------------------------


def _loop_relative_position_index(h, w):
  """Independent re-derivation of BEiT's `RelativePositionBias` index, as explicit loops.

  `microsoft/unilm:beit2/modeling_finetune.py`; docs/reference_details.md#beit-v2-backbone.
  """
  num_rel = (2 * h - 1) * (2 * w - 1) + 3
  n = h * w
  index = np.empty((n + 1, n + 1), np.int64)
  for i in range(n + 1):
    for j in range(n + 1):
      if i == 0 and j == 0:
        index[i, j] = num_rel - 1
      elif j == 0:
        index[i, j] = num_rel - 2
      elif i == 0:
        index[i, j] = num_rel - 3
      else:
        hi, wi = divmod(i - 1, w)
        hj, wj = divmod(j - 1, w)
        index[i, j] = (hi - hj + h - 1) * (2 * w - 1) + (wi - wj + w - 1)
  return index


def test_relative_position_index_matches_loop_derivation():
  index = vit.relative_position_index((14, 14))
  assert index.shape == (197, 197) and index.dtype == np.int32
  np.testing.assert_array_equal(index, _loop_relative_position_index(14, 14))
  assert index.max() == 731 and len(np.unique(index)) == 732
  assert index[0, 0] == 731 and index[0, 5] == 729 and index[5, 0] == 730
  # Patch (0,0) -> (13,13): offset (-13, -13) -> row 0 of the patch part.
  assert index[1, 196] == 0
  assert index[196, 1] == 26 * 27 + 26
  assert index[1, 1] == 13 * 27 + 13
  # Non-square grid: row offsets are multiplied by 2W-1.
  np.testing.assert_array_equal(
    vit.relative_position_index((3, 5)), _loop_relative_position_index(3, 5)
  )


def test_vit_kwargs():
  assert vit.vit_kwargs('B/16') == dict(embed_dim=768, depth=12, num_heads=12, patch_size=16)
  assert vit.vit_kwargs('L/14')['patch_size'] == 14 and vit.vit_kwargs('L/14')['depth'] == 24
  assert vit.vit_kwargs('S') == dict(embed_dim=384, depth=12, num_heads=6, patch_size=16)
  with pytest.raises(ValueError, match='X/16'):
    vit.vit_kwargs('X/16')
  with pytest.raises(ValueError, match='B/x'):
    vit.vit_kwargs('B/x')


# ----------------------------------------------------------------------------
# 2. Parity against timm's Beit.
# ----------------------------------------------------------------------------


def _randomise(torch, module, seed=0):
  """Moves every parameter off its init so zero-init ones are exercised too."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      scale = 0.5 if 'relative_position' in name else 0.05
      p.add_(torch.randn(p.shape, generator=gen) * scale)


def _timm_beit(torch, **kwargs):
  from timm.models.beit import Beit  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  model = Beit(
    img_size=IMG,
    patch_size=4,
    embed_dim=64,
    depth=3,
    num_heads=4,
    num_classes=0,
    init_values=0.1,
    global_pool='token',
    use_fc_norm=False,
    **kwargs,
  ).eval()
  _randomise(torch, model)
  return model


def _torch_images(torch, images):
  return torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())


@pytest.mark.parametrize(
  'timm_flags, rel_pos, abs_pos',
  [
    (dict(use_shared_rel_pos_bias=True, use_abs_pos_emb=False), 'shared', 'none'),
    (dict(use_rel_pos_bias=True, use_abs_pos_emb=False), 'per_layer', 'none'),
    (dict(use_shared_rel_pos_bias=True, use_abs_pos_emb=True), 'shared', 'learned'),
  ],
)
def test_model_parity_with_timm_beit(torch_ref, timm_flags, rel_pos, abs_pos):
  torch = torch_ref
  ref = _timm_beit(torch, **timm_flags)
  params = convert.beit_from_torch(ref.state_dict(), depth=3)
  model = vit.VisionTransformer(**TINY, rel_pos=rel_pos, abs_pos=abs_pos)
  images = _images()
  # Same tree as a fresh init: nothing missing, nothing extra.
  fresh = _param_shapes(model, images)
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, fresh)
  out = _apply(model, params, images)
  with torch.no_grad():
    expected = ref.forward_features(_torch_images(torch, images)).numpy()
  assert _rel_err(out['normed'], expected) <= 1e-5


def test_block_parity_with_timm_block(torch_ref):
  """Per-layer table plus a shared bias passed in, both added to the logits."""
  torch = torch_ref
  from timm.models.beit import Block as TimmBlock  # pylint: disable=g-import-not-at-top

  torch.manual_seed(1)
  ref = TimmBlock(dim=64, num_heads=4, qkv_bias=True, init_values=0.1, window_size=(4, 4)).eval()
  _randomise(torch, ref, seed=1)
  state = {f'blocks.0.{k}': v for k, v in ref.state_dict().items()}
  params = convert.beit_from_torch(state, depth=1)['blocks_0']
  x = np.random.RandomState(0).randn(2, 17, 64).astype(np.float32)
  shared = np.random.RandomState(1).randn(4, 17, 17).astype(np.float32)
  block = vit.Block(dim=64, num_heads=4, rel_pos_grid=(4, 4))
  out = _apply(block, params, jnp.asarray(x), jnp.asarray(shared))
  with torch.no_grad():
    expected = ref(torch.from_numpy(x), shared_rel_pos_bias=torch.from_numpy(shared)[None]).numpy()
  assert _rel_err(out, expected) <= 1e-5


def test_block_gradients_match_timm_block(torch_ref):
  """Backward pass of a block against timm's autograd: input, shared bias and every parameter.
  Covers vit.softmax's derivative rule, the bias gradient summed over the batch
  (add_bias_over_batch) and the product written in (B, heads, N, head_dim)."""
  torch = torch_ref
  from timm.models.beit import Block as TimmBlock  # pylint: disable=g-import-not-at-top

  torch.manual_seed(2)
  ref = TimmBlock(dim=64, num_heads=4, qkv_bias=True, init_values=0.1, window_size=(4, 4))
  _randomise(torch, ref, seed=2)
  state = {f'blocks.0.{k}': v for k, v in ref.state_dict().items()}
  params = convert.beit_from_torch(state, depth=1)['blocks_0']
  rs = np.random.RandomState(3)
  x, shared = rs.randn(3, 17, 64).astype(np.float32), rs.randn(4, 17, 17).astype(np.float32)
  weights = rs.randn(3, 17, 64).astype(np.float32)  # a loss that weighs every output
  block = vit.Block(dim=64, num_heads=4, rel_pos_grid=(4, 4))
  loss = lambda p, x, b: jnp.sum(block.apply({'params': p}, x, b) * weights)
  g_params, g_x, g_bias = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(
    params, jnp.asarray(x), jnp.asarray(shared)
  )
  tx = torch.from_numpy(x).requires_grad_()
  tb = torch.from_numpy(shared).requires_grad_()
  (ref(tx, shared_rel_pos_bias=tb[None]) * torch.from_numpy(weights)).sum().backward()
  assert _rel_err(g_x, tx.grad.numpy()) <= 1e-5
  assert _rel_err(g_bias, tb.grad.numpy()) <= 1e-5
  grads = {k: v for k, v in state.items()}  # buffers as they are, parameters by their gradient
  grads.update({f'blocks.0.{n}': p.grad for n, p in ref.named_parameters()})
  expected = convert.beit_from_torch(grads, depth=1)['blocks_0']
  flat, ref_flat = (
    jax.tree_util.tree_leaves_with_path(g_params),
    dict(jax.tree_util.tree_leaves_with_path(expected)),
  )
  assert len(flat) == len(ref_flat)
  for path, g in flat:
    assert _rel_err(g, ref_flat[path]) <= 1e-5, jax.tree_util.keystr(path)


def test_softmax_and_bias_rules_equal_plain_autodiff():
  """vit.softmax and vit.add_bias_over_batch: the same values, gradients and JVPs as
  jax.nn.softmax and `x + bias[None]`, also with the float32-min fill of a boolean mask."""
  key = jax.random.split(jax.random.key(0), 3)
  x = 4.0 * jax.random.normal(key[0], (5, 3, 7, 7))
  x = x.at[..., 2].set(jnp.finfo(jnp.float32).min)
  bias, w = jax.random.normal(key[1], (3, 7, 7)), jax.random.normal(key[2], x.shape)
  ours = lambda x, b: jnp.sum(vit.softmax(vit.add_bias_over_batch(x, b)) * w)
  plain = lambda x, b: jnp.sum(jax.nn.softmax(x + b[None], axis=-1) * w)
  np.testing.assert_allclose(ours(x, bias), plain(x, bias), rtol=1e-6)
  for a, b in zip(jax.grad(ours, (0, 1))(x, bias), jax.grad(plain, (0, 1))(x, bias)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  _, t_ours = jax.jvp(vit.softmax, (x,), (w,))
  _, t_plain = jax.jvp(lambda x: jax.nn.softmax(x, axis=-1), (x,), (w,))
  np.testing.assert_allclose(t_ours, t_plain, rtol=1e-5, atol=1e-6)


def test_mask_token_mixing_matches_manual_torch(torch_ref):
  torch = torch_ref
  ref = _timm_beit(torch, use_shared_rel_pos_bias=True, use_abs_pos_emb=False)
  mask_token = np.random.RandomState(2).randn(1, 1, 64).astype(np.float32)
  state = dict(
    ref.state_dict(),
    mask_token=torch.from_numpy(mask_token),
    **{'lm_head.weight': torch.zeros(10, 64)},
  )
  params, unused = convert.beit_from_torch(state, depth=3, return_unused=True)
  assert unused == ['lm_head.weight']
  images = _images(batch=3)
  mask = np.random.RandomState(3).rand(3, 64) < 0.4
  model = vit.VisionTransformer(**TINY, use_mask_token=True)
  out = _apply(model, params, images, mask=jnp.asarray(mask), return_layers=(2,))
  with torch.no_grad():
    x = ref.patch_embed(_torch_images(torch, images))
    w = torch.from_numpy(mask.astype(np.float32))[..., None]
    x = x * (1 - w) + torch.from_numpy(mask_token) * w
    x = torch.cat([ref.cls_token.expand(3, -1, -1), x], dim=1)
    bias = ref.rel_pos_bias()
    layers = []
    for blk in ref.blocks:
      x = blk(x, shared_rel_pos_bias=bias)
      layers.append(x)
    expected = ref.norm(x).numpy()
  assert _rel_err(out['normed'], expected) <= 1e-5
  assert _rel_err(out['layers'][2], layers[1].numpy()) <= 1e-5
  assert _rel_err(out['rel_pos_bias'], bias.numpy()) <= 1e-6
  # The mask matters (guards against the mixing being skipped).
  unmasked = _apply(model, params, images)
  assert np.abs(unmasked['normed'] - out['normed']).max() > 1e-2


def test_convert_rejects_depth_mismatch(torch_ref):
  ref = _timm_beit(torch_ref, use_shared_rel_pos_bias=True, use_abs_pos_emb=False)
  with pytest.raises(ValueError, match='beyond depth'):
    convert.beit_from_torch(ref.state_dict(), depth=2)
  with pytest.raises(ValueError, match=r'no weights for blocks \[3\]'):
    convert.beit_from_torch(ref.state_dict(), depth=4)


# ----------------------------------------------------------------------------
# 3. Initialisation conventions.
# ----------------------------------------------------------------------------


def _kernels(params, names):
  """Every Dense/Conv kernel under a module whose name is in names."""
  found = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [p.key for p in path]
    if keys[-1] == 'kernel' and keys[-2] in names:
      found.append((keys, np.asarray(leaf)))
  return found


def test_beit_init_truncates_at_one_std_and_rescales_by_depth():
  images = _images()
  model = vit.VisionTransformer(**TINY, use_mask_token=True)
  boxed = _init(model, images)
  params = nn.meta.unbox(boxed)['params']
  # apply takes the boxed variables straight from init as well as unboxed ones.
  out = jax.eval_shape(lambda v: model.apply(v, images)['normed'], boxed)
  assert out.shape == (2, 65, 64)

  kernels = _kernels(params, ('qkv', 'proj', 'fc1', 'fc2', 'patch_embed'))
  assert len(kernels) == 3 * 4 + 1
  truncated_std = 0.02 * 0.5396  # N(0, .02^2) truncated at +-1 std
  for keys, kernel in kernels:
    if keys[-2] in ('proj', 'fc2'):  # undo the depth rescale sqrt(2 (l + 1))
      kernel = kernel * math.sqrt(2 * (int(keys[0].split('_')[1]) + 1))
    # The truncation edge is reached exactly: a wrong rescale factor moves it.
    assert 0.0199 < np.abs(kernel).max() <= 0.02 + 1e-7, keys
    assert abs(kernel.std() - truncated_std) < 0.03 * truncated_std, keys
  for name in ('cls_token', 'mask_token'):
    assert np.abs(params[name]).max() <= 0.02 + 1e-7
  assert not np.any(params['patch_embed']['bias'])
  assert not np.any(params['blocks_0']['mlp']['fc1']['bias'])


def test_scan_init_rescales_each_layer():
  """Under nn.scan the layer id is traced: fc2 std must fall as 1/sqrt(2 l)."""
  params = _params(vit.VisionTransformer(**TINY, scan_layers=True), _images())
  stds = np.asarray(params['blocks']['mlp']['fc2']['kernel']).std(axis=(1, 2))
  np.testing.assert_allclose(stds * np.sqrt(2.0 * np.arange(1, 4)), 0.02 * 0.5396, rtol=0.03)
  # fc1 is not rescaled, and layers get independent keys.
  fc1 = np.asarray(params['blocks']['mlp']['fc1']['kernel'])
  np.testing.assert_allclose(fc1.std(axis=(1, 2)), 0.02 * 0.5396, rtol=0.03)
  assert not np.allclose(fc1[0], fc1[1])


def test_timm_init_is_effectively_untruncated_with_torch_default_patch_conv():
  params = _params(
    vit.VisionTransformer(**TINY, weight_init='timm', depth_rescale=False), _images()
  )
  values = np.concatenate([k.ravel() for _, k in _kernels(params, ('qkv', 'fc1', 'fc2'))])
  assert abs(values.std() - 0.02) < 5e-4
  assert np.abs(values).max() > 0.04  # beyond 2 std, so not truncated at +-2 std
  bound = 1 / math.sqrt(4 * 4 * 3)
  conv = params['patch_embed']
  assert np.abs(conv['kernel']).max() <= bound and np.abs(conv['bias']).max() <= bound
  assert abs(np.asarray(conv['kernel']).std() - bound / math.sqrt(3)) < 0.05 * bound
  assert np.any(conv['bias'])


def test_torch_default_block_init_and_zero_inits():
  block = vit.Block(dim=64, num_heads=4, weight_init='torch_default', rel_pos_grid=(4, 4))
  params = _params(block, jnp.zeros((1, 17, 64)))
  for (sub, dense), fan_in in {
    ('attn', 'qkv'): 64,
    ('attn', 'proj'): 64,
    ('mlp', 'fc1'): 64,
    ('mlp', 'fc2'): 256,
  }.items():
    layer = params[sub][dense]
    bound = 1 / math.sqrt(fan_in)
    assert np.abs(layer['kernel']).max() <= bound
    assert np.abs(layer['kernel']).max() > 0.95 * bound  # uniform fills its range
    if 'bias' in layer:
      assert np.abs(layer['bias']).max() <= bound and np.any(layer['bias'])
  assert 'bias' not in params['attn']['qkv']
  for name in ('q_bias', 'v_bias'):
    assert params['attn'][name].shape == (64,) and not np.any(params['attn'][name])
  table = params['rel_pos_bias']['relative_position_bias_table']
  assert table.shape == (7 * 7 + 3, 4) and not np.any(table)
  np.testing.assert_array_equal(params['gamma_1'], np.full(64, 0.1, np.float32))
  np.testing.assert_array_equal(params['gamma_2'], np.full(64, 0.1, np.float32))
  for scale in (0.0, None):
    bare = vit.Block(dim=64, num_heads=4, layer_scale_init=scale)
    keys = _param_shapes(bare, jnp.zeros((1, 17, 64))).keys()
    assert 'gamma_1' not in keys and 'gamma_2' not in keys


def test_torch_default_init_helpers():
  kernel = vit.torch_default_init()(_key(0), (3, 3, 8, 16))
  bound = 1 / math.sqrt(3 * 3 * 8)
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
  bias = vit.torch_default_bias_init(72)(_key(1), (1000,))
  assert np.abs(bias).max() <= bound and np.abs(bias).max() > 0.9 * bound


def test_params_carry_logical_axis_names():
  variables = jax.eval_shape(
    lambda: vit.VisionTransformer(**TINY, scan_layers=True).init(_key(0), _images())
  )
  boxed = variables['params']
  assert boxed['blocks']['mlp']['fc1']['kernel'].names == ('layers', 'embed', 'mlp')
  assert boxed['blocks']['attn']['qkv']['kernel'].names == ('layers', 'embed', 'qkv')
  assert boxed['rel_pos_bias']['relative_position_bias_table'].names == (None, 'heads')
  specs = nn.get_partition_spec(variables)
  assert all(
    len(spec) == np.ndim(leaf)
    for spec, leaf in zip(
      jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)),
      jax.tree.leaves(nn.meta.unbox(variables)),
    )
  )


def test_sharded_apply_with_logical_rules_matches_unsharded():
  """The axis names resolve to a valid sharding (8 fake CPU devices, 4x2 mesh)."""
  if jax.device_count() < 8:
    pytest.skip('needs the 8 fake CPU devices of conftest.py')
  model = vit.VisionTransformer(**TINY, scan_layers=True)
  images = _images(batch=4)
  params = _random_params(model, images)
  expected = _apply(model, params, images)['normed']
  mesh = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (
    ('act_batch', 'data'),
    ('act_len', None),
    ('act_embed', None),
    ('embed', None),
    ('mlp', 'model'),
    ('qkv', 'model'),
    ('heads', None),
    ('layers', None),
  )
  specs = nn.get_partition_spec(jax.eval_shape(lambda: model.init(_key(0), images)))['params']
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  sharded = jax.device_put(params, shardings)
  assert sharded['blocks']['mlp']['fc1']['kernel'].sharding.spec == jax.P(None, None, 'model')
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    out = jax.jit(lambda p, x: model.apply({'params': p}, x)['normed'])(sharded, images)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# 4. Scanned layers.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('remat', [False, True])
def test_scan_matches_unrolled(remat):
  images = _images()
  unrolled = vit.VisionTransformer(**TINY, use_mask_token=True)
  params = _random_params(unrolled, images)
  mask = jnp.asarray(np.random.RandomState(3).rand(2, 64) < 0.4)
  expected = _apply(unrolled, params, images, mask=mask, return_layers=(1, 2))
  scanned = vit.VisionTransformer(**TINY, use_mask_token=True, scan_layers=True, remat=remat)
  stacked = convert.stack_layers(params)
  out = _apply(scanned, stacked, images, mask=mask, return_layers=(1, 2))
  for key in ('last', 'normed'):
    np.testing.assert_allclose(out[key], expected[key], rtol=1e-5, atol=1e-5)
  assert sorted(out['layers']) == [1, 2]
  for l in (1, 2):
    np.testing.assert_allclose(out['layers'][l], expected['layers'][l], rtol=1e-5, atol=1e-5)
  if remat:  # gradients flow through scan + remat
    grads = jax.grad(lambda p: _apply(scanned, p, images)['normed'].sum())(stacked)
    assert np.abs(grads['blocks']['attn']['qkv']['kernel']).max() > 0
  restored = convert.unstack_layers(stacked)
  jax.tree.map(np.testing.assert_array_equal, restored, params)


def test_unrolled_remat_matches_plain():
  images = _images()
  plain = vit.VisionTransformer(**TINY)
  params = _random_params(plain, images)
  out = _apply(vit.VisionTransformer(**TINY, remat=True), params, images)
  np.testing.assert_allclose(
    out['normed'], _apply(plain, params, images)['normed'], rtol=1e-6, atol=1e-6
  )


def test_return_layers_validation():
  model = vit.VisionTransformer(**TINY)
  with pytest.raises(ValueError, match='1-based'):
    model.init(_key(0), _images(), return_layers=(0,))


# ----------------------------------------------------------------------------
# 5. bf16 compute.
# ----------------------------------------------------------------------------


def _all_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          yield from _all_eqns(inner)


def test_bf16_compute_keeps_fp32_params_softmax_and_layernorm():
  images = _images()
  model32 = vit.VisionTransformer(**TINY)
  model16 = vit.VisionTransformer(**TINY, dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(_param_shapes(model16, images)))
  params = _random_params(model32, images)
  out16 = _apply(model16, params, images)
  out32 = _apply(model32, params, images)
  assert out16['normed'].dtype == jnp.bfloat16 and out16['last'].dtype == jnp.bfloat16
  assert _rel_err(out16['normed'], out32['normed']) < 5e-2

  jaxpr = jax.make_jaxpr(lambda p, x: _apply(model16, p, x))(params, images).jaxpr
  eqns = list(_all_eqns(jaxpr))
  exps = [e for e in eqns if e.primitive.name == 'exp']
  rsqrts = [e for e in eqns if e.primitive.name == 'rsqrt']
  assert exps and all(e.outvars[0].aval.dtype == jnp.float32 for e in exps)
  assert len(rsqrts) >= 2 * 3 + 1
  assert all(e.outvars[0].aval.dtype == jnp.float32 for e in rsqrts)
  # Logits: bf16 operands accumulated into fp32.
  logits = [
    e
    for e in eqns
    if e.primitive.name == 'dot_general'
    and e.outvars[0].aval.dtype == jnp.float32
    and e.invars[0].aval.dtype == jnp.bfloat16
  ]
  assert len(logits) == 3
  # Dense layers really run in bf16.
  bf16_dots = [
    e for e in eqns if e.primitive.name == 'dot_general' and e.outvars[0].aval.dtype == jnp.bfloat16
  ]
  assert len(bf16_dots) >= 3 * 4


# ----------------------------------------------------------------------------
# 6. Drop path.
# ----------------------------------------------------------------------------


def test_drop_path_drops_whole_samples_and_rescales():
  rate, batch = 0.5, 64
  block = vit.Block(dim=16, num_heads=2, drop_path=rate)
  x = jnp.asarray(np.random.RandomState(0).randn(batch, 5, 16).astype(np.float32))
  params = _random_params(block, x)
  rng = {'dropout': _key(2)}
  train = _apply(block, params, x, train=True, rngs=rng)
  np.testing.assert_array_equal(train, _apply(block, params, x, train=True, rngs=rng))
  other = _apply(block, params, x, train=True, rngs={'dropout': _key(3)})
  assert np.abs(other - train).max() > 1e-3
  evaluated = _apply(block, params, x)
  no_drop = _apply(vit.Block(dim=16, num_heads=2), params, x)
  np.testing.assert_array_equal(evaluated, no_drop)

  # Candidates: each branch either dropped (gamma 0) or kept and scaled by 1/keep.
  keep = 1 - rate
  candidates = {}
  for kept_1 in (0, 1):
    for kept_2 in (0, 1):
      variant = dict(
        params, gamma_1=params['gamma_1'] * kept_1 / keep, gamma_2=params['gamma_2'] * kept_2 / keep
      )
      candidates[(kept_1, kept_2)] = np.asarray(_apply(block, variant, x))
  seen = set()
  for i in range(batch):
    matches = [c for c, y in candidates.items() if np.allclose(train[i], y[i], atol=1e-5)]
    assert len(matches) == 1, f'sample {i} matches {matches}'
    seen.add(matches[0])
  assert seen == set(candidates)


def test_drop_path_rates_are_linspace():
  assert vit.drop_path_rates(0.3, 4) == pytest.approx([0.0, 0.1, 0.2, 0.3])
  recorded = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, vit.Block) and context.method_name == '__call__':
      recorded.append(context.module.drop_path)
    return next_fun(*args, **kwargs)

  model = vit.VisionTransformer(**dict(TINY, depth=4), drop_path_rate=0.3)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(_key(0), _images()))
  assert recorded == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_scanned_drop_path_is_active_in_training_only():
  images = _images(batch=8)
  model = vit.VisionTransformer(**TINY, drop_path_rate=0.5, scan_layers=True)
  params = _random_params(model, images)
  rng = {'dropout': _key(1)}
  trained = _apply(model, params, images, train=True, rngs=rng)['normed']
  evaluated = _apply(model, params, images)['normed']  # no 'dropout' rng needed
  assert np.abs(trained - evaluated).max() > 1e-3


# ----------------------------------------------------------------------------
# 7. Fixed 2-D sincos positions (CAE v2 layout).
# ----------------------------------------------------------------------------


def test_sincos_2d_pos_embed_layout():
  h, w, dim = 3, 5, 16
  table = vit.sincos_2d_pos_embed((h, w), dim)
  assert table.shape == (h * w + 1, dim) and table.dtype == np.float32
  assert not np.any(table[0])
  quarter = dim // 4
  for r in range(h):
    for c in range(w):
      row = table[1 + r * w + c]
      for k in range(quarter):
        omega = 1.0 / 10000 ** (k / quarter)
        np.testing.assert_allclose(
          [row[k], row[quarter + k], row[2 * quarter + k], row[3 * quarter + k]],
          [math.sin(r * omega), math.cos(r * omega), math.sin(c * omega), math.cos(c * omega)],
          atol=1e-6,
        )
  np.testing.assert_array_equal(vit.sincos_2d_pos_embed((h, w), dim, cls_token=False), table[1:])


def test_sincos_abs_pos_is_added_to_tokens():
  images = _images()
  kwargs = dict(TINY, depth=0, final_norm=False, rel_pos='none')
  with_pos = vit.VisionTransformer(**kwargs, abs_pos='sincos')
  params = _random_params(with_pos, images)
  assert 'pos_embed' not in params
  diff = (
    _apply(with_pos, params, images)['last']
    - _apply(vit.VisionTransformer(**kwargs), params, images)['last']
  )
  np.testing.assert_allclose(
    diff, np.broadcast_to(vit.sincos_2d_pos_embed((8, 8), 64), diff.shape), atol=1e-5
  )


def test_dense_uses_one_row_matmul_on_cpu_and_the_3d_form_elsewhere():
  """vit.Dense: the same parameters, values and gradients as nn.Dense; lowered for the CPU
  its (B, N, D) product is one (B*N, D) matmul, lowered for a TPU it keeps the 3-D form."""
  import re  # pylint: disable=g-import-not-at-top

  x = jax.random.normal(jax.random.key(1), (2, 5, 8))
  ours, ref = vit.Dense(4, name="d"), nn.Dense(4, name="d")
  params = ours.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref.init(jax.random.key(0), x))
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-6)
  for a, b in zip(
    jax.tree.leaves(jax.grad(loss(ours), argnums=(0, 1))(params, x)),
    jax.tree.leaves(jax.grad(loss(ref), argnums=(0, 1))(params, x)),
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  def dot_shapes(platform):
    grad = jax.jit(jax.grad(loss(ours)))
    text = grad.trace(params, x).lower(lowering_platforms=(platform,)).as_text()
    return set(re.findall(r"dot_general.*?-> tensor<([\dx]+)xf32>", text))

  assert "10x4" in dot_shapes("cpu") and "2x5x4" not in dot_shapes("cpu")
  assert "2x5x4" in dot_shapes("tpu") and "10x4" not in dot_shapes("tpu")


def test_materialized_gradient_is_identity_and_blocks_backward_does_not_grow_with_depth():
  """vit.materialized_gradient: identity value and gradient (a non-finite gradient stays
  non-finite), and no conditional over a mesh of several devices. Compiled for one CPU, the
  largest fused computation of a ViT's backward pass is as large at depth 6 as at depth 2;
  XLA:CPU used to copy the residual gradient's chain of sums into every reader, so each
  block's backward fusions grew with the blocks after it (583 operations at depth 8 against
  187 at depth 2)."""
  import re  # pylint: disable=g-import-not-at-top

  x = jax.random.normal(jax.random.key(0), (8, 5, 8))
  w = jax.random.normal(jax.random.key(1), x.shape)
  f = lambda x: jnp.sum(jnp.sin(vit.materialized_gradient(x)) * w)
  np.testing.assert_array_equal(vit.materialized_gradient(x), x)
  np.testing.assert_allclose(jax.jit(jax.grad(f))(x), jnp.cos(x) * w, rtol=1e-6)
  grad_of_sum = jax.jit(jax.grad(lambda x, w: jnp.sum(vit.materialized_gradient(x) * w)))
  for at in ((0, 0, 0), (1, 4, 7)):  # where the conditional looks, and elsewhere
    g = np.asarray(grad_of_sum(x, w.at[at].set(jnp.inf)))
    assert not np.isfinite(g[at]), at

  def largest_backward_fusion(depth):
    model = vit.VisionTransformer(patch_size=8, embed_dim=32, depth=depth, num_heads=2)
    images = _images()
    params = model.init(jax.random.key(0), images)
    loss = lambda p: jnp.sum(model.apply(p, images)['normed'] ** 2)
    text = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    sizes, current = {}, None
    for line in text.splitlines():
      start = re.match(r'^%?(fused_computation[\w.\-]*) ', line)
      if start:
        current = start.group(1)
        sizes[current] = 0
      elif line.startswith('}'):
        current = None
      elif current and ' = ' in line:
        sizes[current] += 1
    return max(sizes.values())

  assert largest_backward_fusion(6) <= largest_backward_fusion(2)

  # Over a mesh of 8 devices the conditional's predicate would need an all-reduce per block:
  # there the gradient passes through as it is.
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')))
  with jax.set_mesh(mesh):
    text = jax.jit(jax.grad(f)).lower(sharded).compile().as_text()
  assert ' conditional(' not in text
  assert ' conditional(' in jax.jit(jax.grad(f)).lower(x).compile().as_text()
