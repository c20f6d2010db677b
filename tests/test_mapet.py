"""MaPeT (aimagelab/MaPeT): the two-stream masks against a NumPy re-derivation of the
official construction (utils/models.py), reachability through all layers (no query ever
reaches its own token's content), the combined-sequence model against an explicit two-stream
forward with shared weights, the MIM / PIM baselines, scanned / rematerialised blocks, the
recipe and the missing-token-cache error."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import config_lib
from mim_jax import methods
from mim_jax import two_stream
from mim_jax.methods import mapet
from mim_jax.models import convert
from mim_jax.models import vit
from mim_jax.tokenizers import centroids as centroid_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _perms(b, n, seed):
  rng = np.random.default_rng(seed)
  return np.stack([np.concatenate([[0], rng.permutation(n) + 1]) for _ in range(b)]).astype(
    np.int32
  )


def _reference_masks(perm, least):
  """`attention_mask_full_mapet_1` of aimagelab/MaPeT:utils/models.py re-derived with NumPy,
  one sample, 1 = may attend."""
  t = len(perm)
  pos = np.empty(t, int)
  pos[perm] = np.arange(t)
  s = (pos[None, :] < pos[:, None]).astype(int)  # s[t, k] = k precedes t
  context = pos < least
  predicted = np.flatnonzero(~context)  # ascending token index
  s_orig = s.copy()
  s[:, context] = 1  # 1. the context is visible
  content = np.minimum(s + np.eye(t, dtype=int), 1)  # 2.
  q_content = s[predicted]  # 3. content columns
  q_mpos = 1 - s_orig[np.ix_(predicted, predicted)]  # 3. own + later M_pos
  h_mpos = 1 - np.minimum(s_orig + np.eye(t, dtype=int), 1)[:, predicted]  # 4.
  mpos_rows = np.concatenate(
    [
      np.tile(context.astype(int), (len(predicted), 1)),
      np.ones((len(predicted), len(predicted)), int),
    ],
    axis=1,
  )  # 5.
  mask_h = np.concatenate([np.concatenate([content, h_mpos], 1), mpos_rows], 0)
  mask_q = np.concatenate([q_content, q_mpos], 1)
  return mask_h.astype(bool), mask_q.astype(bool), predicted


@pytest.mark.parametrize("least", [1, 3, 9])
def test_masks_match_the_reference_construction(least):
  perms = _perms(4, 11, seed=least)
  mask, pred = two_stream.two_stream_masks(jnp.asarray(perms), least)
  t, p = 12, 12 - least
  assert mask.shape == (4, t + 2 * p, t + 2 * p)
  for b in range(4):
    mask_h, mask_q, predicted = _reference_masks(perms[b], least)
    np.testing.assert_array_equal(np.asarray(pred[b]), predicted)
    np.testing.assert_array_equal(np.asarray(mask[b, : t + p, : t + p]), mask_h)
    np.testing.assert_array_equal(np.asarray(mask[b, t + p :, : t + p]), mask_q)
    assert not np.asarray(mask[b, :, t + p :]).any()  # nobody attends to the queries


def test_toy_permutation_of_the_reference():
  # [1,3,5,4,6,2] (1-based values) with least = 3: tokens 0, 2, 4 are the context.
  perm = jnp.asarray([[0, 2, 4, 3, 5, 1]], jnp.int32)
  mask, pred = two_stream.two_stream_masks(perm, 3)
  np.testing.assert_array_equal(np.asarray(pred[0]), [1, 3, 5])
  m = np.asarray(mask[0])
  t, p = 6, 3
  # The query of token 3 (placed 3rd of the predicted ones): sees content of 0, 2, 4 only.
  q3 = m[t + p + 1]
  np.testing.assert_array_equal(np.flatnonzero(q3[:t]), [0, 2, 4])
  # ... and the mask tokens of itself (3) and of the tokens after it (5, 1): all three.
  np.testing.assert_array_equal(np.flatnonzero(q3[t : t + p]), [0, 1, 2])
  # Token 1 (last in the permutation) sees every content token and no mask token.
  np.testing.assert_array_equal(np.flatnonzero(m[1, :t]), range(6))
  assert not m[1, t:].any()


@pytest.mark.parametrize("with_mask_tokens", [True, False])
def test_no_query_reaches_its_own_content_at_any_depth(with_mask_tokens):
  least, n, depth = 5, 24, 6
  perms = _perms(8, n, seed=7)
  mask, pred = two_stream.two_stream_masks(
    jnp.asarray(perms), least, with_mask_tokens=with_mask_tokens
  )
  mask, pred = np.asarray(mask), np.asarray(pred)
  t, p = n + 1, n + 1 - least
  for b in range(8):
    length = mask.shape[1]
    # reach[r, c]: the representation in row r depends on the content of real token c.
    reach = np.zeros((length, t), bool)
    reach[np.arange(t), np.arange(t)] = True
    for _ in range(depth):
      reach = reach | (mask[b].astype(int) @ reach.astype(int) > 0)  # residual + attention
    queries = reach[length - p :]
    assert not queries[np.arange(p), pred[b]].any()
    # ... yet each query does see the content of every token placed before it.
    pos = np.argsort(perms[b])
    for i, tok in enumerate(pred[b]):
      assert queries[i, pos < pos[tok]].all()
    if with_mask_tokens:
      context = pos < least
      assert mask[b, :t][context][:, t : t + p].all()  # context tokens see all mask tokens


# ----------------------------------------------------------------------------- model
KW = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, layer_scale_init=0.1)


def _random_params(model, **inputs):
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **inputs)))["params"]
  rs = np.random.RandomState(1)

  def draw(path, s):
    if path[-1].key == "scale":
      return (1 + 0.2 * rs.randn(*s.shape)).astype(np.float32)
    return (0.2 * rs.randn(*s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _explicit_two_stream(params, images, perm, least):
  """The official forward (`DoubleAttentionPositionalAugmented` in aimagelab/MaPeT:
  models/mapet/mapet.py): separate h and g, q/k/v from h, q_g from g, shared weights."""
  pr = params
  mask, pred = two_stream.two_stream_masks(perm, least)
  t = perm.shape[1]
  p = t - least
  mask_h, mask_q = mask[:, : t + p, : t + p], mask[:, t + p :, : t + p]
  x = jax.lax.conv_general_dilated(
    images, pr["patch_embed"]["kernel"], (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  x = x + pr["patch_embed"]["bias"]
  b = x.shape[0]
  x = x.reshape(b, -1, 32)
  x = jnp.concatenate([jnp.broadcast_to(pr["cls_token"], (b, 1, 32)), x], 1) + pr["pos_embed"]
  mpos = pr["mask_positional_token"] + pr["pos_embed"][0][pred]
  h = jnp.concatenate([x, mpos], 1)
  g = mpos

  def ln(v, prm):
    mu = v.mean(-1, keepdims=True)
    var = ((v - mu) ** 2).mean(-1, keepdims=True)
    return (v - mu) / jnp.sqrt(var + 1e-6) * prm["scale"] + prm["bias"]

  def heads(v):
    return v.reshape(b, -1, 2, 16).transpose(0, 2, 1, 3)

  for i in range(2):
    blk = pr[f"blocks_{i}"]
    a = blk["attn"]
    w = a["qkv"]["kernel"]
    bias = jnp.concatenate([a["q_bias"], a["k_bias"], a["v_bias"]])
    qkv_h = ln(h, blk["norm1"]) @ w + bias
    q_h, k, v = jnp.split(qkv_h, 3, -1)
    q_g = (ln(g, blk["norm1"]) @ w + bias)[..., :32]

    def attend(q, m, k=k, v=v, a=a):
      logits = heads(q) @ heads(k).transpose(0, 1, 3, 2) / 4.0
      logits = jnp.where(m[:, None], logits, -1e30)
      out = jax.nn.softmax(logits, -1) @ heads(v)
      return out.transpose(0, 2, 1, 3).reshape(b, -1, 32) @ a["proj"]["kernel"] + a["proj"]["bias"]

    h = h + blk["gamma_1"] * attend(q_h, mask_h)
    g = g + blk["gamma_1"] * attend(q_g, mask_q)

    def mlp(z, blk=blk):
      hidden = ln(z, blk["norm2"]) @ blk["mlp"]["fc1"]["kernel"] + blk["mlp"]["fc1"]["bias"]
      return (
        jax.nn.gelu(hidden, approximate=False) @ blk["mlp"]["fc2"]["kernel"]
        + blk["mlp"]["fc2"]["bias"]
      )

    h = h + blk["gamma_2"] * mlp(h)
    g = g + blk["gamma_2"] * mlp(g)
  return ln(g, pr["norm"]) @ pr["decoder"]["kernel"] + pr["decoder"]["bias"]


def test_combined_sequence_equals_the_explicit_two_stream_forward():
  least = 6
  perm = jnp.asarray(_perms(2, 16, seed=3))
  mask, pred = two_stream.two_stream_masks(perm, least)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
  model = mapet.MaPeTModel(KW, vocab_size=10, mode="mapet")
  params = _random_params(model, images=images, attn_mask=mask, pred=pred)
  # One set of weights for both streams: the backbone's names plus M_pos and the decoder.
  assert set(params) == {
    "patch_embed",
    "cls_token",
    "pos_embed",
    "blocks_0",
    "blocks_1",
    "norm",
    "mask_positional_token",
    "decoder",
  }
  assert set(params["blocks_0"]["attn"]) == {"qkv", "q_bias", "k_bias", "v_bias", "proj"}
  ours = model.apply({"params": params}, images, attn_mask=mask, pred=pred)
  ref = _explicit_two_stream(params, images, perm, least)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=2e-4, atol=2e-4)
  # The encoder (query-stream parts dropped) loads into mim_jax's ViT for evaluation.
  enc = mapet.MaPeT.encoder_params(params)
  vit.VisionTransformer(
    **KW, abs_pos="learned", rel_pos="none", k_bias=True, weight_init="timm"
  ).apply({"params": enc}, images)


def _codebook(tmp_path):
  tok = centroid_lib.CentroidTokenizer(
    np.random.default_rng(0).random((12, 48)).astype(np.float32), 4, metadata={"image_size": 16}
  )
  path = str(tmp_path / "centroids")
  tok.save(path)
  return path


@pytest.mark.parametrize("mode", ["mapet", "pim", "mim"])
def test_modes_train_on_the_right_positions(tmp_path, mode):
  c = config_lib.load_config("mapet_vitb", f"runlocal,mode={mode}")
  c.data.image_size = c.data.second_image_size = 16
  c.model.variant, c.model.width, c.model.depth, c.model.heads = "T/4", 32, 2, 2
  c.method.least_number, c.method.num_masked = 6, 5
  c.method.layout = "token"  # targets in token-index order (the permuted layout: below)
  c.tokenizer.update(path=_codebook(tmp_path), build_if_missing=False)
  method = methods.build(c)
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  ex = [
    method.prepare({"image": img[i], "image2": img[i]}, np.random.default_rng(i)) for i in range(2)
  ]
  batch = {k: jnp.asarray(np.stack([e[k] for e in ex])) for k in ex[0]}
  if mode == "mim":
    assert batch["mask"].sum() == 10 and "perm" not in batch
  else:
    assert sorted(np.asarray(batch["perm"][0])) == list(range(17))
    assert int(batch["perm"][0, 0]) == 0
  params = nn.unbox(method.init(jax.random.PRNGKey(0), batch))["params"]
  assert ("mask_positional_token" in params) == (mode != "mim")
  assert ("mask_token" in params) == (mode == "mim")
  logits, targets = method.forward(params, method.consts(), batch, None, False)
  assert logits.shape == (2, 5 if mode == "mim" else 11, 12)
  loss, metrics, _ = method.loss(params, {}, method.consts(), batch, None, train=False)
  assert np.isfinite(float(loss)) and set(metrics) == {"loss", "token_acc"}
  # Targets are the tokens of the predicted (or masked) patches, in ascending order.
  tokens = np.asarray(method.targets(method.consts(), batch))
  if mode == "mim":
    idx = [np.flatnonzero(np.asarray(batch["mask"][i])) for i in range(2)]
  else:
    pos = np.argsort(np.asarray(batch["perm"]), axis=1)
    idx = [np.flatnonzero(pos[i] >= 6) - 1 for i in range(2)]
  np.testing.assert_array_equal(
    np.asarray(targets), np.stack([tokens[i][idx[i]] for i in range(2)])
  )


def test_recipe_and_the_missing_token_cache_error(tmp_path):
  c = config_lib.load_config("mapet_vitb")
  assert (c.method.least_number, c.tokenizer.kind, c.batch_size) == (50, "kclip", 2048)
  # drop_path 0.1: aimagelab/MaPeT:config/standard-config-pre-train-imagenet.yaml line 37.
  for name in ("mapet_vitt", "mapet_vits", "mapet_vitb"):
    assert config_lib.load_config(name).model.drop_path_rate == 0.1, name
  assert tuple(c.data.crop_scale) == (1.0, 1.0) and not c.data.hflip
  assert c.method.layout == "permuted"  # the faster of the two (BENCHMARKS.md §6)
  assert config_lib.load_config("mapet_vitb", "least=98").method.least_number == 98
  assert config_lib.load_config("mapet_vitt").model.variant == "T/16"
  assert config_lib.load_config("mapet_vits").model.variant == "S/16"
  assert config_lib.load_config("mapet_vitb", "runlocal").method.least_number == 16
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPATH=ROOT)
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "mim_jax.train",
      "--config=configs/mapet_vitb.py",
      f"--workdir={tmp_path / 'w'}",
    ],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert r.returncode == 2
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "config.tokenizer.cache" in errors[0], r.stderr[-2000:]
  assert "mim_jax.tokenize" in errors[0] and "kclip" in errors[0]
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("mode", ["mapet", "pim"])
def test_permuted_layout_gives_the_same_loss(tmp_path, mode):
  c = config_lib.load_config("mapet_vitb", f"runlocal,mode={mode}")
  c.data.image_size = c.data.second_image_size = 16
  c.model.variant, c.model.width, c.model.depth, c.model.heads = "T/4", 32, 2, 2
  c.method.least_number = 6
  c.method.layout = "token"
  c.tokenizer.update(path=_codebook(tmp_path), build_if_missing=False)
  token = methods.build(c)
  c.method.layout = "permuted"
  permuted = methods.build(c)
  rng = np.random.default_rng(1)
  img = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
  ex = [
    token.prepare({"image": img[i], "image2": img[i]}, np.random.default_rng(i)) for i in range(3)
  ]
  batch = {k: jnp.asarray(np.stack([e[k] for e in ex])) for k in ex[0]}
  params = _random_params(
    token.model,
    **{k: v for k, v in dict(images=jnp.zeros((3, 16, 16, 3)), **token._inputs(batch)[0]).items()},
  )  # pylint: disable=protected-access
  a, _, _ = token.loss(params, {}, token.consts(), batch, None, train=False)
  b, _, _ = permuted.loss(params, {}, permuted.consts(), batch, None, train=False)
  np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
  # The static mask is the per-sample one with rows and columns put in permutation order.
  mask, pred = two_stream.two_stream_masks(batch["perm"], 6, with_mask_tokens=mode == "mapet")
  static = two_stream.permuted_layout_mask(17, 6, with_mask_tokens=mode == "mapet")
  for i in range(3):
    perm = np.asarray(batch["perm"][i])
    rank = np.searchsorted(np.asarray(pred[i]), perm[6:])
    idx = np.concatenate([perm, 17 + rank] + ([17 + 11 + rank] if mode == "mapet" else []))
    np.testing.assert_array_equal(np.asarray(mask[i])[np.ix_(idx, idx)], static)


@pytest.mark.parametrize(
  "mode,layout", [("mapet", "permuted"), ("mapet", "token"), ("mim", "token")]
)
def test_scanned_and_rematerialised_blocks_give_the_same_loss(tmp_path, mode, layout):
  """model.scan_layers / model.remat change the layout and the backward pass, not the model:
  the unrolled weights stacked with convert.stack_layers give the same loss and gradients."""
  c = config_lib.load_config("mapet_vitb", f"runlocal,mode={mode}")
  c.data.image_size = c.data.second_image_size = 16
  c.model.variant, c.model.width, c.model.depth, c.model.heads = "T/4", 32, 3, 2
  c.method.least_number, c.method.num_masked, c.method.layout = 6, 5, layout
  c.tokenizer.update(path=_codebook(tmp_path), build_if_missing=False)
  plain = methods.build(c)
  rng = np.random.default_rng(2)
  img = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  ex = [
    plain.prepare({"image": img[i], "image2": img[i]}, np.random.default_rng(i)) for i in range(2)
  ]
  batch = {k: jnp.asarray(np.stack([e[k] for e in ex])) for k in ex[0]}
  params = _random_params(plain.model, images=jnp.zeros((2, 16, 16, 3)), **plain._inputs(batch)[0])  # pylint: disable=protected-access
  assert {"blocks_0", "blocks_1", "blocks_2"} <= set(params)

  def loss_and_grads(method, p):
    fn = lambda q: method.loss(q, {}, method.consts(), batch, None, train=False)[0]
    return jax.value_and_grad(fn)(p)

  ref, ref_grads = loss_and_grads(plain, params)
  for scan, remat in ((True, False), (True, True), (False, True)):
    c.model.scan_layers, c.model.remat = scan, remat
    method = methods.build(c)
    shapes = nn.unbox(jax.eval_shape(method.init, jax.random.PRNGKey(0), batch))["params"]
    assert ("blocks" in shapes) == scan and ("blocks_0" in shapes) == (not scan)
    layout_params = convert.stack_layers(params) if scan else params
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), shapes, layout_params)
    got, grads = loss_and_grads(method, layout_params)
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-5, err_msg=f"{scan} {remat}")
    if scan:
      grads = convert.unstack_layers(grads)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads
    )
  # A scanned checkpoint's encoder loads into the evaluation ViT once unstacked.
  enc = convert.unstack_layers(mapet.MaPeT.encoder_params(convert.stack_layers(params)))
  assert set(enc) == set(mapet.MaPeT.encoder_params(params))


def test_attention_with_kv_len_equals_masking_the_asking_tokens_columns():
  """The query stream gives no keys or values (vit.Attention kv_len): the same output as
  the one-sequence attention whose mask hides those columns, with the same parameters."""
  from mim_jax.models import vit  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 10, 32)), jnp.float32)
  mask = rng.random((2, 1, 10, 10)) < 0.7
  mask[..., 7:] = False  # nobody attends to the last 3 tokens
  mask[..., 0] = True  # every row sees something
  mask = jnp.asarray(mask)
  full = vit.Attention(32, 4, k_bias=True)
  params = full.init(jax.random.PRNGKey(1), x)
  params = jax.tree.map(lambda p: p + 0.1 * jnp.ones_like(p), params)  # non-zero biases
  want = full.apply(params, x, attn_mask=mask)
  got = vit.Attention(32, 4, k_bias=True, kv_len=7).apply(params, x, attn_mask=mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
