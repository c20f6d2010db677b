"""Token caches: a tokenizer's ids for every example of a split, stored once, read by index.

Layout of a cache directory:
  meta.json    tokenizer fingerprint (kind, K, grid, view, provenance hash), the source it was
               computed on (repr, split, length), dtype, creation time, `complete`
  tokens.npy   (num_examples, num_tokens) int16 (int32 when K > 32767), row i = source[i];
               opened memory-mapped, so a 1.28M x 196 ImageNet cache (~0.5 GB) costs no RAM
  chunk-*.npy  while writing: one file per `chunk_size` examples, each written atomically
               (tmp + rename), so an interrupted run resumes at the first missing chunk and
               a crash never leaves a half-written chunk behind.

Every process of a multi-host job writes the chunks i with i % process_count == process_index
and process 0 joins them into tokens.npy once all exist (a shared file system is assumed, as
for checkpoints). Readers refuse a cache whose source length, tokenizer or view differs from
what the training run asks for.
"""

from __future__ import annotations

import glob
import json
import os
import time
from typing import Any, Callable

import numpy as np

from mim_jax.tokenizers.base import View

META = "meta.json"
TOKENS = "tokens.npy"


class CacheMismatchError(ValueError):
  """The cache does not belong to this source / tokenizer / view."""


def token_dtype(codebook_size: int) -> np.dtype:
  return np.dtype(np.int16 if codebook_size <= np.iinfo(np.int16).max + 1 else np.int32)


def _chunk_name(directory: str, start: int, stop: int) -> str:
  return os.path.join(directory, f"chunk-{start:010d}-{stop:010d}.npy")


def _atomic_save(path: str, array: np.ndarray) -> None:
  tmp = path + ".tmp.npy"
  np.save(tmp, array)
  os.replace(tmp, path)


def _atomic_json(path: str, obj: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def chunk_ranges(num_examples: int, chunk_size: int) -> list[tuple[int, int]]:
  return [(s, min(s + chunk_size, num_examples)) for s in range(0, num_examples, chunk_size)]


def write(
  directory: str,
  *,
  num_examples: int,
  fingerprint: dict,
  source_info: dict,
  tokenize_chunk: Callable[[int, int], np.ndarray],
  chunk_size: int = 10_000,
  process_index: int = 0,
  process_count: int = 1,
  log: Callable[[str], None] = print,
  wait_timeout_s: float = 24 * 3600,
) -> str:
  """Writes (or resumes) a cache. `tokenize_chunk(start, stop)` returns the (stop-start, N)
  ids of source examples [start, stop). Returns the path of tokens.npy (process 0), or the
  directory (other processes)."""
  os.makedirs(directory, exist_ok=True)
  meta_path = os.path.join(directory, META)
  meta = {
    "tokenizer": fingerprint,
    "source": source_info,
    "num_examples": int(num_examples),
    "num_tokens": int(fingerprint["grid"][0] * fingerprint["grid"][1]),
    "dtype": token_dtype(fingerprint["codebook_size"]).name,
    "chunk_size": int(chunk_size),
    "complete": False,
  }
  if os.path.exists(meta_path):
    old = read_meta(directory)
    for key in ("tokenizer", "source", "num_examples", "chunk_size"):
      if old.get(key) != meta[key]:
        raise CacheMismatchError(
          f"{directory} holds a cache with a different {key} ({old.get(key)} vs {meta[key]}): "
          "choose another output directory or delete it"
        )
    if old.get("complete"):
      log(f"{directory}: cache already complete")
      return os.path.join(directory, TOKENS)
  elif process_index == 0:
    meta["created"] = time.strftime("%Y-%m-%d %H:%M:%S")
    _atomic_json(meta_path, meta)

  ranges = chunk_ranges(num_examples, chunk_size)
  mine = [r for i, r in enumerate(ranges) if i % process_count == process_index]
  t0, done = time.time(), 0
  for start, stop in mine:
    path = _chunk_name(directory, start, stop)
    if os.path.exists(path):
      continue
    ids = np.asarray(tokenize_chunk(start, stop))
    if ids.shape != (stop - start, meta["num_tokens"]):
      raise ValueError(
        f"tokenizer returned {ids.shape}, expected {(stop - start, meta['num_tokens'])}"
      )
    _atomic_save(path, ids.astype(meta["dtype"]))
    done += stop - start
    rate = done / max(time.time() - t0, 1e-9)
    log(f"tokens for examples [{start}, {stop}) written ({rate:.1f} img/s)")
  if process_index != 0:
    return directory

  deadline = time.time() + wait_timeout_s
  while not all(os.path.exists(_chunk_name(directory, s, e)) for s, e in ranges):
    if time.time() > deadline:
      raise TimeoutError(f"{directory}: other processes' chunks did not appear in time")
    time.sleep(5)
  out = os.path.join(directory, TOKENS)
  tmp = out + ".tmp.npy"
  joined = np.lib.format.open_memmap(
    tmp, mode="w+", dtype=meta["dtype"], shape=(num_examples, meta["num_tokens"])
  )
  for start, stop in ranges:
    joined[start:stop] = np.load(_chunk_name(directory, start, stop))
  joined.flush()
  del joined
  os.replace(tmp, out)
  meta = read_meta(directory)
  meta.update(complete=True, completed=time.strftime("%Y-%m-%d %H:%M:%S"))
  _atomic_json(meta_path, meta)
  for start, stop in ranges:  # only after tokens.npy and the meta are safely in place
    os.remove(_chunk_name(directory, start, stop))
  for leftover in glob.glob(os.path.join(directory, "*.tmp.npy")):
    os.remove(leftover)
  return out


def read_meta(directory: str) -> dict:
  path = os.path.join(directory, META)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{directory} is not a token cache (no {META}); write one with "
      "`python -m mim_jax.tokenize --config=...`"
    )
  with open(path) as f:
    return json.load(f)


class TokenCache:
  """A complete cache, memory-mapped: `cache[i]` -> (num_tokens,) ids of source example i."""

  def __init__(self, directory: str):
    self.directory = directory
    self.meta = read_meta(directory)
    if not self.meta.get("complete"):
      raise CacheMismatchError(
        f"{directory}: the cache is incomplete; re-run the same "
        "`python -m mim_jax.tokenize` command to finish it"
      )
    self.tokens = np.load(os.path.join(directory, TOKENS), mmap_mode="r")

  def __getstate__(self):
    # grain workers get a pickled copy: send the path, not the memory-mapped array.
    return {"directory": self.directory}

  def __setstate__(self, state):
    self.__init__(state["directory"])

  @property
  def view(self) -> View:
    return View.from_dict(self.meta["tokenizer"]["view"])

  @property
  def codebook_size(self) -> int:
    return int(self.meta["tokenizer"]["codebook_size"])

  @property
  def grid(self) -> tuple[int, int]:
    return tuple(self.meta["tokenizer"]["grid"])

  def __len__(self) -> int:
    return self.tokens.shape[0]

  def __getitem__(self, index: int) -> np.ndarray:
    return np.asarray(self.tokens[int(index)], np.int32)

  def check_source(self, source) -> None:
    if len(source) != len(self):
      raise CacheMismatchError(
        f"token cache {self.directory} has {len(self)} examples but the data source "
        f"{source!r} has {len(source)}: it was computed on another split or data set"
      )

  def check_train_view(self, data_cfg: Any) -> None:
    """The student view must cover the cached region: a centre square of the whole short
    side (RandomResizedCrop scale = ratio = (1, 1), MaPeT's setting) with no flip."""
    problems = []
    if tuple(data_cfg.crop_scale) != (1.0, 1.0):
      problems.append(f"config.data.crop_scale={tuple(data_cfg.crop_scale)} (needs (1, 1))")
    if tuple(data_cfg.crop_ratio) != (1.0, 1.0):
      problems.append(f"config.data.crop_ratio={tuple(data_cfg.crop_ratio)} (needs (1, 1))")
    if data_cfg.hflip:
      problems.append("config.data.hflip=True (needs False)")
    if self.view.resize != self.view.size:
      problems.append(
        f"the cache's view crops {self.view.size} of a {self.view.resize} resize, "
        "not the whole short side"
      )
    if problems:
      raise CacheMismatchError(
        f"token cache {self.directory} was computed on a centre crop, so the training view "
        "must be the same region: " + "; ".join(problems)
      )


class RandomTokenCache:
  """A stand-in for a token cache that is not at hand (config.tokenizer.cache='random:' or
  'random:K'): random ids of a K-code tokenizer on the student's grid, the same for an index
  on every read. It gives compile-only dry runs (mim_jax.aot) the batch a real cache gives."""

  def __init__(self, spec: str, grid: tuple[int, int], codebook_size: int = 8192):
    rest = spec[len("random:") :]
    try:
      k = int(rest) if rest else int(codebook_size)
    except ValueError:
      raise CacheMismatchError(
        f"config.tokenizer.cache={spec!r}: a random stand-in is 'random:' or 'random:K'"
      ) from None
    self.directory = spec
    self.grid = (int(grid[0]), int(grid[1]))
    self.codebook_size = k
    n = self.grid[0] * self.grid[1]
    self.meta = {"tokenizer": {"kind": "random", "codebook_size": k, "grid": list(self.grid)}}
    self.num_tokens = n

  def __getitem__(self, index: int) -> np.ndarray:
    rng = np.random.default_rng(int(index))
    return rng.integers(0, self.codebook_size, (self.num_tokens,), dtype=np.int32)

  def check_source(self, source) -> None:
    del source  # any length: ids are drawn per index

  def check_train_view(self, data_cfg: Any) -> None:
    del data_cfg  # no cached region to cover


class WithTokens:
  """A data source whose examples carry their cached tokens (`example['tokens']`)."""

  def __init__(self, source, cache: TokenCache):
    cache.check_source(source)
    self._source, self._cache = source, cache

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    example = dict(self._source[index])
    example["tokens"] = self._cache[int(example.get("index", index))]
    return example

  def describe(self, index: int) -> str:
    """Where example `index` comes from (its file), for bad-data reports."""
    describe = getattr(self._source, "describe", None)
    return describe(index) if describe else f"index {index} of {self._source!r}"

  def __repr__(self) -> str:
    return f"WithTokens({self._source!r}, {self._cache.directory})"
