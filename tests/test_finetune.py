"""Fine-tuning pieces: layer-wise lr decay (reference formula), rel-pos expansion and
resizing, the classifier head (mim_jax/evaluation/{lr_decay,backbones,finetune}.py)."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from mim_jax.evaluation import backbones
from mim_jax.evaluation import finetune
from mim_jax.evaluation import lr_decay
from mim_jax.models import vit

TINY = dict(patch_size=4, embed_dim=32, depth=3, num_heads=2)


def _reference_layer_id(torch_name, num_layers):
  """`get_num_layer_for_vit` (`microsoft/unilm:beit2/optim_factory.py`), num_max_layer = L + 2."""
  num_max_layer = num_layers + 2
  if torch_name in ("cls_token", "mask_token", "pos_embed"):
    return 0
  if torch_name.startswith("patch_embed"):
    return 0
  if torch_name.startswith("rel_pos_bias"):
    return num_max_layer - 1
  if torch_name.startswith("blocks"):
    return int(torch_name.split(".")[1]) + 1
  return num_max_layer - 1


def _torch_name(path):
  """Flax path -> the reference model's parameter name (what its layer-id rule reads)."""
  name = "/".join(path)
  name = re.sub(r"^backbone/", "", name)
  name = re.sub(r"blocks_(\d+)", r"blocks.\1", name)
  name = name.replace("patch_embed/", "patch_embed.proj.")
  return name.replace("/", ".")


def _paths(tree):
  return [tuple(str(k.key) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _classifier_shapes(pool="mean", **kw):
  model = finetune.ClassifierViT(dict(TINY, **kw), num_classes=5, pool=pool)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3))))
  return model, nn.meta.unbox(shapes)["params"]


def test_layer_ids_follow_the_reference_rule():
  # A pre-training-like tree (shared table, mask token, learned pos_embed) under 'backbone',
  # plus a fine-tuning tree (per-layer tables, fc_norm, head).
  pre = vit.VisionTransformer(**TINY, use_mask_token=True, abs_pos="learned")
  pre_shapes = nn.meta.unbox(
    jax.eval_shape(lambda: pre.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3))))
  )["params"]
  _, ft_shapes = _classifier_shapes()
  for tree in ({"backbone": pre_shapes, "head": {"kernel": 0}}, ft_shapes):
    ids = lr_decay.layer_ids(tree, depth=3)
    for path, got in zip(_paths(tree), jax.tree.leaves(ids)):
      assert got == _reference_layer_id(_torch_name(path), 3), (path, _torch_name(path))
  names = {_torch_name(p) for p in _paths({"backbone": pre_shapes})}
  assert {
    "cls_token",
    "mask_token",
    "pos_embed",
    "rel_pos_bias.relative_position_bias_table",
    "patch_embed.proj.kernel",
    "blocks.2.attn.qkv.kernel",
  } <= names
  assert lr_decay.layer_scales(3, 0.65) == pytest.approx([0.65**4, 0.65**3, 0.65**2, 0.65, 1.0])


def _optim_cfg(**over):
  c = mlc.ConfigDict(
    dict(
      lr=1e-3,
      min_lr=1e-3,
      warmup_steps=0,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      clip_grad_norm=0.0,
      layer_decay=0.65,
      no_decay_names=("cls_token", "pos_embed"),
    )
  )
  c.update(over)
  return c


def test_optimizer_scales_every_update_by_its_layer_factor():
  _, shapes = _classifier_shapes()
  params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes)
  tx, _ = lr_decay.make_finetune_optimizer(_optim_cfg(), total_steps=10, depth=3)
  # First Adam step with g = 1: the Adam direction is 1/(1 + eps), so update = -lr * scale.
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  for path, u in zip(_paths(params), jax.tree.leaves(updates)):
    scale = 0.65 ** (3 + 1 - _reference_layer_id(_torch_name(path), 3))
    np.testing.assert_allclose(u, -1e-3 * scale, rtol=3e-5, err_msg=str(path))


def test_weight_decay_is_scaled_by_layer_and_masked():
  _, shapes = _classifier_shapes()
  params = jax.tree.map(lambda s: jnp.full(s.shape, 2.0, s.dtype), shapes)
  tx, _ = lr_decay.make_finetune_optimizer(_optim_cfg(weight_decay=0.05), total_steps=10, depth=3)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  for path, u, p in zip(_paths(params), jax.tree.leaves(updates), jax.tree.leaves(params)):
    decayed = p.ndim > 1 and path[-1] not in ("cls_token", "pos_embed")
    scale = 0.65 ** (3 + 1 - _reference_layer_id(_torch_name(path), 3))
    np.testing.assert_allclose(
      u, -1e-3 * scale * 0.05 * 2.0 if decayed else 0.0, rtol=3e-5, err_msg=str(path)
    )


def test_scanned_blocks_are_refused_with_the_field_name():
  with pytest.raises(ValueError, match="scan_layers"):
    lr_decay.layer_id(("backbone", "blocks", "attn", "qkv", "kernel"), 3)


def _random_params(model, seed=0, images=(1, 16, 16, 3)):
  shapes = nn.meta.unbox(
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(images)))
  )["params"]
  rs = np.random.RandomState(seed)

  def draw(path, s):
    name = path[-1].key
    if name == "scale":
      return 1 + 0.1 * rs.randn(*s.shape).astype(np.float32)
    std = 0.5 if name == "relative_position_bias_table" else 0.05
    return (std * rs.randn(*s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def test_shared_table_expanded_per_layer_gives_the_same_network():
  pre = vit.VisionTransformer(**TINY, rel_pos="shared", use_mask_token=True)
  params = _random_params(pre)
  spec = backbones.infer_spec(params)
  assert (spec.rel_pos, spec.grid, spec.num_heads, spec.use_mask_token) == (
    "shared",
    (4, 4),
    2,
    True,
  )
  ft = backbones.finetune_params(params, spec, grid=(4, 4), keep_norm=True)
  assert "rel_pos_bias" not in ft and "mask_token" not in ft
  for i in range(3):
    np.testing.assert_array_equal(
      ft[f"blocks_{i}"]["rel_pos_bias"]["relative_position_bias_table"],
      params["rel_pos_bias"]["relative_position_bias_table"],
    )
  per_layer = vit.VisionTransformer(**TINY, rel_pos="per_layer")
  x = jnp.asarray(np.random.RandomState(1).randn(2, 16, 16, 3).astype(np.float32))
  a = pre.apply({"params": params}, x)["normed"]
  b = per_layer.apply({"params": ft}, x)["normed"]
  np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
  # ... and the tables really matter (a zero table changes the output).
  zeroed = jax.tree_util.tree_map_with_path(
    lambda p, v: v * 0 if p[-1].key == "relative_position_bias_table" else v, ft
  )
  assert np.abs(per_layer.apply({"params": zeroed}, x)["normed"] - a).max() > 1e-3


def test_resize_rel_pos_table_reproduces_cubic_polynomials():
  """The s=0 bicubic spline is exact on cubics: resizing samples the polynomial at the
  target offsets, through the reference's geometric source coordinates."""
  src_grid, dst_grid = (7, 7), (10, 10)
  coords = backbones._geometric_coords(13, 19)  # pylint: disable=protected-access
  assert len(coords) == 13 and coords[6] == 0 and np.all(np.diff(coords) > 0)
  assert coords[-1] == pytest.approx(9.0, abs=0.3)  # spans the new half-width 19 // 2
  poly = [
    lambda y, x: 0.3 + 0.1 * x - 0.02 * y * y + 1e-3 * x**3,
    lambda y, x: -0.5 + 2e-3 * x * y * y - 0.01 * y,
  ]
  gy, gx = np.meshgrid(coords, coords, indexing="ij")
  table = np.concatenate(
    [
      np.stack([p(gy, gx).reshape(-1) for p in poly], 1),
      np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
    ]
  ).astype(np.float32)
  assert table.shape[0] == vit.num_relative_distances(src_grid)
  out = backbones.resize_rel_pos_table(table, dst_grid)
  assert out.shape == (vit.num_relative_distances(dst_grid), 2)
  t = np.arange(-9, 10, dtype=np.float64)
  ty, tx = np.meshgrid(t, t, indexing="ij")
  for h, p in enumerate(poly):
    np.testing.assert_allclose(out[:-3, h], p(ty, tx).reshape(-1), atol=2e-5)
  np.testing.assert_array_equal(out[-3:], table[-3:])
  assert backbones.resize_rel_pos_table(table, src_grid) is not None
  np.testing.assert_array_equal(backbones.resize_rel_pos_table(table, src_grid), table)


def test_linear_resize_matches_timm(torch_ref):
  torch = torch_ref
  from timm.layers import pos_embed_rel  # pylint: disable=g-import-not-at-top

  table = np.random.RandomState(0).randn(vit.num_relative_distances((5, 5)), 3)
  table = table.astype(np.float32)
  expected = pos_embed_rel.resize_rel_pos_bias_table(
    torch.from_numpy(table),
    new_window_size=(8, 8),
    new_bias_shape=(vit.num_relative_distances((8, 8)), 3),
  ).numpy()
  np.testing.assert_allclose(
    backbones.resize_rel_pos_table(table, (8, 8), "linear"), expected, rtol=1e-5, atol=1e-5
  )


def test_classifier_head_init_scale_pooling_and_fresh_tables():
  model, shapes = _classifier_shapes()
  assert set(shapes) == {"backbone", "fc_norm", "head"}
  assert "norm" not in shapes["backbone"] and "rel_pos_bias" not in shapes["backbone"]
  assert "rel_pos_bias" in shapes["backbone"]["blocks_0"]
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  params = nn.meta.unbox(variables)["params"]
  kernel = np.asarray(params["head"]["kernel"])
  assert 0.5e-5 < kernel.std() < 3e-5 and not np.any(params["head"]["bias"])
  assert not np.any(params["backbone"]["blocks_1"]["rel_pos_bias"]["relative_position_bias_table"])
  _, cls_shapes = _classifier_shapes(pool="cls")
  assert "fc_norm" not in cls_shapes and "norm" in cls_shapes["backbone"]
  _, no_rel = _classifier_shapes(rel_pos="none", abs_pos="sincos")
  assert "rel_pos_bias" not in no_rel["backbone"]["blocks_0"]


def test_mean_pooling_goes_through_fc_norm():
  model = finetune.ClassifierViT(TINY, num_classes=5)
  params = _random_params(model)
  x = jnp.asarray(np.random.RandomState(2).randn(2, 16, 16, 3).astype(np.float32))
  logits = model.apply({"params": params}, x)
  enc = vit.VisionTransformer(
    **dict(TINY, rel_pos="per_layer", final_norm=False, weight_init="timm")
  )
  tokens = np.asarray(enc.apply({"params": params["backbone"]}, x)["last"], np.float64)
  pooled = tokens[:, 1:].mean(1)
  mu, var = pooled.mean(-1, keepdims=True), pooled.var(-1, keepdims=True)
  normed = (pooled - mu) / np.sqrt(var + 1e-6) * params["fc_norm"]["scale"] + params["fc_norm"][
    "bias"
  ]
  np.testing.assert_allclose(
    logits, normed @ params["head"]["kernel"] + params["head"]["bias"], rtol=1e-4, atol=1e-5
  )


def test_train_step_learns_and_ema_follows():
  model = finetune.ClassifierViT(dict(TINY, depth=2, drop_path_rate=0.1), num_classes=2)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3))))["params"]
  tx, schedule = lr_decay.make_finetune_optimizer(
    _optim_cfg(lr=3e-3, min_lr=3e-3, layer_decay=0.75), total_steps=30, depth=2
  )
  aug = mlc.ConfigDict(
    dict(mixup=0.0, cutmix=0.0, mixup_prob=1.0, mixup_switch_prob=0.5, label_smoothing=0.1)
  )
  step = jax.jit(finetune.make_train_step(model, tx, schedule, aug, num_classes=2, ema_decay=0.9))
  rs = np.random.RandomState(0)
  images = np.zeros((8, 16, 16, 3), np.uint8)
  labels = np.arange(8) % 2
  images[labels == 1, :8] = 255  # class 1: bright top half
  images += rs.randint(0, 30, images.shape).astype(np.uint8)
  batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
  state = dict(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    rng=jax.random.PRNGKey(1),
    ema=finetune.ema_init(params),
  )
  first = None
  for _ in range(30):
    prev_ema, prev_params = state["ema"], state["params"]
    state, metrics = step(state, batch)
    first = first if first is not None else float(metrics["loss"])
  np.testing.assert_allclose(
    state["ema"]["head"]["bias"],
    0.9 * prev_ema["head"]["bias"] + 0.1 * state["params"]["head"]["bias"],
    rtol=1e-5,
  )
  assert float(metrics["loss"]) < 0.75 * first and float(metrics["train_top1"]) == 1.0
  del prev_params
  sums = jax.jit(finetune.make_eval_step(model))(
    state["params"], dict(batch, valid=jnp.asarray([True] * 6 + [False] * 2))
  )
  assert float(sums["count"]) == 6 and float(sums["correct"]) == 6
