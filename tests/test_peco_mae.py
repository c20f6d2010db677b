"""PeCo-MAE: the encoder sees only visible patches (masked pixels cannot change the
predictions), CE at the masked positions only, the decoder restores raster order."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import config_lib
from mim_jax import methods
from mim_jax.tokenizers import centroids as centroid_lib

SIZE = 16


def _method(tmp_path):
  c = config_lib.load_config("peco_mae_vitb", "runlocal")
  c.data.image_size = c.data.second_image_size = SIZE
  c.model.variant, c.model.width, c.model.depth, c.model.heads = "T/4", 32, 2, 2
  c.method.update(num_masked=12, decoder_dim=16, decoder_depth=1, decoder_heads=2)
  path = str(tmp_path / "centroids")
  centroid_lib.CentroidTokenizer(
    np.random.default_rng(0).random((10, 48)).astype(np.float32), 4, metadata={"image_size": SIZE}
  ).save(path)
  c.tokenizer.update(kind="centroids", path=path, build_if_missing=False)
  return methods.build(c)


def test_masked_pixels_do_not_matter_and_the_loss_is_on_masked_tokens(tmp_path):
  method = _method(tmp_path)
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
  ex = [
    method.prepare({"image": img[i], "image2": img[i].copy()}, np.random.default_rng(i))
    for i in range(2)
  ]
  batch = {k: np.stack([e[k] for e in ex]) for k in ex[0]}
  assert batch["mask"].sum(1).tolist() == [12, 12]
  params = nn.unbox(method.init(jax.random.PRNGKey(0), jax.tree.map(jnp.asarray, batch)))["params"]
  assert {"backbone", "decoder_embed", "mask_token", "decoder_norm", "decoder_pred"} <= set(params)
  assert "gamma_1" not in params["backbone"]["blocks_0"]  # MAE: no layer scale
  logits, targets = method.forward(
    params, method.consts(), jax.tree.map(jnp.asarray, batch), None, False
  )
  assert logits.shape == (2, 12, 10)
  changed = dict(batch, image=batch["image"].copy())
  for i in range(2):
    for pos in np.flatnonzero(batch["mask"][i]):
      r, c = divmod(int(pos), 4)
      changed["image"][i, r * 4 : (r + 1) * 4, c * 4 : (c + 1) * 4] = 0
  logits2, _ = method.forward(
    params, method.consts(), jax.tree.map(jnp.asarray, changed), None, False
  )
  np.testing.assert_allclose(np.asarray(logits), np.asarray(logits2), rtol=1e-6, atol=1e-6)
  tokens = np.asarray(method.targets(method.consts(), jax.tree.map(jnp.asarray, batch)))
  for i in range(2):
    np.testing.assert_array_equal(
      np.asarray(targets[i]), tokens[i][np.flatnonzero(batch["mask"][i])]
    )
  loss, _, _ = method.loss(
    params, {}, method.consts(), jax.tree.map(jnp.asarray, batch), None, train=False
  )
  z = np.asarray(logits, np.float64)
  logp = z - z.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  ref = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1).mean()
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_recipe():
  c = config_lib.load_config("peco_mae_vitb")
  assert (c.method.num_masked, c.method.decoder_dim, c.method.decoder_depth) == (147, 512, 8)
  assert c.optim.lr == 1.5e-4 * 4096 / 256 and (c.optim.b1, c.optim.b2) == (0.9, 0.95)
  assert c.tokenizer.kind == "peco"
