"""k-CLIP (`aimagelab/MaPeT:data/kmeans/`): tokens are the nearest L2 centroid of CLIP ResNet
layer-4 features, built end to end with the device-sharded k-means, saved, reloaded and used by
the token cache's Tokenizer face."""

import json
import os

import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from mim_jax.data import sources
from mim_jax.teachers import clip
from mim_jax.tokenizers import base as tok_base
from mim_jax.tokenizers import kclip

SPEC = "random:RN50,width=8,layers=1-1-1-1,image_size=64"  # layer 4: 2 x 2 x 256


class _ListSource:
  def __init__(self, images):
    self.images = images

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return sources._example(self.images[i], 0, i)  # pylint: disable=protected-access


@pytest.fixture(scope="module")
def teacher():
  return clip.CLIPTeacher(SPEC)


def _images(n, size=64, seed=0):
  rng = np.random.default_rng(seed)
  # Smooth random images (not white noise), so features differ in a structured way.
  base = rng.integers(0, 256, (n, size // 8, size // 8, 3)).astype(np.uint8)
  return base.repeat(8, axis=1).repeat(8, axis=2)


def _nearest(features, centroids):
  d = ((features[:, :, None, :] - centroids[None, None]) ** 2).sum(-1)
  return d.argmin(-1)


def test_tokens_are_the_nearest_centroid_of_layer4_features(teacher):
  c = teacher.layer4_channels
  assert c == 8 * 32
  rng = np.random.default_rng(1)
  images = _images(4)
  feats = np.asarray(teacher.layer4(jnp.asarray(images, jnp.float32) / 255.0))
  assert feats.shape == (4, 2, 2, c)
  feats = feats.reshape(4, 4, c)  # row-major grid, as the reference
  # Centroids near actual features, so the nearest one is not the same for every token.
  centroids = (
    feats.reshape(-1, c)[rng.permutation(16)[:6]] + 0.01 * rng.normal(size=(6, c))
  ).astype(np.float32)
  tok = kclip.KClipTokenizer(teacher, centroids, view=tok_base.View(64, 64)).as_tokenizer()
  assert tok.kind == "kclip" and tok.codebook_size == 6 and tok.grid == (2, 2)
  ids = np.asarray(tok.tokenize(images))
  expect = _nearest(feats, centroids)
  np.testing.assert_array_equal(ids, expect)
  assert len(np.unique(ids)) > 1


def test_build_save_reload_and_load_tokenizer(teacher, tmp_path):
  source = _ListSource(list(_images(24, seed=2)))
  out = str(tmp_path / "kclip")
  logs = []
  tok = kclip.build(
    teacher,
    source,
    out,
    k=8,
    iters=6,
    redo=2,
    sample_patches=64,
    view=tok_base.View(64, 64),
    batch_size=8,
    seed=3,
    max_images=16,
    log=logs.append,
  )
  assert sorted(os.listdir(out)) == [kclip.CENTROIDS, kclip.META]
  meta = json.load(open(os.path.join(out, kclip.META)))
  assert (meta["k"], meta["dim"], meta["clip"], meta["iters"], meta["redo"]) == (8, 256, SPEC, 6, 2)
  assert meta["num_patches"] == 16 * 4  # 64 / 16 images = 4 cells per image
  assert meta["view"] == {"size": 64, "resize": 64, "interpolation": "bicubic"}
  hist = np.asarray(meta["inertia_history"])
  assert np.all(np.diff(hist) <= 1e-3 * hist[0])  # Lloyd never increases the inertia
  assert sum("k-means run" in line for line in logs) == 2

  # The sampled features are the layer-4 cells of the first 16 images; their k-means
  # inertia with the saved centroids is the recorded one.
  feats = np.asarray(
    teacher.layer4(jnp.asarray(np.stack(source.images[:16]), jnp.float32) / 255.0)
  ).reshape(-1, 256)
  d = ((feats[:, None] - tok.centroids[None]) ** 2).sum(-1).min(-1)
  np.testing.assert_allclose(d.sum(), meta["inertia"], rtol=2e-3)

  loaded = tok_base.load_tokenizer(mlc.ConfigDict({"kind": "kclip", "path": out}))
  images = np.stack(source.images[16:])
  ids = np.asarray(loaded.tokenize(images))
  f = np.asarray(teacher.layer4(jnp.asarray(images, jnp.float32) / 255.0)).reshape(8, 4, 256)
  np.testing.assert_array_equal(ids, _nearest(f, tok.centroids))
  assert loaded.view.size == 64 and loaded.codebook_size == 8

  np.save(os.path.join(out, kclip.CENTROIDS), np.zeros((8, 100), np.float32))
  with pytest.raises(ValueError, match="100 dims.*256-d"):
    kclip.KClipTokenizer.load(out)
  with pytest.raises(FileNotFoundError, match="not a k-CLIP tokenizer"):
    kclip.KClipTokenizer.load(str(tmp_path))


def test_too_few_patches_is_an_error_before_k_means(teacher, tmp_path):
  source = _ListSource(list(_images(2, seed=4)))
  with pytest.raises(ValueError, match="only 8 patch features for k=16"):
    kclip.build(
      teacher,
      source,
      str(tmp_path / "x"),
      k=16,
      sample_patches=64,
      view=tok_base.View(64, 64),
      batch_size=2,
    )
  assert not os.path.exists(tmp_path / "x")
