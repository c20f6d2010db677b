"""CCViT fidelity (Cakeyan/CCViT_Public): corruption, pixel targets, loss positions,
pixel-block wiring, the codebook fingerprint."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mim_jax import config_lib
from mim_jax import methods
from mim_jax.methods import common
from mim_jax.models import vit
from mim_jax.tokenizers import centroids as centroid_lib

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
PATCH, SIZE, K = 4, 16, 32


def _config(tok_path):
  c = config_lib.load_config("ccvit_vitb")
  c.data.source, c.data.image_size, c.data.second_image_size = "embedded", SIZE, SIZE
  c.model.variant, c.model.width, c.model.depth, c.model.heads = f"T/{PATCH}", 32, 3, 2
  c.method.num_masked, c.method.num_replaced, c.method.min_block = 6, 3, 2
  c.method.early_layers = 2
  c.tokenizer.path = tok_path
  return c


@pytest.fixture(scope="module")
def method(tmp_path_factory):
  rng = np.random.default_rng(0)
  path = str(tmp_path_factory.mktemp("tok") / "centroids")
  centroid_lib.CentroidTokenizer(
    rng.random((K, 3 * PATCH * PATCH), np.float32), patch_size=PATCH
  ).save(path)
  return methods.build(_config(path), workdir=None, source=None)


def _batch(method, b=4, seed=0):
  rng = np.random.default_rng(seed)
  img = rng.integers(0, 256, (b, SIZE, SIZE, 3), dtype=np.uint8)
  img2 = rng.integers(0, 256, (b, SIZE, SIZE, 3), dtype=np.uint8)
  exs = [method.prepare({}, np.random.default_rng(seed * 100 + i)) for i in range(b)]
  return {
    "image": img,
    "image2": img2,
    "mask": np.stack([e["mask"] for e in exs]),
    "replaced": np.stack([e["replaced"] for e in exs]),
  }


def _patches_cyx(images01, p):
  """Independent (c, y, x) flattening with explicit loops."""
  b, h, w, c = images01.shape
  out = np.zeros((b, (h // p) * (w // p), c * p * p), np.float32)
  for i in range(b):
    for gy in range(h // p):
      for gx in range(w // p):
        vec = []
        for ch in range(c):
          for y in range(p):
            for x in range(p):
              vec.append(images01[i, gy * p + y, gx * p + x, ch])
        out[i, gy * (w // p) + gx] = vec
  return out


def test_prepare_counts_and_disjointness(method):
  n = (SIZE // PATCH) ** 2
  for seed in range(200):
    ex = method.prepare({}, np.random.default_rng(seed))
    assert ex["mask"].shape == (n,) and ex["mask"].sum() == 6
    assert ex["replaced"].sum() == 3
    assert not np.any(ex["mask"] & ex["replaced"])


def test_replaced_patches_take_their_own_centroid_before_normalisation(method):
  batch = _batch(method)
  cents = np.asarray(method.tokenizer.centroids)
  select, tokens, student, _ = method._corrupt(jax.tree.map(jnp.asarray, batch), jnp.asarray(cents))
  p2 = _patches_cyx(batch["image2"].astype(np.float32) / 255, PATCH)
  ref_tokens = np.argmin(((p2[:, :, None, :] - cents[None, None]) ** 2).sum(-1), -1)
  # Tokens come only at the masked ∪ replaced positions, in raster order.
  for i in range(select.shape[0]):
    expected = np.flatnonzero(batch["mask"][i] | batch["replaced"][i])
    np.testing.assert_array_equal(np.asarray(select[i]), expected)
    np.testing.assert_array_equal(np.asarray(tokens[i]), ref_tokens[i, expected])
  # Undo the normalisation and compare patch by patch.
  pixels = np.asarray(student) * IMAGENET_STD + IMAGENET_MEAN
  got = _patches_cyx(pixels, PATCH)
  orig = _patches_cyx(batch["image"].astype(np.float32) / 255, PATCH)
  rep = batch["replaced"]
  np.testing.assert_allclose(got[rep], cents[ref_tokens[rep]], atol=1e-5)
  np.testing.assert_allclose(got[~rep], orig[~rep], atol=1e-5)
  # The student is normalised with ImageNet statistics after replacing.
  np.testing.assert_allclose(
    np.asarray(student)[0, 0, 0], (pixels[0, 0, 0] - IMAGENET_MEAN) / IMAGENET_STD, atol=1e-5
  )


def test_pixel_targets_are_cyx_patches_with_unbiased_variance(method):
  batch = _batch(method)
  params = nn.unbox(method.init(jax.random.PRNGKey(0), batch))["params"]
  _, _, targets, pixel_targets, select = method._forward(
    params, jax.tree.map(jnp.asarray, batch), method.consts(), None, False
  )
  p2 = _patches_cyx(batch["image2"].astype(np.float32) / 255, PATCH)
  sel = np.take_along_axis(p2, np.asarray(select)[..., None], axis=1)
  mean = sel.mean(-1, keepdims=True)
  var = ((sel - mean) ** 2).sum(-1, keepdims=True) / (sel.shape[-1] - 1)
  np.testing.assert_allclose(
    np.asarray(pixel_targets), (sel - mean) / np.sqrt(var + 1e-6), rtol=1e-4, atol=1e-4
  )
  # Selected positions are exactly masked ∪ replaced, in ascending order.
  for i in range(select.shape[0]):
    expected = np.flatnonzero(batch["mask"][i] | batch["replaced"][i])
    np.testing.assert_array_equal(np.asarray(select[i]), expected)
  assert targets.shape == select.shape


def test_losses_only_see_masked_and_replaced_positions(method):
  batch = _batch(method)
  params = nn.unbox(method.init(jax.random.PRNGKey(0), batch))["params"]
  consts = method.consts()
  loss = lambda b: method.loss(params, {}, consts, jax.tree.map(jnp.asarray, b), None, train=False)[
    1
  ]
  base = loss(batch)
  # Change view 2 (targets only) at a position that is neither masked nor replaced.
  keep = ~(batch["mask"][0] | batch["replaced"][0])
  pos = int(np.flatnonzero(keep)[0])
  gy, gx = divmod(pos, SIZE // PATCH)
  other = dict(batch, image2=batch["image2"].copy())
  other["image2"][0, gy * PATCH : (gy + 1) * PATCH, gx * PATCH : (gx + 1) * PATCH] = (
    255 - other["image2"][0, gy * PATCH : (gy + 1) * PATCH, gx * PATCH : (gx + 1) * PATCH]
  )
  changed = loss(other)
  for k in ("loss_token", "loss_pixel"):
    np.testing.assert_allclose(changed[k], base[k], rtol=1e-6)
  # ... whereas a masked position's target does move the losses.
  pos = int(np.flatnonzero(batch["mask"][0])[0])
  gy, gx = divmod(pos, SIZE // PATCH)
  other = dict(batch, image2=batch["image2"].copy())
  other["image2"][0, gy * PATCH : (gy + 1) * PATCH, gx * PATCH : (gx + 1) * PATCH] = 0
  changed = loss(other)
  assert abs(float(changed["loss_pixel"]) - float(base["loss_pixel"])) > 1e-4


def test_token_loss_is_plain_cross_entropy_at_selected_positions(method):
  batch = _batch(method)
  params = nn.unbox(method.init(jax.random.PRNGKey(1), batch))["params"]
  b = jax.tree.map(jnp.asarray, batch)
  logits, pixels, targets, pixel_targets, _ = method._forward(
    params, b, method.consts(), None, False
  )
  m = method.loss(params, {}, method.consts(), b, None, train=False)[1]
  lg = np.asarray(logits, np.float64)
  lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
  ce = (lse - np.take_along_axis(lg, np.asarray(targets)[..., None], -1)[..., 0]).mean()
  np.testing.assert_allclose(float(m["loss_token"]), ce, rtol=1e-5)
  mse = ((np.asarray(pixels) - np.asarray(pixel_targets)) ** 2).mean()
  np.testing.assert_allclose(float(m["loss_pixel"]), mse, rtol=1e-5)
  np.testing.assert_allclose(float(m["loss"]), ce + mse, rtol=1e-5)


def test_pixel_block_reads_final_cls_and_layer_l_patches(method):
  batch = _batch(method)
  variables = nn.unbox(method.init(jax.random.PRNGKey(2), batch))
  b = jax.tree.map(jnp.asarray, batch)
  _, _, student, _ = method._corrupt(b, method.consts()["centroids"])
  seen = {}

  def spy(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and context.module.name == "pixel_block_0":
      seen["input"] = args[0]
    return next_fun(*args, **kwargs)

  select = common.selected_positions(b["mask"] | b["replaced"], method.num_selected)
  with nn.intercept_methods(spy):
    method.model.apply(variables, student, b["mask"], select)
  backbone = vit.VisionTransformer(
    **method.vit_kw, use_mask_token=True, rel_pos="shared", weight_init="beit"
  )
  out = backbone.apply(
    {"params": variables["params"]["backbone"]}, student, mask=b["mask"], return_layers=(2,)
  )
  # The model's last block computes the cls and the selected tokens alone (outputs_at): the
  # same value, up to the products' summation order.
  np.testing.assert_allclose(seen["input"][:, 0], out["last"][:, 0], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(seen["input"][:, 1:], out["layers"][2][:, 1:], rtol=1e-6)
  assert not np.allclose(out["layers"][2][:, 1:], out["last"][:, 1:])


def test_pixel_block_keeps_pytorch_default_init_with_depth_rescale(method):
  params = nn.unbox(method.init(jax.random.PRNGKey(3), _batch(method)))["params"]
  d = method.vit_kw["embed_dim"]
  blk = params["pixel_block_0"]
  bound = 1 / np.sqrt(d)
  fc1 = np.asarray(blk["mlp"]["fc1"]["kernel"])
  assert np.abs(fc1).max() <= bound and np.abs(fc1).max() > 0.8 * bound  # uniform, not N(.02)
  proj = np.asarray(blk["attn"]["proj"]["kernel"])
  layer_id = method.config.method.early_layers + 1
  assert np.abs(proj).max() <= bound / np.sqrt(2 * layer_id) + 1e-7
  assert np.abs(proj).max() > 0.8 * bound / np.sqrt(2 * layer_id)
  # The backbone and heads use the truncated normal (|w| <= 0.02).
  assert np.abs(np.asarray(params["lm_head"]["kernel"])).max() <= 0.02 + 1e-7
  assert np.abs(np.asarray(params["pixel_head"]["kernel"])).max() <= 0.02 + 1e-7
  # Own LayerNorm and 3*p*p output for the pixel block, vocab-sized LM head.
  assert params["pixel_head"]["kernel"].shape == (d, 3 * PATCH * PATCH)
  assert params["lm_head"]["kernel"].shape == (d, K)
  assert "pixel_norm" in params


def test_training_lowers_the_loss(method):
  """A few optimizer steps on one batch must lower both terms (it can learn)."""
  batch = jax.tree.map(jnp.asarray, _batch(method, b=8))
  params = nn.unbox(method.init(jax.random.PRNGKey(0), batch))["params"]
  consts = method.consts()
  tx = optax.adam(1e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt):
    (l, m), g = jax.value_and_grad(
      lambda p: method.loss(p, {}, consts, batch, None, train=False)[:2], has_aux=True
    )(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt, m

  first = None
  for _ in range(30):
    params, opt, m = step(params, opt)
    first = first or {k: float(v) for k, v in m.items()}
  assert float(m["loss_token"]) < first["loss_token"] - 0.5
  assert float(m["loss_pixel"]) < first["loss_pixel"]


def test_scanned_backbone_gives_the_same_losses(method, tmp_path):
  """config.model.scan_layers (nn.scan over blocks) is a layout change, not a new model."""
  from mim_jax.models import convert

  batch = jax.tree.map(jnp.asarray, _batch(method))
  params = nn.unbox(method.init(jax.random.PRNGKey(4), batch))["params"]
  config = method.config.copy_and_resolve_references()
  config.model.scan_layers = True
  scanned = methods.build(config, workdir=None, source=None)
  scanned_params = dict(params, backbone=convert.stack_layers(params["backbone"]))
  ref = method.loss(params, {}, method.consts(), batch, None, train=False)[1]
  got = scanned.loss(scanned_params, {}, scanned.consts(), batch, None, train=False)[1]
  for k in ("loss_token", "loss_pixel"):
    np.testing.assert_allclose(float(got[k]), float(ref[k]), rtol=1e-5)


def test_frozen_fingerprint_of_the_codebook(method, tmp_path):
  """config.tokenizer.path: its files; a codebook kept in the workdir: its content, so a
  moved workdir still resumes and another codebook does not."""
  path = method.config.tokenizer.path
  fp = method.frozen_fingerprint()
  assert fp == {
    "tokenizer.path": f"{os.path.abspath(path)} sha256:"
    + fp["tokenizer.path"].rsplit("sha256:", 1)[1]
  }
  tok = centroid_lib.CentroidTokenizer.load(path)
  built = {}
  for name in ("a", "b"):
    workdir = tmp_path / name
    workdir.mkdir()
    tok.save(str(workdir / "centroids"))
    built[name] = methods.build(_config(""), workdir=str(workdir), source=None)
  assert built["a"].frozen_fingerprint() == built["b"].frozen_fingerprint()
  assert "built in the workdir" in built["a"].frozen_fingerprint()["tokenizer.path"]
  other = centroid_lib.CentroidTokenizer(tok.centroids[::-1].copy(), patch_size=PATCH)
  other.save(str(tmp_path / "a" / "centroids"))
  moved = methods.build(_config(""), workdir=str(tmp_path / "a"), source=None)
  assert moved.frozen_fingerprint() != built["b"].frozen_fingerprint()
