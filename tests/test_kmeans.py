"""Tests for the JAX k-means (mim_jax.tokenizers.kmeans) and CCViT's centroid tokenizer."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
from PIL import Image
import pytest

from mim_jax.tokenizers import build_centroids
from mim_jax.tokenizers import centroids as centroids_lib
from mim_jax.tokenizers import kmeans

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def blobs(num_points, dim, num_centers, spread, seed=0, return_labels=False):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(num_centers, dim)) * spread
  labels = rng.integers(0, num_centers, num_points)
  points = (centers[labels] + rng.normal(size=(num_points, dim))).astype(np.float32)
  return (points, labels) if return_labels else points


def brute_force(points, centroids):
  """float64 squared distances to every centroid; ids and distances of the nearest."""
  x, c = np.asarray(points, np.float64), np.asarray(centroids, np.float64)
  d = ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)
  return d.argmin(1), d.min(1), d


@pytest.fixture(scope="module")
def mesh8():
  devices = jax.devices()
  if len(devices) < 8:
    pytest.skip("needs 8 (fake) devices from tests/conftest.py")
  return Mesh(np.asarray(devices[:8]), ("data",))


def test_inertia_matches_scikit_learn():
  from sklearn.cluster import KMeans

  x = blobs(20_000, 64, 64, spread=3.0)
  # An init under which no cluster empties: scikit-learn relocates empty
  # clusters to far points, this implementation keeps them (by design).
  init = x[np.random.default_rng(2).choice(len(x), 64, replace=False)]
  ours = kmeans.fit(x, 64, iters=20, init=init, chunk_size=4096)
  assert (ours.counts > 0).all()
  # tol=0: no early stop on centre shift (it still stops once labels are stable,
  # after which further Lloyd iterations change nothing).
  ref = KMeans(64, init=init, n_init=1, algorithm="lloyd", max_iter=20, tol=0.0).fit(x)
  assert ref.n_iter_ >= 10
  assert abs(ours.inertia_history[-1] - ref.inertia_) <= 0.01 * ref.inertia_
  # Lloyd never increases the objective; the history starts at the init.
  assert np.all(np.diff(ours.inertia_history) <= 1e-5 * ours.inertia_history[0])
  _, init_dist, _ = brute_force(x, init)
  np.testing.assert_allclose(ours.inertia_history[0], init_dist.sum(), rtol=1e-5)
  assert ours.counts.sum() == len(x)


def test_sharded_fit_equals_unsharded(mesh8):
  # 20_003 rows: not a multiple of 8, so the padding rows must never count.
  # One init point per blob keeps every point far from a cluster boundary: in
  # float32, ||x||^2 - 2x.c + ||c||^2 can flip near-ties between summation
  # orders, which is rounding, not a sharding bug.
  x, labels = blobs(20_003, 32, 16, spread=8.0, seed=2, return_labels=True)
  init = x[[np.flatnonzero(labels == j)[0] for j in range(16)]]
  single = kmeans.fit(x, 16, iters=4, init=init, chunk_size=1000)
  sharded = kmeans.fit(x, 16, iters=4, init=init, chunk_size=512, mesh=mesh8)
  np.testing.assert_allclose(np.asarray(sharded.centroids), np.asarray(single.centroids), atol=1e-4)
  np.testing.assert_array_equal(sharded.counts, single.counts)
  np.testing.assert_array_equal(sharded.counts, np.bincount(labels, minlength=16))
  np.testing.assert_allclose(sharded.inertia_history, single.inertia_history, rtol=1e-5)
  assert sharded.centroids.sharding.is_fully_replicated
  # A JAX array input is padded and resharded the same way.
  from_device = kmeans.fit(jnp.asarray(x), 16, iters=4, init=init, chunk_size=512, mesh=mesh8)
  np.testing.assert_allclose(
    np.asarray(from_device.centroids), np.asarray(single.centroids), atol=1e-4
  )
  # Random init (two seeds may share a blob): the objective still agrees.
  single = kmeans.fit(x, 16, iters=6, seed=3, chunk_size=1000)
  sharded = kmeans.fit(x, 16, iters=6, seed=3, chunk_size=512, mesh=mesh8)
  np.testing.assert_allclose(sharded.inertia_history, single.inertia_history, rtol=1e-4)
  assert sharded.counts.sum() == len(x)


def test_fewer_points_than_devices(mesh8):
  # Whole shards of padding: 5 points over 8 devices.
  x = np.array([[0, 0], [0, 1], [10, 10], [10, 11], [11, 10]], np.float32)
  sharded = kmeans.fit(x, 2, iters=3, init=x[[0, 2]], mesh=mesh8)
  single = kmeans.fit(x, 2, iters=3, init=x[[0, 2]])
  np.testing.assert_allclose(np.asarray(sharded.centroids), np.asarray(single.centroids), atol=1e-6)
  np.testing.assert_allclose(np.asarray(sharded.centroids), [[0, 0.5], [31 / 3, 31 / 3]], atol=1e-5)
  np.testing.assert_array_equal(sharded.counts, [2, 3])


def test_chunk_size_does_not_change_the_result():
  x = blobs(5_000, 16, 12, spread=6.0, seed=4)
  results = [kmeans.fit(x, 12, iters=6, seed=0, chunk_size=c) for c in (7, 1000, 65536)]
  for other in results[1:]:
    np.testing.assert_allclose(
      np.asarray(other.centroids), np.asarray(results[0].centroids), atol=1e-5
    )
    np.testing.assert_array_equal(other.counts, results[0].counts)


def test_empty_clusters_keep_their_centroid(mesh8):
  x = blobs(3_000, 8, 4, spread=5.0, seed=5)
  init = x[:6].copy()
  init[4] = 1e3  # far away: never nearest
  init[5] = init[0]  # duplicate of 0: argmin takes the first, so 5 is empty in update 1
  for mesh in (None, mesh8):
    one = kmeans.fit(x, 6, iters=1, init=init, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(one.centroids)[4:], init[4:])
    assert not np.array_equal(np.asarray(one.centroids)[0], init[0])
    result = kmeans.fit(x, 6, iters=5, init=init, mesh=mesh)
    centroids = np.asarray(result.centroids)
    assert np.isfinite(centroids).all() and np.isfinite(result.inertia_history).all()
    np.testing.assert_array_equal(centroids[4], init[4])
    assert result.counts[4] == 0 and result.counts.sum() == len(x)


def test_reseed_empty_moves_them_onto_far_points(mesh8):
  x = blobs(3_000, 8, 4, spread=5.0, seed=5)
  init = x[:6].copy()
  init[4] = 1e3
  init[5] = init[0]
  kept = kmeans.fit(x, 6, iters=5, init=init)
  for mesh in (None, mesh8):
    reseeded = kmeans.fit(x, 6, iters=5, init=init, mesh=mesh, reseed_empty=True)
    centroids = np.asarray(reseeded.centroids)
    assert np.isfinite(centroids).all() and (reseeded.counts > 0).all()
    assert np.abs(centroids).max() < 100.0
    assert reseeded.inertia_history[-1] < kept.inertia_history[-1]


def test_assign_equals_brute_force():
  rng = np.random.default_rng(6)
  points = rng.normal(size=(3, 50, 24)).astype(np.float32)
  centroids = rng.normal(size=(40, 24)).astype(np.float32)
  ids, dist = kmeans.assign(points, centroids, chunk_size=16, return_distances=True)
  assert ids.shape == (3, 50) and ids.dtype == jnp.int32
  ref_ids, ref_dist, all_dist = brute_force(points.reshape(-1, 24), centroids)
  got = np.asarray(ids).reshape(-1)
  # Rounding may only flip near-ties.
  flipped = got != ref_ids
  assert flipped.mean() < 0.01
  np.testing.assert_allclose(all_dist[np.arange(len(got)), got], ref_dist, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(dist).reshape(-1), ref_dist, rtol=1e-4, atol=1e-4)
  # Usable inside a jitted function (a train step).
  jitted = jax.jit(lambda p, c: kmeans.assign(p, c, chunk_size=32))(points, centroids)
  np.testing.assert_array_equal(np.asarray(jitted), np.asarray(ids))
  bf16 = kmeans.assign(points, centroids, bf16_matmul=True)
  assert (np.asarray(bf16).reshape(-1) == ref_ids).mean() > 0.9


def test_assign_in_a_sharded_step_tokenises_only_each_devices_rows(mesh8):
  """Inside a step jitted under a mesh (as the trainer runs it), each device assigns its own
  rows: no device gathers the batch, and the ids equal the one-device ones. Left to the
  partitioner, the chunk loop over batch-sharded rows made all 8 devices gather and assign
  all rows (8x the work of the step's tokenizer)."""
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(7)
  points = rng.normal(size=(16, 49, 24)).astype(np.float32)  # 8 devices x 2 images x 49
  centroids = rng.normal(size=(64, 24)).astype(np.float32)
  alone = kmeans.assign(points, centroids, chunk_size=32)
  step = jax.jit(lambda p, c: kmeans.assign(p, c, chunk_size=32))
  sharded = jax.device_put(points, NamedSharding(mesh8, P("data")))
  with jax.set_mesh(mesh8):
    ids = step(sharded, centroids)
    hlo = step.lower(sharded, centroids).compile().as_text()
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(alone))
  assert "all-gather" not in hlo
  rows_per_dot = {int(m) for m in re.findall(r"f32\[(\d+),64\]\S* dot", hlo)}
  assert rows_per_dot and max(rows_per_dot) <= 2 * 49, rows_per_dot  # local rows only
  # 8 devices that do not divide the rows: the global form, still correct.
  odd = jax.device_put(points[:, :47].reshape(-1, 24)[:750], NamedSharding(mesh8, P()))
  with jax.set_mesh(mesh8):
    np.testing.assert_array_equal(
      np.asarray(step(odd, centroids)), np.asarray(kmeans.assign(np.asarray(odd), centroids))
    )


def test_spherical_matches_numpy_reference():
  x = blobs(2_000, 16, 8, spread=3.0, seed=7)
  init = x[:8]
  result = kmeans.fit(x, 8, iters=4, init=init, spherical=True)
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  c = init / np.linalg.norm(init, axis=1, keepdims=True)
  for _ in range(4):
    ids = (xn @ c.T).argmax(1)
    for j in range(8):
      if (ids == j).any():
        mean = xn[ids == j].mean(0)
        c[j] = mean / np.linalg.norm(mean)
  centroids = np.asarray(result.centroids)
  np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(centroids, c, atol=1e-4)
  final_cos = (xn @ c.T).max(1)
  np.testing.assert_allclose(result.inertia_history[-1], np.sum(2 - 2 * final_cos), rtol=1e-4)


def test_random_init_and_validation():
  x = blobs(500, 4, 3, spread=2.0)
  first = np.asarray(kmeans.random_init(x, 50, seed=0))
  assert len({row.tobytes() for row in first}) == 50  # distinct rows of x
  assert all((x == row).all(1).any() for row in first)
  np.testing.assert_array_equal(first, np.asarray(kmeans.random_init(x, 50, seed=0)))
  assert not np.array_equal(first, np.asarray(kmeans.random_init(x, 50, seed=1)))
  with pytest.raises(ValueError, match="k=501"):
    kmeans.fit(x, 501)
  with pytest.raises(ValueError, match="init has shape"):
    kmeans.fit(x, 3, init=np.zeros((3, 5)))
  with pytest.raises(ValueError, match="2-D"):
    kmeans.fit(x[0], 3)


# ---------------------------------------------------------------------------
# Centroid tokenizer


def test_patchify_is_channel_y_x_and_unpatchify_inverts_it():
  rng = np.random.default_rng(0)
  images = rng.random((2, 12, 8, 3)).astype(np.float32)
  p = 4
  expected = np.zeros((2, 6, 3 * p * p), np.float32)
  for b in range(2):
    for gy in range(3):
      for gx in range(2):
        values = []
        for c in range(3):
          for y in range(p):
            for x in range(p):
              values.append(images[b, gy * p + y, gx * p + x, c])
        expected[b, gy * 2 + gx] = values
  patches = centroids_lib.patchify(images, p)
  assert isinstance(patches, np.ndarray)
  np.testing.assert_array_equal(patches, expected)
  jitted = jax.jit(centroids_lib.patchify, static_argnums=1)(jnp.asarray(images), p)
  np.testing.assert_array_equal(np.asarray(jitted), expected)
  back = jax.jit(centroids_lib.unpatchify, static_argnums=(1, 2))(jitted, p, (3, 2))
  np.testing.assert_array_equal(np.asarray(back), images)
  np.testing.assert_array_equal(centroids_lib.unpatchify(patches, p, (3, 2)), images)
  with pytest.raises(ValueError, match="patch_size=5"):
    centroids_lib.patchify(images, 5)


def test_tokenizer_tokens_pixels_save_load(tmp_path):
  rng = np.random.default_rng(1)
  centers = rng.random((16, 3 * 4 * 4)).astype(np.float32)
  tokenizer = centroids_lib.CentroidTokenizer(centers, patch_size=4, metadata={"seed": 1})
  images = rng.random((2, 8, 12, 3)).astype(np.float32)
  tokens = tokenizer.tokens(images)
  assert tokens.shape == (2, 6) and tokens.dtype == jnp.int32
  ref_ids, _, _ = brute_force(centroids_lib.patchify(images, 4).reshape(-1, 48), centers)
  np.testing.assert_array_equal(np.asarray(tokens).reshape(-1), ref_ids)
  pixels = tokenizer.centroid_pixels(tokens)
  np.testing.assert_array_equal(np.asarray(pixels), centers[np.asarray(tokens)])

  npy_path, json_path = tokenizer.save(str(tmp_path / "sub" / "centroids"))
  assert npy_path.endswith("centroids.npy") and os.path.isfile(json_path)
  loaded = centroids_lib.CentroidTokenizer.load(str(tmp_path / "sub" / "centroids.npy"))
  np.testing.assert_array_equal(np.asarray(loaded.centroids), centers)
  assert loaded.patch_size == 4 and loaded.metadata["seed"] == 1
  assert loaded.metadata["patch_order"] == "cyx" and loaded.metadata["k"] == 16

  metadata = json.load(open(json_path))
  metadata["k"] = 32
  json.dump(metadata, open(json_path, "w"))
  with pytest.raises(ValueError, match="centroids.npy holds an array of shape"):
    centroids_lib.CentroidTokenizer.load(str(tmp_path / "sub" / "centroids"))
  metadata.update(k=16, patch_order="yxc")
  json.dump(metadata, open(json_path, "w"))
  with pytest.raises(ValueError, match="patch_order"):
    centroids_lib.CentroidTokenizer.load(str(tmp_path / "sub" / "centroids"))
  with pytest.raises(FileNotFoundError, match=r"missing\.npy does not exist"):
    centroids_lib.CentroidTokenizer.load(str(tmp_path / "missing"))


def _write_tiny_npz(path, classes=4, per_class=5, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(classes), per_class + 2).astype(np.int32)
  # Smooth colour gradients plus noise: patches with real structure.
  yy, xx = np.mgrid[0:24, 0:28] / 24.0
  images = []
  for label in labels:
    base = np.stack([yy * (label + 1) / classes, xx, 1 - yy], -1)
    images.append(np.clip(base + rng.normal(0, 0.1, base.shape), 0, 1))
  np.savez(path, x_train=(np.stack(images) * 255).astype(np.uint8), y_train=labels)


def test_build_command_end_to_end(tmp_path):
  npz = tmp_path / "tiny.npz"
  _write_tiny_npz(npz)
  out = tmp_path / "run" / "centroids"
  command = [
    sys.executable,
    "-m",
    "mim_jax.tokenizers.build_centroids",
    "--source=npz",
    f"--path={npz}",
    "--images_per_class=5",
    "--k=16",
    "--iters=3",
    "--patch_size=8",
    "--image_size=32",
    "--seed=1",
    f"--out={out}",
  ]
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr
  assert "iteration   3" in run.stdout
  tokenizer = centroids_lib.CentroidTokenizer.load(str(out))
  meta = tokenizer.metadata
  assert tokenizer.num_tokens == 16 and tokenizer.patch_size == 8
  assert meta["num_images"] == 20 and meta["num_patches"] == 20 * 16
  assert meta["image_size"] == 32 and meta["iterations"] == 3 and meta["seed"] == 1
  assert len(meta["inertia_history"]) == 4
  assert meta["inertia_history"][-1] <= meta["inertia_history"][0]
  centroids = np.asarray(tokenizer.centroids)
  assert 0.0 <= centroids.min() and centroids.max() <= 1.0

  # Missing data fails fast with the path in the message.
  bad = subprocess.run(
    command[:4] + [f"--path={tmp_path / 'nope.npz'}", f"--out={out}"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert bad.returncode != 0 and "nope.npz does not exist" in bad.stderr


def test_build_from_imagefolder_in_process(tmp_path):
  rng = np.random.default_rng(2)
  for name in ("b_class", "a_class"):
    os.makedirs(tmp_path / "root" / name)
    for i in range(4):
      pixels = (rng.random((20, 30, 3)) * 255).astype(np.uint8)
      Image.fromarray(pixels).save(tmp_path / "root" / name / f"img{i}.png")
  (tmp_path / "root" / "a_class" / "notes.txt").write_text("not an image")
  messages = []
  tokenizer = build_centroids.build(
    "imagefolder",
    str(tmp_path / "c"),
    path=str(tmp_path / "root"),
    images_per_class=3,
    k=8,
    iters=2,
    patch_size=8,
    image_size=16,
    seed=0,
    log=messages.append,
  )
  assert tokenizer.metadata["num_images"] == 6 and tokenizer.num_tokens == 8
  assert any("iteration   2" in m for m in messages)
  # Resize(shorter side 18) -> CenterCrop(16), like torchvision's Resize / CenterCrop.
  image = Image.fromarray((rng.random((20, 30, 3)) * 255).astype(np.uint8))
  cropped = build_centroids.resize_center_crop(image, 16)
  resized = np.asarray(image.resize((27, 18), Image.BICUBIC))
  np.testing.assert_array_equal(cropped, resized[1:17, 6:22])
  with pytest.raises(build_centroids.BuildError, match="missing_root does not exist"):
    build_centroids.build("imagefolder", str(tmp_path / "c"), path=str(tmp_path / "missing_root"))
