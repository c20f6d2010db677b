"""Token caches (mim_jax.tokenizers.cache, python -m mim_jax.tokenize) and the report."""

import os
import subprocess
import sys

import ml_collections as mlc
import numpy as np
import pytest

from mim_jax import tokenizer_report as report
from mim_jax.tokenizers import base as tok_base
from mim_jax.tokenizers import cache as cache_lib
from mim_jax.tokenizers import centroids as centroid_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP = {
  "kind": "test",
  "codebook_size": 100,
  "grid": [2, 3],
  "view": {"size": 8, "resize": 8, "interpolation": "bicubic"},
  "provenance_sha": "x",
}
SRC = {"source": "npz", "split": "train", "length": 25}


def _ids(start, stop):
  return (np.arange(start, stop)[:, None] * 7 + np.arange(6)[None]) % 100


def test_write_resume_and_read(tmp_path):
  calls = []

  def chunk(start, stop):
    calls.append((start, stop))
    if len(calls) == 3 and not os.environ.get("_NO_FAIL"):
      raise KeyboardInterrupt  # an interrupted run: two chunks written
    return _ids(start, stop)

  d = str(tmp_path / "c")
  with pytest.raises(KeyboardInterrupt):
    cache_lib.write(
      d,
      num_examples=25,
      fingerprint=FP,
      source_info=SRC,
      tokenize_chunk=chunk,
      chunk_size=10,
      log=lambda _: None,
    )
  assert sorted(os.listdir(d)) == [
    "chunk-0000000000-0000000010.npy",
    "chunk-0000000010-0000000020.npy",
    "meta.json",
  ]
  with pytest.raises(cache_lib.CacheMismatchError, match="incomplete"):
    cache_lib.TokenCache(d)
  calls.clear()
  os.environ["_NO_FAIL"] = "1"
  try:
    cache_lib.write(
      d,
      num_examples=25,
      fingerprint=FP,
      source_info=SRC,
      tokenize_chunk=chunk,
      chunk_size=10,
      log=lambda _: None,
    )
  finally:
    del os.environ["_NO_FAIL"]
  assert calls == [(20, 25)]  # resumed at the first missing chunk
  assert sorted(os.listdir(d)) == ["meta.json", "tokens.npy"]  # chunks joined and removed
  cache = cache_lib.TokenCache(d)
  assert cache.tokens.dtype == np.int16 and len(cache) == 25
  np.testing.assert_array_equal(np.asarray(cache.tokens), _ids(0, 25))
  np.testing.assert_array_equal(cache[17], _ids(17, 18)[0])
  # A different tokenizer into the same directory is refused, not mixed in.
  with pytest.raises(cache_lib.CacheMismatchError, match="tokenizer"):
    cache_lib.write(
      d,
      num_examples=25,
      fingerprint=dict(FP, codebook_size=99),
      source_info=SRC,
      tokenize_chunk=chunk,
      chunk_size=10,
      log=lambda _: None,
    )


def test_processes_write_disjoint_chunks_and_process_zero_joins(tmp_path):
  d = str(tmp_path / "c")
  seen = {0: [], 1: []}
  for p in (1, 0):  # process 1 finishes first; process 0 joins after its own chunks
    cache_lib.write(
      d,
      num_examples=25,
      fingerprint=FP,
      source_info=SRC,
      tokenize_chunk=lambda s, e, p=p: seen[p].append(s) or _ids(s, e),
      chunk_size=5,
      process_index=p,
      process_count=2,
      log=lambda _: None,
    )
  assert seen == {0: [0, 10, 20], 1: [5, 15]}
  np.testing.assert_array_equal(np.asarray(cache_lib.TokenCache(d).tokens), _ids(0, 25))


def test_int32_when_codebook_exceeds_int16():
  assert cache_lib.token_dtype(32768) == np.int16
  assert cache_lib.token_dtype(32769) == np.int32


class _Source:
  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"image": np.zeros((8, 8, 3), np.uint8), "index": np.int64(i)}


def test_with_tokens_and_view_checks(tmp_path):
  d = str(tmp_path / "c")
  cache_lib.write(
    d,
    num_examples=25,
    fingerprint=FP,
    source_info=SRC,
    tokenize_chunk=_ids,
    chunk_size=10,
    log=lambda _: None,
  )
  cache = cache_lib.TokenCache(d)
  src = cache_lib.WithTokens(_Source(25), cache)
  np.testing.assert_array_equal(src[3]["tokens"], _ids(3, 4)[0])
  with pytest.raises(cache_lib.CacheMismatchError, match="has 25 examples"):
    cache_lib.WithTokens(_Source(24), cache)
  data = mlc.ConfigDict(dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=False))
  cache.check_train_view(data)  # MaPeT's view: fine
  data.crop_scale, data.hflip = (0.2, 1.0), True
  with pytest.raises(cache_lib.CacheMismatchError, match=r"crop_scale.*hflip"):
    cache.check_train_view(data)
  import pickle  # grain workers receive a pickled source: no array copy, same tokens

  again = pickle.loads(pickle.dumps(src))
  np.testing.assert_array_equal(again[7]["tokens"], src[7]["tokens"])
  assert len(pickle.dumps(cache)) < 1000


def _tiny_npz(tmp_path, n=40, size=24):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  path = str(tmp_path / "tiny.npz")
  np.savez(
    path, x_train=images, y_train=np.arange(n) % 4, x_test=images[:8], y_test=np.arange(8) % 4
  )
  return path, images


def test_tokenize_cli_matches_direct_tokenization(tmp_path):
  npz, images = _tiny_npz(tmp_path)
  rng = np.random.default_rng(1)
  centroid_lib.CentroidTokenizer(
    rng.random((50, 48), np.float32), patch_size=4, metadata={"image_size": 24}
  ).save(str(tmp_path / "cent"))
  out = str(tmp_path / "cache")
  cmd = [
    sys.executable,
    "-m",
    "mim_jax.tokenize",
    "--config=configs/tokenize.py:tokenizer=centroids",
    f"--config.tokenizer.path={tmp_path / 'cent'}",
    "--config.data.source=npz",
    f"--config.data.path={npz}",
    "--config.data.image_size=24",
    "--config.data.worker_count=0",
    "--config.cache.batch_size=8",
    "--config.cache.chunk_size=16",
    f"--config.cache.path={out}",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  cache = cache_lib.TokenCache(out)
  tok = tok_base.load_tokenizer(
    mlc.ConfigDict({"kind": "centroids", "path": str(tmp_path / "cent")})
  )
  np.testing.assert_array_equal(np.asarray(cache.tokens), np.asarray(tok.tokenize(images)))
  assert cache.meta["tokenizer"]["view"] == {"size": 24, "resize": 24, "interpolation": "bicubic"}
  # Bad input: one line naming the field, exit 2, before any work.
  r = subprocess.run(
    cmd[:-1] + ["--config.cache.path="],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 2 and "config.cache.path" in r.stderr


# ------------------------------------------------------------------ report
def test_usage_statistics():
  assert report.usage(np.arange(10), 10)["perplexity"] == pytest.approx(10.0)
  u = report.usage(np.zeros(50, int), 10)
  assert (u["codes_used"], u["perplexity"], u["usage_pct"]) == (1, pytest.approx(1.0), 10.0)


def test_corruptions():
  rng = np.random.default_rng(0)
  images = np.full((3, 16, 16, 3), 200, np.uint8)
  masked = report.mask_patches(images, (4, 4), 0.5, rng)
  black = (masked.reshape(3, 4, 4, 4, 4, 3) == 0).all(axis=(2, 4, 5))
  assert (black.sum(axis=(1, 2)) == 8).all()  # exactly 50 % of patches
  np.testing.assert_array_equal(report.gaussian_blur(images, 2.0), images)  # constant stays
  step = np.zeros((1, 16, 16, 3), np.uint8)
  step[:, :, 8:] = 255
  blurred = report.gaussian_blur(step, 1.0)
  assert 0 < blurred[0, 0, 7, 0] < 128 < blurred[0, 0, 8, 0] < 255  # the edge is smoothed
  noisy = report.gaussian_noise(np.full((4, 32, 32, 3), 128, np.uint8), 10.0, rng)
  assert abs(noisy.astype(float).std() - 10.0) < 0.5


def test_centroid_tokens_are_local_under_masking(tmp_path):
  """CCViT Table 4's point: a centroid token depends on its own patch only, so unmasked
  positions never change and the unchanged share is >= 1 - ratio."""
  rng = np.random.default_rng(0)
  centroid_lib.CentroidTokenizer(
    rng.random((64, 48), np.float32), patch_size=4, metadata={"image_size": 16}
  ).save(str(tmp_path / "c"))
  tok = tok_base.load_tokenizer(mlc.ConfigDict({"kind": "centroids", "path": str(tmp_path / "c")}))
  images = rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
  row, clean = report.evaluate(
    tok, images, mask_ratios=(0.5,), noise_sigmas=(1.0,), blur_sigmas=(), batch_size=8
  )
  assert clean.shape == (20, 16)
  assert 50.0 <= row["mask_0.5"] <= 60.0
  assert row["noise_1"] > 80.0
  png = report.code_grid(images, clean, tok.grid, num_codes=3, per_code=4)
  # 3 titled rows of 4 patches of 32 px (mim_jax/visual.py adds the titles and gaps).
  assert png.dtype == np.uint8 and png.shape[2] == 3
  assert 3 * 32 < png.shape[0] < 3 * 32 + 80 and 4 * 32 < png.shape[1] < 4 * 32 + 250
  assert (png[:, :40].min(axis=-1) < 100).sum() > 20  # the row titles' letters


def test_report_cli(tmp_path):
  npz, _ = _tiny_npz(tmp_path, size=16)
  rng = np.random.default_rng(0)
  centroid_lib.CentroidTokenizer(
    rng.random((32, 48), np.float32), patch_size=4, metadata={"image_size": 16}
  ).save(str(tmp_path / "c"))
  out = tmp_path / "rep"
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "mim_jax.tokenizer_report",
      f"--tokenizer=centroids:{tmp_path / 'c'}",
      "--source=npz",
      f"--path={npz}",
      "--split=train",
      "--num_images=16",
      f"--out={out}",
      "--batch_size=8",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert r.returncode == 0, r.stderr[-2000:]
  assert "| centroids:c | 32 | 16 |" in (out / "report.md").read_text()
  assert (out / "codes_centroids_1.png").exists()
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "mim_jax.tokenizer_report",
      "--tokenizer=nope:x",
      f"--out={out}",
      "--source=npz",
      f"--path={npz}",
      "--split=train",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert r.returncode == 2 and "--tokenizer" in r.stderr
