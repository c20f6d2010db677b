r"""Runs a frozen tokenizer over a data split once and stores the ids: a token cache.

  python -m mim_jax.tokenize --config=configs/tokenize.py:tokenizer=kclip \
      --config.tokenizer.path=$DATA/kclip_rn50x64 \
      --config.data.source=imagefolder --config.data.path=$DATA/imagenet \
      --config.cache.path=$DATA/tokens/kclip_rn50x64_train

  python -m mim_jax.tokenize --config=configs/tokenize.py:runlocal --config.cache.path=/tmp/tok

Each example is prepared with the tokenizer's `View` (Resize shorter side -> CenterCrop,
no flip), recorded in the cache so training can check it reads the same region (MaPeT's
k-CLIP tokens, docs/reference_details.md#k-clip-tokens). Re-running the same command resumes
at the first missing chunk. Multi-host: every process runs the same command
(config.distributed=True) and writes its own chunks; process 0 joins them. Devices of one
process split each batch.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import logging
import grain.python as grain
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags
import numpy as np

from mim_jax import cli
from mim_jax import distributed
from mim_jax.data import pipeline as data_pipeline
from mim_jax.data import sources as data_sources
from mim_jax.data import transforms
from mim_jax.tokenizers import base as tok_base
from mim_jax.tokenizers import cache as cache_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Tokenize config file.", lock_config=True)


class _Range:
  """Examples [start, stop) of a source, keeping their global `index`."""

  def __init__(self, source, start: int, stop: int):
    self._source, self.start, self.stop = source, start, stop

  def __len__(self):
    return self.stop - self.start

  def __getitem__(self, i):
    return self._source[self.start + int(i)]

  def __repr__(self):
    return f"{self._source!r}[{self.start}:{self.stop}]"


def build_tokenizer(config, source=None) -> tok_base.Tokenizer:
  """The configured tokenizer; with tokenizer.build_if_missing and an empty path, a small
  one is built first (pixel centroids or k-CLIP) beside the cache."""
  t = config.tokenizer
  if not t.path and t.get("build_if_missing"):
    t.path = _build_small_tokenizer(config, source, os.path.join(config.cache.path, "tokenizer"))
  return tok_base.load_tokenizer(t, config.data.image_size)


def _build_small_tokenizer(config, source, out: str) -> str:
  t = config.tokenizer
  if t.kind == "centroids":
    from mim_jax.methods import common as method_common  # pylint: disable=g-import-not-at-top

    if os.path.exists(out + ".npy"):
      return out
    tok = method_common.build_codebook_from_source(
      source,
      k=t.k,
      images_per_class=t.images_per_class,
      iters=t.iters,
      patch_size=t.patch_size,
      image_size=config.data.image_size,
      seed=config.seed,
    )
    tok.save(out)
    return out
  if t.kind == "kclip":
    from mim_jax.tokenizers import kclip  # pylint: disable=g-import-not-at-top

    if not os.path.exists(os.path.join(out, kclip.META)):
      kclip.build_from_config(config, source, out)
    return out
  raise ValueError(
    f"config.tokenizer.build_if_missing: a {t.kind} tokenizer must be trained "
    f"first (configs/{'vqkd_vitb' if t.kind == 'vqkd' else 'peco_vqvae'}.py); "
    "set config.tokenizer.path to its workdir"
  )


def _validate(config):
  c = config.cache
  if not c.path:
    raise ValueError("config.cache.path is empty: where should the token cache go?")
  for f in ("batch_size", "chunk_size"):
    if not isinstance(c[f], int) or c[f] <= 0:
      raise ValueError(f"config.cache.{f} must be a positive integer, got {c[f]!r}")
  data_sources.validate_data_config(config.data, config.data.split)


def run(config) -> str:
  """Writes (or resumes) the cache described by `config`; returns its directory."""
  _validate(config)
  distributed.initialize(config)  # config fields, JAX_* variables or a detected cluster
  source = data_sources.build_source(config.data, config.data.split)
  tok = build_tokenizer(config, source)
  view = tok.view
  if config.cache.get("resize", 0):
    view = tok_base.View(view.size, int(config.cache.resize), view.interpolation)
    tok.view = view
  transform = transforms.EvalTransform(view.size, view.resize, view.interpolation)
  devices = jax.local_devices()
  batch = config.cache.batch_size
  if batch % len(devices):
    raise ValueError(
      f"config.cache.batch_size={batch} is not divisible by the {len(devices)} local devices"
    )
  in_sharding = NamedSharding(Mesh(np.array(devices), ("data",)), P("data"))
  fn = jax.jit(tok.fn, in_shardings=(None, in_sharding))
  params = jax.device_put(tok.params, NamedSharding(in_sharding.mesh, P()))
  logging.info(
    "tokenizer %s on %s (%d examples) -> %s", tok, source, len(source), config.cache.path
  )

  def tokenize_chunk(start, stop):
    loader = data_pipeline.make_eval_loader(
      _Range(source, start, stop),
      transform,
      global_batch_size=batch,
      worker_count=config.data.worker_count,
      shard_options=grain.NoSharding(),
    )
    out, seen = [], []
    for b in loader:
      ids = np.asarray(fn(params, b["image"]))
      out.append(ids[b["valid"]])
      seen.append(b["index"][b["valid"]])
    seen = np.concatenate(seen)
    if not np.array_equal(seen, np.arange(start, stop)):
      raise RuntimeError(f"examples [{start}, {stop}) came back out of order")
    return np.concatenate(out)

  source_info = {
    "source": config.data.source,
    "name": config.data.get("name", ""),
    "path": config.data.get("path", ""),
    "split": config.data.split,
    "length": len(source),
  }
  cache_lib.write(
    config.cache.path,
    num_examples=len(source),
    fingerprint=tok.fingerprint(),
    source_info=source_info,
    tokenize_chunk=tokenize_chunk,
    chunk_size=config.cache.chunk_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    log=logging.info,
  )
  return config.cache.path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    print("error: --config is required", file=sys.stderr)
    sys.exit(2)
  try:
    path = run(config)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)
  meta = cache_lib.read_meta(path)
  if meta.get("complete"):
    logging.info(
      "token cache complete: %s (%d examples x %d tokens, %s)",
      path,
      meta["num_examples"],
      meta["num_tokens"],
      meta["dtype"],
    )


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse)
