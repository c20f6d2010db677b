"""CAE v2 (Atten4Vis/CAE, caev2): the encoder never sees masked patches, positions enter queries
and keys but never values, the loss covers all 1 + N tokens in [cls, visible, masked] order
against the teacher's tokens, xavier init, and the per-size recipe."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import config_lib
from mim_jax import methods
from mim_jax.methods import caev2
from mim_jax.models import convert

SIZE, PATCH = 16, 4


def _config(**over):
  c = config_lib.load_config("caev2_vitb", "runlocal")
  c.data.image_size = c.data.second_image_size = SIZE
  c.model.variant, c.model.width, c.model.depth, c.model.heads = "T/4", 32, 2, 2
  c.method.update(num_masked=6, min_block=2, regressor_dim=32, regressor_heads=2, regressor_depth=2)
  c.teacher.random_init = f"random:ViT-B/16,width=32,layers=1,patch_size={PATCH},image_size={SIZE}"
  for k, v in over.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def _batch(method, seed=0):
  rng = np.random.default_rng(seed)
  img = rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
  ex = [
    method.prepare({"image": img[i], "image2": img[i].copy()}, np.random.default_rng(i))
    for i in range(2)
  ]
  return {k: np.stack([e[k] for e in ex]) for k in ex[0]}


@pytest.fixture(scope="module")
def setup():
  method = methods.build(_config())
  batch = _batch(method)
  params = nn.unbox(method.init(jax.random.PRNGKey(0), jax.tree.map(jnp.asarray, batch)))["params"]
  return method, batch, params


def _patch_slices(pos, i):
  r, c = divmod(int(pos), SIZE // PATCH)
  return (i, slice(r * PATCH, (r + 1) * PATCH), slice(c * PATCH, (c + 1) * PATCH))


def test_masked_pixels_never_reach_the_model(setup):
  method, batch, params = setup
  assert batch["mask"].sum(1).tolist() == [6, 6]
  consts = method.consts()
  pred, _ = method.forward(params, consts, jax.tree.map(jnp.asarray, batch), None, False)
  changed = dict(batch, image=batch["image"].copy())
  for i in range(2):
    for pos in np.flatnonzero(batch["mask"][i]):
      changed["image"][_patch_slices(pos, i)] = 255 - changed["image"][_patch_slices(pos, i)]
  pred2, _ = method.forward(params, consts, jax.tree.map(jnp.asarray, changed), None, False)
  np.testing.assert_array_equal(np.asarray(pred), np.asarray(pred2))
  # ... while a visible patch does.
  visible = dict(batch, image=batch["image"].copy())
  pos = np.flatnonzero(~batch["mask"][0])[0]
  visible["image"][_patch_slices(pos, 0)] = 0
  pred3, _ = method.forward(params, consts, jax.tree.map(jnp.asarray, visible), None, False)
  assert np.abs(np.asarray(pred3) - np.asarray(pred)).max() > 1e-4


def test_positions_enter_queries_and_keys_but_not_values():
  block = caev2.RegressorBlock(dim=16, num_heads=2)
  rng = np.random.default_rng(0)
  x_q, kv = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((2, 3, 16), (2, 7, 16)))
  pos_q, pos_k = jnp.asarray(rng.normal(size=(2, 3, 16))), jnp.asarray(rng.normal(size=(2, 7, 16)))
  params = block.init(jax.random.PRNGKey(0), x_q, kv, pos_q, pos_k)["params"]
  params = jax.tree.map(
    lambda v: v + 0.1 * jnp.asarray(rng.normal(size=v.shape), v.dtype), nn.unbox(params)
  )
  out = block.apply({"params": params}, x_q, kv, pos_q, pos_k)
  # (random shifts: a constant one would vanish in LN_k's mean subtraction)
  shift_q, shift_k = (jnp.asarray(rng.normal(size=t.shape), jnp.float32) for t in (pos_q, pos_k))
  moved = block.apply({"params": params}, x_q, kv, pos_q, pos_k + shift_k)
  assert np.abs(np.asarray(out) - np.asarray(moved)).max() > 1e-4  # keys carry positions
  # With the key projection zeroed, attention is uniform whatever the positions: the output
  # can then depend on pos_k only through the values, and it does not.
  flat = jax.tree_util.tree_map_with_path(
    lambda p, v: (
      v * 0 if "/".join(str(getattr(k, "key", k)) for k in p).endswith("cross_attn/k/kernel") else v
    ),
    params,
  )
  a = block.apply({"params": flat}, x_q, kv, pos_q, pos_k)
  b = block.apply({"params": flat}, x_q, kv, pos_q + shift_q, pos_k + shift_k)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_loss_covers_every_token_in_cls_visible_masked_order(setup):
  method, batch, params = setup
  consts = method.consts()
  jb = jax.tree.map(jnp.asarray, batch)
  pred, target = method.forward(params, consts, jb, None, False)
  assert pred.shape == (2, 1 + 16, 512) and target.shape == pred.shape
  np.testing.assert_allclose(np.linalg.norm(np.asarray(pred), axis=-1), 1.0, rtol=1e-5)
  tokens = np.asarray(
    method.teacher.apply_tokens(consts["teacher"], batch["image2"].astype(np.float32) / 255)
  )
  for i in range(2):
    order = np.concatenate(
      [[0], np.flatnonzero(~batch["mask"][i]) + 1, np.flatnonzero(batch["mask"][i]) + 1]
    )
    np.testing.assert_allclose(np.asarray(target[i]), tokens[i][order], rtol=1e-5, atol=1e-6)
  loss, metrics, _ = method.loss(params, {}, consts, jb, None, train=False)
  p, t = np.asarray(pred, np.float64), np.asarray(target, np.float64)
  cos = (p * t).sum(-1) / np.linalg.norm(p, axis=-1) / np.linalg.norm(t, axis=-1)
  np.testing.assert_allclose(float(loss), np.mean(1 - cos), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["cos_masked"]), cos[:, 11:].mean(), rtol=1e-4)


def test_xavier_init_and_encoder_params(setup):
  method, _, params = setup
  k = np.asarray(params["backbone"]["blocks_0"]["attn"]["qkv"]["kernel"])
  bound = np.sqrt(6.0 / (k.shape[0] + k.shape[1]))
  assert np.abs(k).max() <= bound and abs(k.std() - bound / np.sqrt(3)) < 0.1 * bound
  assert not np.any(np.asarray(params["regressor_0"]["cross_attn"]["proj"]["bias"]))
  assert "pos_embed" not in params["backbone"]  # fixed sin-cos, not a parameter
  assert set(method.encoder_params(params)) >= {"patch_embed", "cls_token", "norm"}


def test_recipe_per_size_and_errors():
  want = {
    "t": (30, 1, 96, 12),
    "s": (49, 1, 384, 12),
    "b": (98, 4, 768, 12),
    "l": (118, 4, 1024, 16),
  }
  for v, (masked, depth, width, heads) in want.items():
    c = config_lib.load_config(f"caev2_vit{v}")
    m = c.method
    assert (m.num_masked, m.regressor_depth, m.regressor_dim, m.regressor_heads) == (
      masked,
      depth,
      width,
      heads,
    ), v
  assert config_lib.load_config("caev2_vitt").model.heads == 12
  assert config_lib.load_config("caev2_vitl").data.second_image_size == 196
  c = config_lib.load_config("caev2_vitb")
  assert tuple(c.data.crop_scale) == (0.4, 1.0) and c.optim.clip_grad_norm == 3.0
  with pytest.raises(ValueError, match=r"config\.teacher\.path is empty"):
    methods.build(c)
  with pytest.raises(ValueError, match="grid mismatch"):
    methods.build(_config(**{"data.second_image_size": 32}))


def test_scanned_rematerialised_encoder_gives_the_same_loss(setup):
  """model.scan_layers / model.remat act on the encoder's blocks (the regressor stays
  unrolled): the same weights, stacked, give the same loss."""
  method, batch, params = setup
  jb = jax.tree.map(jnp.asarray, batch)
  ref = method.loss(params, {}, method.consts(), jb, None, train=False)[0]
  scanned = methods.build(_config(**{"model.scan_layers": True, "model.remat": True}))
  stacked = dict(params, backbone=convert.stack_layers(params["backbone"]))
  shapes = nn.unbox(jax.eval_shape(scanned.init, jax.random.PRNGKey(0), jb))["params"]
  assert jax.tree.structure(shapes) == jax.tree.structure(stacked)
  got = scanned.loss(stacked, {}, scanned.consts(), jb, None, train=False)[0]
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)
