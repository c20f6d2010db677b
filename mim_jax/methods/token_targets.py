"""Where a token objective's targets come from, for every token method (BEiT v2, PeCo MIM,
MaPeT, ...) and every tokenizer kind (VQ-KD, PeCo, k-CLIP, pixel centroids).

  config.tokenizer.kind / path     a tokenizer run *online* inside the train step on the
                                   second view (`image2`, config.data.second_image_size),
                                   under stop_gradient, its params a const of the step;
  config.tokenizer.cache           or a token cache (`python -m mim_jax.tokenize`) read with
                                   the images: the source is wrapped so that every example
                                   carries `tokens`, and the student view must cover the
                                   cached region (centre crop, no flip), checked up front.

Either way the targets are (B, N) int32 ids on the student's patch grid.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from mim_jax.methods import common
from mim_jax.tokenizers import base as tok_base
from mim_jax.tokenizers import cache as cache_lib


class TokenTargets:
  """`targets(consts, batch) -> (B, N) int32` plus what the trainer needs around it."""

  def __init__(
    self, config, grid: tuple[int, int], *, patch_size: int, workdir: str | None = None, source=None
  ):
    t, d = config.tokenizer, config.data
    self.config = config
    self.built_in_workdir = False  # a pixel codebook built into (or read from) the workdir
    if (
      t.kind == "centroids"
      and not t.path
      and not t.get("cache", "")
      and t.get("build_if_missing", False)
    ):
      t.path = self._build_centroids(config, patch_size, workdir, source)
      self.built_in_workdir = True
    self.grid = tuple(grid)
    self.cache = None
    self.tokenizer = None
    if t.get("cache", ""):
      if str(t.cache).startswith("random:"):  # a stand-in (mim_jax.aot)
        self.cache = cache_lib.RandomTokenCache(t.cache, self.grid, t.get("k", 0) or 8192)
      else:
        self.cache = cache_lib.TokenCache(t.cache)
      self.cache.check_train_view(d)
      self.vocab_size = self.cache.codebook_size
      found, where = self.cache.grid, f"config.tokenizer.cache ({t.cache})"
    else:
      self.tokenizer = tok_base.load_tokenizer(
        t, d.image_size, view_size=d.second_image_size, patch_size=patch_size
      )
      self.vocab_size = self.tokenizer.codebook_size
      found, where = self.tokenizer.grid, f"config.tokenizer.path ({t.path})"
      if self.tokenizer.view.size != d.second_image_size:
        raise ValueError(
          f"config.data.second_image_size={d.second_image_size} but the {t.kind} tokenizer "
          f"takes {self.tokenizer.view.size}px images: set --config.data.second_image_size="
          f"{self.tokenizer.view.size}"
        )
    if tuple(found) != self.grid:
      raise ValueError(
        f"{where} gives a {found[0]}x{found[1]} token grid but the student has "
        f"{self.grid[0]}x{self.grid[1]} patches (config.data.image_size, "
        "config.model.variant)"
      )

  @staticmethod
  def _build_centroids(config, patch_size: int, workdir, source) -> str:
    """Small data only (`:runlocal`): pixel centroids of the training images, built once
    into the workdir (CCViT's codebook recipe)."""
    if source is None:
      raise ValueError("config.tokenizer.build_if_missing needs the training source")
    t = config.tokenizer
    path = os.path.join(workdir, "centroids") if workdir else None
    if path and os.path.exists(path + ".npy"):
      return path
    tok = common.build_codebook_from_source(
      source,
      k=t.k,
      images_per_class=t.images_per_class,
      iters=t.iters,
      patch_size=patch_size,
      image_size=config.data.image_size,
      seed=t.get("seed", 0),
    )
    if path is None:
      raise ValueError("config.tokenizer.build_if_missing needs a workdir to keep the codebook")
    if jax.process_index() == 0:
      tok.save(path)
    return path

  @property
  def online(self) -> bool:
    return self.tokenizer is not None

  def describe(self) -> dict:
    """For fingerprints: what the targets are."""
    if self.online:
      return {"tokenizer": self.tokenizer.fingerprint()}
    return {"tokenizer": self.cache.meta["tokenizer"], "cache": self.cache.directory}

  def frozen_fingerprint(self) -> dict[str, str]:
    """Config field -> fingerprint of the frozen input the targets come from: the token
    cache's files, or the online tokenizer's kind and files (a codebook built into the
    workdir by its content, so that the workdir may move)."""
    t = self.config.tokenizer
    if not self.online:
      if isinstance(self.cache, cache_lib.RandomTokenCache):
        return {"tokenizer.cache": t.cache}
      return {"tokenizer.cache": common.file_fingerprint(t.cache)}
    if self.built_in_workdir:
      where = "codebook built in the workdir from the training data, " + common.array_fingerprint(
        self.tokenizer.params["centroids"]
      )
    elif t.path.startswith(tok_base.RANDOM):
      where = f"{t.path} (untrained stand-in, seed 0)"
    elif t.kind == "centroids":
      where = common.codebook_fingerprint(t.path)
    else:
      where = common.file_fingerprint(t.path)
    if t.kind == "kclip":  # its CLIP weights may live outside the directory (meta 'clip')
      spec = str(self.tokenizer.provenance.get("clip", ""))
      if spec and not spec.startswith("random:"):
        spec = os.path.join(t.path, spec)  # kclip.KClipTokenizer.load's resolution
        inside = os.path.commonpath([os.path.abspath(spec), os.path.abspath(t.path)])
        if os.path.isfile(spec) and inside != os.path.abspath(t.path):
          where += "; CLIP weights " + common.file_fingerprint(spec)
    return {"tokenizer.kind": t.kind, "tokenizer.path": where}

  def wrap_source(self, source):
    return cache_lib.WithTokens(source, self.cache) if self.cache is not None else source

  def consts(self) -> dict:
    return {"tokenizer": self.tokenizer.params} if self.online else {}

  def __call__(self, consts, batch) -> jax.Array:
    if self.online:
      ids = self.tokenizer.fn(consts["tokenizer"], batch["image2"])
      return jax.lax.stop_gradient(ids).astype(jnp.int32)
    return batch["tokens"].astype(jnp.int32)
