"""BEiT v2 (microsoft/unilm:beit2): the patch-aggregation head's inputs (layer-l patches +
the final cls), the shared final norm and LM head, the loss on masked positions only, targets
from a tokenizer online or from a token cache, and the recipe of configs/beitv2_vitb.py."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import config_lib
from mim_jax import methods
from mim_jax.methods import beitv2
from mim_jax.methods import common
from mim_jax.models import vit
from mim_jax.tokenizers import cache as cache_lib
from mim_jax.tokenizers import centroids as centroid_lib

SIZE, PATCH, K = 16, 4, 12
KW = dict(patch_size=PATCH, embed_dim=32, depth=3, num_heads=2, layer_scale_init=0.1)


def _model(shared=True):
  return beitv2.BEiTv2Model(KW, vocab_size=K, early_layers=2, head_layers=2, shared_lm_head=shared)


def _random_params(model, images, mask, select, seed=0):
  """Every weight drawn away from its init (zero tables, unit norms would hide wiring)."""
  shapes = nn.unbox(
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, mask, select))
  )["params"]
  rs = np.random.RandomState(seed)

  def draw(path, s):
    if path[-1].key == "scale":
      return (1 + 0.2 * rs.randn(*s.shape)).astype(np.float32)
    return (0.2 * rs.randn(*s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _inputs(b=2, seed=0):
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.normal(size=(b, SIZE, SIZE, 3)).astype(np.float32))
  mask = np.zeros((b, 16), bool)
  for i in range(b):
    mask[i, rng.permutation(16)[:6]] = True
  select = common.selected_positions(jnp.asarray(mask), 6)
  return images, jnp.asarray(mask), select


def test_aggregation_reads_layer_l_patches_and_final_cls_through_the_shared_head():
  model = _model()
  images, mask, select = _inputs()
  params = _random_params(model, images, mask, select)
  assert set(params) == {"backbone", "norm", "lm_head", "cls_pt_block_0", "cls_pt_block_1"}
  logits, agg = model.apply({"params": params}, images, mask, select)

  # Re-derivation from the parts: backbone (no final norm), its layer-2 output and final
  # cls, two blocks with the shared bias, then the one norm and the one lm_head.
  backbone = vit.VisionTransformer(
    **KW, use_mask_token=True, rel_pos="shared", abs_pos="none", final_norm=False
  )
  out = backbone.apply({"params": params["backbone"]}, images, mask=mask, return_layers=(2,))
  norm = nn.LayerNorm(epsilon=1e-6, use_fast_variance=False)
  head = nn.Dense(K)
  apply_head = lambda x: head.apply(
    {"params": params["lm_head"]}, norm.apply({"params": params["norm"]}, x)
  )
  take = lambda x: jnp.take_along_axis(x, select[..., None], axis=1)
  np.testing.assert_allclose(logits, apply_head(take(out["last"][:, 1:])), rtol=1e-4, atol=1e-4)
  x = jnp.concatenate([out["last"][:, :1], out["layers"][2][:, 1:]], axis=1)
  for i in range(2):
    blk = vit.Block(dim=32, num_heads=2, layer_scale_init=0.1)
    x = blk.apply({"params": params[f"cls_pt_block_{i}"]}, x, rel_pos_bias=out["rel_pos_bias"])
  np.testing.assert_allclose(agg, apply_head(take(x[:, 1:])), rtol=1e-4, atol=1e-4)

  # ... and not the layer-1 patches (a wiring test that could fail).
  x_wrong = jnp.concatenate(
    [
      out["last"][:, :1],
      out["layers"][2][:, 1:] * 0
      + backbone.apply({"params": params["backbone"]}, images, mask=mask, return_layers=(1,))[
        "layers"
      ][1][:, 1:],
    ],
    axis=1,
  )
  for i in range(2):
    x_wrong = vit.Block(dim=32, num_heads=2, layer_scale_init=0.1).apply(
      {"params": params[f"cls_pt_block_{i}"]}, x_wrong, rel_pos_bias=out["rel_pos_bias"]
    )
  assert np.abs(np.asarray(apply_head(take(x_wrong[:, 1:]))) - np.asarray(agg)).max() > 1e-3


def test_norm_and_lm_head_are_shared_unless_asked_otherwise():
  images, mask, select = _inputs()
  model = _model()
  params = _random_params(model, images, mask, select)
  base = model.apply({"params": params}, images, mask, select)
  for name in ("norm", "lm_head"):
    bumped = dict(params, **{name: jax.tree.map(lambda v: v + 0.3, params[name])})
    moved = model.apply({"params": bumped}, images, mask, select)
    for before, after in zip(base, moved):  # both branches move with the one module
      assert np.abs(np.asarray(after) - np.asarray(before)).max() > 1e-3, name
  own = _model(shared=False)
  own_params = _random_params(own, images, mask, select)
  assert {"cls_pt_norm", "cls_pt_lm_head"} <= set(own_params)
  bumped = dict(own_params, lm_head=jax.tree.map(lambda v: v + 0.3, own_params["lm_head"]))
  a, b = (
    own.apply({"params": own_params}, images, mask, select),
    own.apply({"params": bumped}, images, mask, select),
  )
  np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


def _codebook(tmp_path) -> str:
  rng = np.random.default_rng(0)
  tok = centroid_lib.CentroidTokenizer(
    rng.random((K, 3 * PATCH * PATCH)).astype(np.float32), PATCH, metadata={"image_size": SIZE}
  )
  path = str(tmp_path / "centroids")
  tok.save(path)
  return path


def _config(tmp_path, **over):
  c = config_lib.load_config("beitv2_vitb", "runlocal")
  c.data.image_size = c.data.second_image_size = SIZE
  c.model.variant, c.model.width, c.model.depth, c.model.heads = "T/4", 32, 3, 2
  c.method.num_masked, c.method.min_block, c.method.early_layers = 6, 2, 2
  c.tokenizer.update(kind="centroids", path=_codebook(tmp_path), build_if_missing=False)
  for k, v in over.items():
    node, *_ = [c]
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def _batch(method, seed=0, b=2):
  rng = np.random.default_rng(seed)
  img = rng.integers(0, 256, (b, SIZE, SIZE, 3), dtype=np.uint8)
  examples = [
    method.prepare({"image": img[i], "image2": img[i].copy()}, np.random.default_rng(seed + i))
    for i in range(b)
  ]
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def test_loss_is_cross_entropy_on_masked_positions_only(tmp_path):
  method = methods.build(_config(tmp_path))
  batch = _batch(method)
  variables = method.init(jax.random.PRNGKey(0), batch)
  params = nn.unbox(variables)["params"]
  consts = method.consts()
  loss, metrics, _ = method.loss(
    params, {}, consts, jax.tree.map(jnp.asarray, batch), None, train=False
  )
  np.testing.assert_allclose(
    float(loss), float(metrics["loss_main"] + metrics["loss_agg"]), rtol=1e-6
  )
  # Tokens of unmasked patches do not matter: change the tokenizer's view there only.
  p = PATCH
  changed = dict(batch, image2=batch["image2"].copy())
  for i in range(2):
    for pos in np.flatnonzero(~batch["mask"][i]):
      r, c = divmod(int(pos), SIZE // p)
      changed["image2"][i, r * p : (r + 1) * p, c * p : (c + 1) * p] = (
        255 - changed["image2"][i, r * p : (r + 1) * p, c * p : (c + 1) * p]
      )
  loss2, _, _ = method.loss(
    params, {}, consts, jax.tree.map(jnp.asarray, changed), None, train=False
  )
  assert float(loss2) == pytest.approx(float(loss), abs=1e-6)
  # ... while those of masked patches do.
  flipped = dict(batch, image2=255 - batch["image2"])
  loss3, _, _ = method.loss(
    params, {}, consts, jax.tree.map(jnp.asarray, flipped), None, train=False
  )
  assert abs(float(loss3) - float(loss)) > 1e-3
  # The reference: mean CE over the masked positions of each branch, in NumPy.
  logits, agg, targets = method.forward(
    params, consts, jax.tree.map(jnp.asarray, batch), None, False
  )

  def ce(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, np.asarray(targets)[..., None], -1).mean()

  np.testing.assert_allclose(float(metrics["loss_main"]), ce(logits), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss_agg"]), ce(agg), rtol=1e-5)
  assert method.encoder_params(params).keys() >= {"patch_embed", "blocks_0", "norm"}


def test_token_cache_targets_equal_online_targets(tmp_path):
  online = methods.build(_config(tmp_path))
  tok = online.targets.tokenizer
  images = np.random.default_rng(3).integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8)
  ids = np.asarray(tok.tokenize(images))
  d = str(tmp_path / "cache")
  cache_lib.write(
    d,
    num_examples=6,
    fingerprint=tok.fingerprint(),
    source_info={"source": "test", "split": "train", "length": 6},
    tokenize_chunk=lambda a, b: ids[a:b],
    chunk_size=4,
    log=lambda _: None,
  )
  cached = methods.build(
    _config(
      tmp_path,
      **{
        "tokenizer.cache": d,
        "data.crop_scale": (1.0, 1.0),
        "data.crop_ratio": (1.0, 1.0),
        "data.hflip": False,
      },
    )
  )
  assert not cached.targets.online and cached.consts() == {}

  class Source:
    def __len__(self):
      return 6

    def __getitem__(self, i):
      return {"image": images[i], "label": np.int32(0), "index": np.int64(i)}

  wrapped = cached.wrap_source(Source())
  ex = cached.prepare(dict(wrapped[4], image2=images[4]), np.random.default_rng(0))
  assert "image2" not in ex
  np.testing.assert_array_equal(ex["tokens"], ids[4])
  batch = {"image2": jnp.asarray(images[:2]), "tokens": jnp.asarray(ids[:2])}
  np.testing.assert_array_equal(
    np.asarray(cached.targets({}, batch)), np.asarray(online.targets(online.consts(), batch))
  )
  with pytest.raises(cache_lib.CacheMismatchError, match="crop_scale"):
    methods.build(_config(tmp_path, **{"tokenizer.cache": d}))


def test_config_recipe_and_errors(tmp_path):
  c = config_lib.load_config("beitv2_vitb")
  assert (c.method.num_masked, c.method.early_layers, c.method.head_layers) == (75, 9, 2)
  assert c.batch_size == 2048 and c.optim.lr == 1.5e-3 and c.optim.b2 == 0.98
  assert c.model.drop_path_rate == 0.0 and c.optim.clip_grad_norm == 3.0
  long = config_lib.load_config("beitv2_vitb", "epochs=1600")
  assert long.optim.b2 == 0.999 and long.model.drop_path_rate == 0.1
  large = config_lib.load_config("beitv2_vitl")
  assert (large.method.early_layers, large.model.layer_scale_init) == (21, 1e-5)
  with pytest.raises(ValueError, match=r"config\.tokenizer\.path is empty"):
    methods.build(c)
  bad = _config(tmp_path, **{"data.second_image_size": 32})
  with pytest.raises(ValueError, match="token grid|second_image_size"):
    methods.build(bad)
  with pytest.raises(ValueError, match="epochs"):
    config_lib.load_config("beitv2_vitb", "epochs=800")
  assert os.path.exists(_codebook(tmp_path) + ".npy")


def test_peco_mim_is_beit_style_without_aggregation(tmp_path):
  c = config_lib.load_config("peco_vitb")
  assert (c.method.name, c.method.head_layers, c.tokenizer.kind) == ("peco_mim", 0, "peco")
  assert c.batch_size == 2048 and tuple(c.data.crop_scale) == (0.08, 1.0)
  assert config_lib.load_config("peco_vitl").model.variant == "L/16"
  small = _config(
    tmp_path, **{"method.name": "peco_mim", "method.head_layers": 0, "method.early_layers": 0}
  )
  method = methods.build(small)
  batch = jax.tree.map(jnp.asarray, _batch(method))
  params = nn.unbox(method.init(jax.random.PRNGKey(0), batch))["params"]
  assert not any(k.startswith("cls_pt") for k in params)
  loss, metrics, _ = method.loss(params, {}, method.consts(), batch, None, train=False)
  assert "loss_agg" not in metrics
  np.testing.assert_allclose(float(loss), float(metrics["loss_main"]), rtol=1e-6)
  assert method.fingerprint()["method"] == "peco_mim"
