"""Vector quantizers with EMA codebooks (BEiT v2 VQ-KD and VQ-VAE-2 / PeCo style).

Both are pure-functional Flax Linen modules. The codebook and its statistics live in
the mutable **'codebook'** collection, never in 'params', so the optimizer never sees
them; the EMA update replaces a codebook loss (`microsoft/unilm:beit2/norm_ema_quantizer.py`,
microsoft/unilm issue #1290; docs/reference_details.md#vq-kd-quantizer).

Usage::

    q = NormEMAQuantizer(num_codes=8192, dim=32)
    variables = q.init(rng, z, train=False)              # {'codebook': {...}}
    out, new = q.apply(variables, z, train=True, mutable=['codebook'])
    out.z_q, out.loss, out.ids, out.metrics              # QuantizerOutput

The codebook changes only when `train=True`, the 'codebook' collection is mutable and
the module is not initialising (`init` never runs the k-means init on its dummy
batch). At eval nothing changes (the reference EMA-updates its usage buffer even in
eval mode, `norm_ema_quantizer.py` `if not self.training`; we do not: the buffer
only serves logging).

Collection variables (all replicated, fp32 unless said otherwise):

* NormEMAQuantizer: `embedding` (K, D) l2-normalised codes; `cluster_size` (K,)
  EMA of per-batch code counts (usage logging and dead-code detection only);
  `initted` () bool.
* EMAQuantizer: `embedding` (K, D); `cluster_size` (K,) and `embed_avg` (K, D),
  the EMA statistics the codes are computed from; `initted` () bool.

Multi-device: under the trainer's plain `jax.jit` over global arrays (batch sharded
on 'data'), every reduction over the batch is already global (GSPMD inserts the
all-reduces), so leave `axis_name=None`. Inside `jax.shard_map` / `jax.pmap` the
module sees only its shard: set `axis_name` to the mapped axis and counts, sums and
random row samples are combined with `lax.psum`. Both give the same codebook on
every device. The commitment `loss` is a mean over the rows this call sees (the
local shard under shard_map / pmap: average it like any other per-device loss).

Memory: the assignment forms the (rows, K) fp32 distance matrix of the rows a device
holds (VQ-KD: 12.5k x 8192 = 400 MB per device at 64 images x 196 tokens, as in the
reference); under GSPMD the compiled step all-reduces only (K,)/(K, D) statistics.

Released BEiT v2 tokenizers map as `quantize.embedding.weight` -> `embedding`,
`quantize.cluster_size` -> `cluster_size`, `quantize.embedding.initted` -> `initted`
(the reference resets its usage buffer every epoch; we never reset it). Before the
k-means init (`initted` False) the codes are zeros and every row gets id 0.

Randomness (k-means init sample, dead-code restart sample): from the rng stream
'codebook' when the caller passes one (`rngs={'codebook': key}`), else from the
fixed key `PRNGKey(seed)`; the init uses `fold_in(key, 0)` and the restart
`fold_in(key, 1)`. Without a 'codebook' stream the restart therefore draws the same
row positions every step (from a different batch); pass a per-step key to vary them.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from mim_jax import reductions

# Matmuls on the (N, D) x (D, K) path run at full fp32 precision: accelerators would
# otherwise use bf16/tf32 passes, and a changed argmin changes the whole update.
_HIGHEST = lax.Precision.HIGHEST
# A re-seeded code's EMA count is set to this ("seen once"), so it is not declared
# dead again before it had a chance to be used (~690 steps at decay 0.99, threshold 1e-3).
RESTART_CLUSTER_SIZE = 1.0


class QuantizerOutput(NamedTuple):
  """z_q: straight-through codes (fp32, z's shape); loss: scalar fp32 commitment loss;
  ids: int32 code ids of shape z.shape[:-1]; metrics: dict of fp32 scalars."""

  z_q: jax.Array
  loss: jax.Array
  ids: jax.Array
  metrics: dict


def l2norm(x: jax.Array) -> jax.Array:
  """x / max(||x||, 1e-12) over the last axis (torch F.normalize)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def sample_row_indices(key: jax.Array, num_rows: int, num_samples: int) -> jax.Array:
  """Row indices of a random sample: without replacement when there are enough rows
  (reference `sample_vectors`: randperm[:num]), else with replacement (randint)."""
  if num_rows >= num_samples:
    return jax.random.permutation(key, num_rows)[:num_samples].astype(jnp.int32)
  return jax.random.randint(key, (num_samples,), 0, num_rows, dtype=jnp.int32)


def _global_rows(flat: jax.Array, axis_name) -> int:
  return flat.shape[0] * (1 if axis_name is None else lax.axis_size(axis_name))


def gather_rows(flat: jax.Array, indices: jax.Array, axis_name=None) -> jax.Array:
  """Rows `indices` of the global (N, D) batch, replicated on every device.

  With `axis_name` each device holds a contiguous block of rows (shard_map / pmap
  order); every device fills the rows it owns and a psum assembles them, which
  shard_map also knows to be replicated (an all_gather result is not).
  """
  if axis_name is None:
    return flat[indices]
  num_local = flat.shape[0]
  local = indices - lax.axis_index(axis_name) * num_local
  owned = (local >= 0) & (local < num_local)
  rows = jnp.where(owned[:, None], flat[jnp.clip(local, 0, num_local - 1)], 0.0)
  return lax.psum(rows, axis_name)


def _psum(x, axis_name):
  return x if axis_name is None else lax.psum(x, axis_name)


def code_counts(ids: jax.Array, num_codes: int, axis_name=None) -> jax.Array:
  """Per-code counts (K,) fp32, summed over devices (reference `bins`)."""
  counts = jax.ops.segment_sum(jnp.ones(ids.shape, jnp.float32), ids, num_segments=num_codes)
  return _psum(counts, axis_name)


def code_sums(flat: jax.Array, ids: jax.Array, num_codes: int, axis_name=None) -> jax.Array:
  """Per-code sums of the assigned rows (K, D), summed over devices (`embed_sum`).

  segment_sum instead of the reference's one-hot matmul: an (N, K) one-hot of a
  VQ-KD batch (100k x 8192) would take gigabytes.
  """
  return _psum(jax.ops.segment_sum(flat, ids, num_segments=num_codes), axis_name)


def nearest_codes(flat: jax.Array, codebook: jax.Array) -> jax.Array:
  """argmin_k ||z - w_k||^2 computed as ||z||^2 + ||w||^2 - 2 z.w (reference
  `norm_ema_quantizer.py` forward; first index on ties); int32 (N,)."""
  dist = (
    jnp.sum(flat * flat, axis=1, keepdims=True)
    + jnp.sum(codebook * codebook, axis=1)
    - 2.0 * jnp.dot(flat, codebook.T, precision=_HIGHEST)
  )
  return reductions.argmin(dist)


def kmeans(
  samples: jax.Array, means: jax.Array, num_iters: int, *, spherical: bool, axis_name=None
) -> jax.Array:
  """Lloyd iterations from `means` (reference `kmeans`, norm_ema_quantizer.py).

  spherical: assign by maximum dot product and l2-normalise the new means (the
  BEiT v2 init, `use_cosine_sim=True`); else assign by squared L2. Empty clusters
  keep their previous mean. With `axis_name`, `samples` is this device's shard and
  counts/sums are psum-ed, so every device gets the k-means of the global rows.
  """
  num_codes = means.shape[0]

  def one_iteration(_, means):
    if spherical:
      buckets = jnp.argmax(jnp.dot(samples, means.T, precision=_HIGHEST), axis=1)
    else:
      buckets = nearest_codes(samples, means)
    buckets = buckets.astype(jnp.int32)
    counts = code_counts(buckets, num_codes, axis_name)
    sums = code_sums(samples, buckets, num_codes, axis_name)
    new_means = sums / jnp.maximum(counts, 1.0)[:, None]
    if spherical:
      new_means = l2norm(new_means)
    return jnp.where((counts == 0)[:, None], means, new_means)

  return lax.fori_loop(0, num_iters, one_iteration, means)


def usage_metrics(counts: jax.Array, cluster_size: jax.Array, active_threshold: float) -> dict:
  """codebook_perplexity: exp(entropy) of this batch's code histogram (1 .. K);
  codebook_used: codes used in this batch; codebook_active: codes whose EMA count
  is >= active_threshold (with decay 0.99 and threshold 1e-3, a code used once
  stays active ~230 steps; the reference logs codes with a zero count instead)."""
  p = counts / jnp.maximum(jnp.sum(counts), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return dict(
    codebook_perplexity=jnp.exp(entropy),
    codebook_used=jnp.sum(counts > 0).astype(jnp.float32),
    codebook_active=jnp.sum(cluster_size >= active_threshold).astype(jnp.float32),
  )


def straight_through(z: jax.Array, z_q: jax.Array, beta: float) -> tuple[jax.Array, jax.Array]:
  """(z + sg(z_q - z), beta * mean((sg(z_q) - z)^2)): commitment loss only."""
  z_q = lax.stop_gradient(z_q)
  loss = beta * jnp.mean(jnp.square(z_q - z))
  return z + lax.stop_gradient(z_q - z), loss


class _EMAQuantizerBase(nn.Module):
  """Shared plumbing; subclasses declare the dataclass fields and `_init_codebook`."""

  def _check_input(self, z: jax.Array) -> jax.Array:
    if z.ndim < 1 or z.shape[-1] != self.dim:
      raise ValueError(
        f"{type(self).__name__}: input has shape {z.shape}, the last axis must be dim={self.dim}"
      )
    if not 0.0 <= self.decay < 1.0:
      raise ValueError(f"{type(self).__name__}: decay={self.decay} must lie in [0, 1)")
    return z.astype(jnp.float32)

  def _declare_common(self, init_embedding, init_cluster_size: float):
    self.embedding = self.variable("codebook", "embedding", init_embedding)
    self.cluster_size = self.variable(
      "codebook", "cluster_size", jnp.full, (self.num_codes,), init_cluster_size, jnp.float32
    )
    self.initted = self.variable(
      "codebook", "initted", lambda: jnp.asarray(not self.kmeans_init, jnp.bool_)
    )

  def _base_key(self) -> jax.Array:
    if self.has_rng("codebook"):
      return self.make_rng("codebook")
    return jax.random.PRNGKey(self.seed)

  def _updating(self, train: bool) -> bool:
    if not isinstance(train, (bool, int)):
      raise TypeError(
        f"{type(self).__name__}: train must be a Python bool (static), got {type(train).__name__}"
      )
    return bool(train) and self.is_mutable_collection("codebook") and not self.is_initializing()

  def _maybe_kmeans_init(self, flat: jax.Array, key: jax.Array, spherical: bool) -> jax.Array:
    """The k-means init on the first training batch, inside a lax.cond on `initted`
    so one compiled step serves the first and all later steps. Runs on the *global*
    batch (the official code runs it per GPU on the local batch and never syncs, so its
    ranks start from different codebooks: "Multi-GPU subtlety" in
    docs/reference_details.md#vq-kd-quantizer)."""
    codebook = self.embedding.value
    if not self.kmeans_init:
      return codebook

    def run_kmeans():
      rows = sample_row_indices(key, _global_rows(flat, self.axis_name), self.num_codes)
      start = gather_rows(flat, rows, self.axis_name)
      return kmeans(flat, start, self.kmeans_iters, spherical=spherical, axis_name=self.axis_name)

    codebook = lax.cond(self.initted.value, lambda: codebook, run_kmeans)
    self.initted.value = jnp.asarray(True)
    return codebook

  def _restart_sample(self, flat: jax.Array, key: jax.Array) -> jax.Array:
    """One random batch row per code (K, D), identical on every device."""
    rows = sample_row_indices(key, _global_rows(flat, self.axis_name), self.num_codes)
    return gather_rows(flat, rows, self.axis_name)

  def lookup(self, ids: jax.Array) -> jax.Array:
    """Code vectors (fp32) for int ids of any shape -> ids.shape + (dim,)."""
    return jnp.take(self.embedding.value, jnp.asarray(ids, jnp.int32), axis=0)


class NormEMAQuantizer(_EMAQuantizerBase):
  """BEiT v2 `NormEMAVectorQuantizer` (`microsoft/unilm:beit2/norm_ema_quantizer.py`).

  z is l2-normalised (last axis) and matched to l2-normalised codes by squared L2
  (== max cosine). Training update, after the lookup of z_q with the old codes:
  counts and sums of the assigned rows (global), per-code mean l2-normalised,
  w <- l2norm(decay w + (1 - decay) mean) for codes used in this batch; unused codes
  keep their vector (the reference gets the same via l2norm(w) = w, up to rounding).
  `cluster_size` is an EMA of the counts with the same decay, for logging only.

  Attributes:
    num_codes, dim: codebook shape (K, D).
    decay: EMA decay. beta: commitment loss weight (1.0 in VQ-KD).
    kmeans_init: start from zeros and run spherical k-means (kmeans_iters, dot
      product assignment) on the first training batch; else random normal codes,
      l2-normalised (reference `kmeans_init=False`), from the 'params' init rng.
    axis_name: None under jit/GSPMD; the shard_map / pmap axis otherwise.
    restart_dead_codes: re-seed codes whose EMA count falls below
      `dead_code_threshold` with random (normalised) batch rows; off in the
      reference. active_threshold: EMA count for `codebook_active`.
    seed: fixed key for the init / restart samples when no 'codebook' rng is given.
  """

  num_codes: int
  dim: int
  decay: float = 0.99
  beta: float = 1.0
  kmeans_init: bool = True
  kmeans_iters: int = 10
  axis_name: Optional[Any] = None
  restart_dead_codes: bool = False
  dead_code_threshold: float = 1e-3
  active_threshold: float = 1e-3
  seed: int = 0

  def setup(self):
    def init_embedding():
      if self.kmeans_init:  # reference: zeros until the first batch initialises them
        return jnp.zeros((self.num_codes, self.dim), jnp.float32)
      return l2norm(
        jax.random.normal(self.make_rng("params"), (self.num_codes, self.dim), jnp.float32)
      )

    self._declare_common(init_embedding, init_cluster_size=0.0)

  def __call__(self, z: jax.Array, *, train: bool) -> QuantizerOutput:
    z = l2norm(self._check_input(z))
    flat = lax.stop_gradient(z.reshape(-1, self.dim))  # statistics carry no gradient
    update = self._updating(train)
    key = self._base_key() if update else None

    codebook = (
      self._maybe_kmeans_init(flat, jax.random.fold_in(key, 0), spherical=True)
      if update
      else self.embedding.value
    )
    ids = nearest_codes(flat, codebook)
    z_q = codebook[ids]  # looked up before the EMA update, as in the reference
    counts = code_counts(ids, self.num_codes, self.axis_name)
    cluster_size = self.cluster_size.value

    if update:
      d = self.decay
      sums = code_sums(flat, ids, self.num_codes, self.axis_name)
      cluster_size = d * cluster_size + (1.0 - d) * counts
      unused = (counts == 0)[:, None]
      means = l2norm(sums / jnp.maximum(counts, 1.0)[:, None])
      new_codebook = jnp.where(unused, codebook, l2norm(d * codebook + (1.0 - d) * means))
      if self.restart_dead_codes:
        dead = cluster_size < self.dead_code_threshold
        fresh = l2norm(self._restart_sample(flat, jax.random.fold_in(key, 1)))
        new_codebook = jnp.where(dead[:, None], fresh, new_codebook)
        cluster_size = jnp.where(dead, RESTART_CLUSTER_SIZE, cluster_size)
      self.embedding.value = new_codebook
      self.cluster_size.value = cluster_size

    z_q, loss = straight_through(z, z_q.reshape(z.shape), self.beta)
    metrics = usage_metrics(counts, cluster_size, self.active_threshold)
    return QuantizerOutput(z_q, loss, ids.reshape(z.shape[:-1]), metrics)


class EMAQuantizer(_EMAQuantizerBase):
  """VQ-VAE(-2) quantizer with EMA codebook updates (PeCo: "exponential moving
  averages ... to update the codebook", beta = 0.25; the PeCo code is unavailable,
  docs/reference_details.md#peco, so this follows VQ-VAE-2 / sonnet `VectorQuantizerEMA`
  and the BEiT v2 `EmbeddingEMA.weight_update`).

  Training update (after the lookup of z_q with the old codes):
    cluster_size <- decay cluster_size + (1 - decay) counts
    embed_avg    <- decay embed_avg    + (1 - decay) sums
    n_i = (cluster_size_i + eps) / (n + K eps) * n,  n = sum(cluster_size)  (Laplace)
    w_i = embed_avg_i / n_i
  Init: codes ~ N(0, 1) (sonnet `VectorQuantizerEMA`, rosinality's VQ-VAE-2),
  embed_avg = codes and cluster_size = 1, i.e. a consistent state (n_i = 1, so
  w = embed_avg) as if every code had been seen once at its initial value (as in
  lucidrains' vector-quantize-pytorch). rosinality's cluster_size = 0 with
  embed_avg = codes would instead throw every code to ~w0 / ((1 - decay) count_i),
  or ~w0 / eps if unused, at the first update; with cluster_size = 1 no code
  counts as dead (or inactive) for the first ~690 steps at decay 0.99.
  kmeans_init (off by default, not in the reference) replaces the initial codes and
  embed_avg by Euclidean k-means of the first training batch.
  Attributes as NormEMAQuantizer, plus eps (Laplace smoothing).
  """

  num_codes: int
  dim: int
  decay: float = 0.99
  beta: float = 0.25
  eps: float = 1e-5
  axis_name: Optional[Any] = None
  restart_dead_codes: bool = False
  kmeans_init: bool = False
  kmeans_iters: int = 10
  dead_code_threshold: float = 1e-3
  active_threshold: float = 1e-3
  seed: int = 0

  def setup(self):
    def init_embedding():
      return jax.random.normal(self.make_rng("params"), (self.num_codes, self.dim), jnp.float32)

    self._declare_common(init_embedding, init_cluster_size=1.0)
    self.embed_avg = self.variable("codebook", "embed_avg", lambda: self.embedding.value)

  def __call__(self, z: jax.Array, *, train: bool) -> QuantizerOutput:
    z = self._check_input(z)
    flat = lax.stop_gradient(z.reshape(-1, self.dim))
    update = self._updating(train)
    key = self._base_key() if update else None

    codebook = self.embedding.value
    embed_avg = self.embed_avg.value
    if update and self.kmeans_init:
      was_initted = self.initted.value
      codebook = self._maybe_kmeans_init(flat, jax.random.fold_in(key, 0), spherical=False)
      embed_avg = jnp.where(was_initted, embed_avg, codebook)
    ids = nearest_codes(flat, codebook)
    z_q = codebook[ids]
    counts = code_counts(ids, self.num_codes, self.axis_name)
    cluster_size = self.cluster_size.value

    if update:
      d = self.decay
      sums = code_sums(flat, ids, self.num_codes, self.axis_name)
      cluster_size = d * cluster_size + (1.0 - d) * counts
      embed_avg = d * embed_avg + (1.0 - d) * sums
      new_codebook = embed_avg / laplace_smoothed(cluster_size, self.eps)[:, None]
      if self.restart_dead_codes:
        # After the live codes are computed, so that a restart moves only dead codes.
        dead = cluster_size < self.dead_code_threshold
        fresh = self._restart_sample(flat, jax.random.fold_in(key, 1))
        new_codebook = jnp.where(dead[:, None], fresh, new_codebook)
        # "Seen once at the sampled row": the next step's recompute gives ~fresh again.
        cluster_size = jnp.where(dead, RESTART_CLUSTER_SIZE, cluster_size)
        embed_avg = jnp.where(dead[:, None], RESTART_CLUSTER_SIZE * fresh, embed_avg)
      self.embedding.value = new_codebook
      self.embed_avg.value = embed_avg
      self.cluster_size.value = cluster_size

    z_q, loss = straight_through(z, z_q.reshape(z.shape), self.beta)
    metrics = usage_metrics(counts, cluster_size, self.active_threshold)
    return QuantizerOutput(z_q, loss, ids.reshape(z.shape[:-1]), metrics)


def laplace_smoothed(cluster_size: jax.Array, eps: float) -> jax.Array:
  """n_i = (N_i + eps) / (n + K eps) * n with n = sum_i N_i (VQ-VAE-2 / sonnet)."""
  n = jnp.sum(cluster_size)
  return (cluster_size + eps) / (n + cluster_size.shape[0] * eps) * n
