"""Lloyd's k-means in JAX: chunked distances, segment-sum updates, data-parallel over a mesh.

Built for CCViT's centroid tokenizer (9.8 M x 768 patch vectors, K = 8192,
20 iterations; `Cakeyan/CCViT_Public:train_faiss_kmeans.py`) and reused for the
spherical k-means init of the BEiT v2 quantizer.

* Distances are computed `chunk_size` points at a time inside a `lax.scan`, as
  ||x||^2 - 2 x.c + ||c||^2, so an N x K matrix never exists.
* The update is one `segment_sum` over all points (a one-hot matmul measured
  slower).
* With a mesh, points are sharded over one mesh axis; each device computes
  partial sums / counts / inertia for its shard and these are psum-ed
  (`jax.shard_map`). Rows added to make the point count divisible by the number
  of devices are sent to segment id K, which `segment_sum` drops, and are left
  out of the inertia.
* `assign` inside a step jitted under a mesh (`jax.set_mesh`) runs on each device's own
  rows (`jax.shard_map` over every mesh axis). Left to the partitioner, the chunk loop's
  slices of a batch-sharded array made every device gather all rows and tokenise the whole
  global batch (BENCHMARKS.md §10, "What the step computes that the method does not need").
* Empty clusters keep their previous centroid (faiss instead splits a big
  cluster, scikit-learn moves far points). `reseed_empty=True` instead moves
  them onto the points farthest from their current centroid.
* Init: K distinct rows drawn with a JAX PRNG key (like faiss's default
  random init; k-means++ is too slow at this scale), or an explicit array.
  Real patches repeat (flat or saturated regions), so a random init can hold
  equal centroids, and all but one of them then start empty.
"""

import functools
import time
from typing import Callable, NamedTuple, Optional

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from mim_jax import reductions

DEFAULT_CHUNK_SIZE = 4096
# `reseed_empty` moves at most this many empty clusters per iteration (the rest
# keep their centroid and are re-seeded in later iterations); it bounds the
# top_k over each shard's distances.
MAX_RESEED_PER_ITERATION = 1024


class KMeansResult(NamedTuple):
  """Output of `fit`.

  centroids: (K, D) float32, replicated when a mesh was used.
  inertia_history: (iters + 1,) float64; entry i is the sum of squared
    distances of the points to their nearest centroid after i updates, so [0]
    is the init's inertia and [-1] the inertia of the returned centroids (like
    scikit-learn's `inertia_`).
  counts: (K,) int64 cluster sizes for the returned centroids.
  """

  centroids: jax.Array
  inertia_history: np.ndarray
  counts: np.ndarray


def _sq_distances_to_nearest(
  x: jax.Array, centroids: jax.Array, centroid_sq: jax.Array, bf16_matmul: bool
) -> tuple[jax.Array, jax.Array]:
  """Nearest centroid ids (int32) and squared L2 distances for a block of rows."""
  if bf16_matmul:
    dots = jnp.dot(
      x.astype(jnp.bfloat16), centroids.astype(jnp.bfloat16).T, preferred_element_type=jnp.float32
    )
  else:
    # HIGHEST keeps accelerators from silently running the f32 matmul in bf16/tf32.
    dots = jnp.dot(x, centroids.T, precision=lax.Precision.HIGHEST)
  # ||x||^2 is constant per row, so the argmin only needs ||c||^2 - 2 x.c.
  partial_dist = centroid_sq[None, :] - 2.0 * dots
  ids = reductions.argmin(partial_dist)  # jnp.argmin's index, several times faster on CPU
  best = jnp.take_along_axis(partial_dist, ids[:, None], axis=1)[:, 0]
  sq_dist = jnp.maximum(jnp.sum(x * x, axis=1) + best, 0.0)
  return ids, sq_dist


def _assign_rows(
  points: jax.Array, centroids: jax.Array, *, chunk_size: int, bf16_matmul: bool
) -> tuple[jax.Array, jax.Array]:
  """`_sq_distances_to_nearest` over (n, D) rows, `chunk_size` rows at a time."""
  n = points.shape[0]
  chunk = max(1, min(chunk_size, n))
  num_full, remainder = divmod(n, chunk)
  centroid_sq = jnp.sum(centroids * centroids, axis=1)
  nearest = functools.partial(
    _sq_distances_to_nearest, centroids=centroids, centroid_sq=centroid_sq, bf16_matmul=bf16_matmul
  )

  def one_chunk(_, index):
    # dynamic_slice reads the chunk in place; reshaping the whole array into
    # chunks could copy it when n is not a multiple of the chunk size.
    return None, nearest(lax.dynamic_slice_in_dim(points, index * chunk, chunk))

  ids_parts, dist_parts = [], []
  if num_full:
    _, (ids, dist) = lax.scan(one_chunk, None, jnp.arange(num_full))
    ids_parts.append(ids.reshape(-1))
    dist_parts.append(dist.reshape(-1))
  if remainder:
    ids, dist = nearest(points[num_full * chunk :])
    ids_parts.append(ids)
    dist_parts.append(dist)
  if len(ids_parts) == 1:
    return ids_parts[0], dist_parts[0]
  return jnp.concatenate(ids_parts), jnp.concatenate(dist_parts)


@functools.partial(jax.jit, static_argnames=("chunk_size", "return_distances", "bf16_matmul"))
def assign(
  points: jax.Array,
  centroids: jax.Array,
  chunk_size: int = DEFAULT_CHUNK_SIZE,
  return_distances: bool = False,
  bf16_matmul: bool = False,
):
  """Nearest-centroid ids (squared L2) for points of shape (..., D).

  Args:
    points: (..., D) array; any leading shape (e.g. (B, N, D) patches).
    centroids: (K, D).
    chunk_size: rows compared against all K centroids at a time.
    return_distances: also return the squared distances to the chosen centroid.
    bf16_matmul: run the x.c matmul in bfloat16 (f32 accumulation).

  Returns:
    int32 ids of shape (...), and float32 squared distances if asked for.
  """
  points = jnp.asarray(points, jnp.float32)
  centroids = jnp.asarray(centroids, jnp.float32)
  lead_shape = points.shape[:-1]
  rows = points.reshape(-1, points.shape[-1])
  assign_rows = functools.partial(_assign_rows, chunk_size=chunk_size, bf16_matmul=bf16_matmul)
  ids, dist = _on_local_rows(assign_rows, rows.shape[0])(rows, centroids)
  ids = ids.reshape(lead_shape)
  if return_distances:
    return ids, dist.reshape(lead_shape)
  return ids


def _on_local_rows(assign_rows: Callable, num_rows: int) -> Callable:
  """`assign_rows(rows, centroids)` on each device's block of rows when a mesh of more than
  one device is active (`jax.set_mesh`) and divides the rows; as it is otherwise."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or num_rows % mesh.size:
    return assign_rows
  rows = P(mesh.axis_names)  # rows split over every device; the centroids replicated
  return jax.shard_map(assign_rows, in_specs=(rows, P()), out_specs=(rows, rows), check_vma=False)


def _l2_normalize(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _shard_step(
  points, centroids, num_valid, *, axis_name, chunk_size, spherical, bf16_matmul, num_reseed
):
  """One Lloyd iteration on this device's rows; reductions over `axis_name`.

  Returns the updated centroids plus the inertia and counts of the assignment
  to the *incoming* centroids.
  """
  num_local, k = points.shape[0], centroids.shape[0]
  offset = 0 if axis_name is None else lax.axis_index(axis_name) * num_local
  valid = offset + jnp.arange(num_local) < num_valid

  ids, sq_dist = _assign_rows(points, centroids, chunk_size=chunk_size, bf16_matmul=bf16_matmul)
  ids = jnp.where(valid, ids, k)  # id K is out of range: segment_sum drops it
  sq_dist = jnp.where(valid, sq_dist, 0.0)
  sums = jax.ops.segment_sum(points, ids, num_segments=k)
  counts = jax.ops.segment_sum(jnp.ones_like(ids), ids, num_segments=k)
  inertia = jnp.sum(sq_dist)
  if axis_name is not None:
    sums, counts, inertia = lax.psum((sums, counts, inertia), axis_name)

  nonempty = counts > 0
  means = sums / jnp.maximum(counts, 1).astype(jnp.float32)[:, None]
  if spherical:
    means = _l2_normalize(means)
  new_centroids = jnp.where(nonempty[:, None], means, centroids)

  if num_reseed:
    # Candidates: the farthest valid points of every shard, then the global top.
    far_dist, far_rows = lax.top_k(jnp.where(valid, sq_dist, -1.0), num_reseed)
    far_points = points[far_rows]
    if axis_name is not None:
      # A psum of per-device slots gathers the candidates as a replicated value
      # (all_gather's result is not known to be replicated by shard_map).
      shard = lax.axis_index(axis_name)
      num_shards = lax.axis_size(axis_name)
      far_dist = lax.psum(
        jnp.zeros((num_shards, num_reseed)).at[shard].set(far_dist), axis_name
      ).reshape(-1)
      far_points = lax.psum(
        jnp.zeros((num_shards,) + far_points.shape).at[shard].set(far_points), axis_name
      ).reshape(-1, far_points.shape[-1])
      far_dist, order = lax.top_k(far_dist, num_reseed)
      far_points = far_points[order]
    # The r-th empty cluster takes the r-th farthest point (if it has one).
    rank = jnp.cumsum(~nonempty) - 1
    take = ~nonempty & (rank < num_reseed)
    rank = jnp.clip(rank, 0, num_reseed - 1)
    take = take & (far_dist[rank] > 0.0)
    new_centroids = jnp.where(take[:, None], far_points[rank], new_centroids)
  return new_centroids, inertia, counts


@functools.lru_cache(maxsize=32)
def _build_step(
  mesh: Optional[Mesh],
  axis_name,
  chunk_size: int,
  spherical: bool,
  bf16_matmul: bool,
  num_reseed: int,
):
  """The jitted step for one configuration (cached so repeated fits reuse it)."""
  step = functools.partial(
    _shard_step,
    axis_name=axis_name if mesh is not None else None,
    chunk_size=chunk_size,
    spherical=spherical,
    bf16_matmul=bf16_matmul,
    num_reseed=num_reseed,
  )
  if mesh is None:
    return jax.jit(step)
  step = jax.shard_map(
    step, mesh=mesh, in_specs=(P(axis_name), P(), P()), out_specs=(P(), P(), P())
  )
  return jax.jit(step, out_shardings=NamedSharding(mesh, P()))


def _place_points(
  points, mesh: Optional[Mesh], axis_name, spherical: bool
) -> tuple[jax.Array, int]:
  """Points as float32 on device (row-sharded over `axis_name` with a mesh).

  With a mesh the row count is padded up to a multiple of the axis size. A
  numpy input is copied shard by shard, so the host never holds a second full
  copy (the CCViT set is ~30 GB in float32).
  """
  num_points, dim = points.shape
  if mesh is None:
    placed = jnp.asarray(points, jnp.float32)
  else:
    num_shards = mesh.shape[axis_name]
    padded_rows = -(-num_points // num_shards) * num_shards
    sharding = NamedSharding(mesh, P(axis_name))
    if isinstance(points, np.ndarray):

      def shard_rows(index):
        rows = index[0]
        start, stop = rows.start or 0, padded_rows if rows.stop is None else rows.stop
        block = np.asarray(points[start : min(stop, num_points)], np.float32)
        missing = (stop - start) - block.shape[0]
        if missing:
          block = np.concatenate([block, np.zeros((missing, dim), np.float32)])
        return block

      placed = jax.make_array_from_callback((padded_rows, dim), sharding, shard_rows)
    else:
      placed = jnp.asarray(points, jnp.float32)
      if padded_rows != num_points:
        placed = jnp.pad(placed, ((0, padded_rows - num_points), (0, 0)))
      placed = jax.device_put(placed, sharding)
  if spherical:
    # One normalised copy: spherical mode is for small sets (a batch of codes).
    placed = jax.jit(_l2_normalize)(placed)
  return placed, num_points


def random_init(points, k: int, seed: int = 0) -> jax.Array:
  """K distinct rows of `points`, drawn with `jax.random.key(seed)`."""
  num_points = points.shape[0]
  if k > num_points:
    raise ValueError(f"k={k} exceeds the number of points ({num_points})")
  rows = np.asarray(jax.random.choice(jax.random.key(seed), num_points, (k,), replace=False))
  if isinstance(points, np.ndarray):
    return jnp.asarray(points[rows], jnp.float32)
  return jnp.take(jnp.asarray(points, jnp.float32), jnp.asarray(rows), axis=0)


def fit(
  points,
  k: int,
  *,
  iters: int = 20,
  seed: int = 0,
  chunk_size: int = DEFAULT_CHUNK_SIZE,
  mesh: Optional[Mesh] = None,
  axis_name=None,
  init=None,
  spherical: bool = False,
  reseed_empty: bool = False,
  bf16_matmul: bool = False,
  callback: Optional[Callable[[int, float, float], None]] = None,
) -> KMeansResult:
  """Lloyd's k-means.

  Args:
    points: (N, D) numpy or JAX array (converted to float32).
    k: number of clusters.
    iters: number of Lloyd updates (faiss `niter`; no early stop).
    seed: PRNG seed of the random init (ignored when `init` is given).
    chunk_size: points per distance block; memory is ~chunk_size * K floats.
    mesh: shard the points over this mesh (None: default device only).
    axis_name: the mesh axis to shard over; None takes the mesh's only axis.
    init: optional (K, D) initial centroids.
    spherical: l2-normalise points, assign by cosine (== squared L2 on the unit
      sphere) and re-normalise the means. Inertia is then sum(2 - 2 cos).
    reseed_empty: move empty clusters onto the points farthest from their
      centroids (the r-th empty cluster onto the r-th farthest point, at most
      MAX_RESEED_PER_ITERATION per iteration) instead of keeping them.
    bf16_matmul: bfloat16 distance matmul (float32 accumulation).
    callback: called as callback(iteration, inertia, seconds_since_start) after
      every assignment pass; iteration 0 is the init, `iters` the final pass.

  Returns:
    KMeansResult.
  """
  if getattr(points, "ndim", None) != 2:
    raise ValueError(
      f"points must be a 2-D (N, D) array, got shape {getattr(points, 'shape', None)}"
    )
  num_points, dim = points.shape
  if not 1 <= k <= num_points:
    raise ValueError(f"k={k} must lie in [1, number of points={num_points}]")
  if iters < 0:
    raise ValueError(f"iters={iters} must be non-negative")
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size} must be positive")
  if mesh is not None:
    if axis_name is None:
      if len(mesh.axis_names) != 1:
        raise ValueError(f"mesh has axes {mesh.axis_names}: pass axis_name to pick the data axis")
      axis_name = mesh.axis_names[0]
    elif axis_name not in mesh.axis_names:
      raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh {mesh.axis_names}")

  start = time.perf_counter()
  if init is None:
    centroids = random_init(points, k, seed)
  else:
    centroids = jnp.asarray(init, jnp.float32)
    if centroids.shape != (k, dim):
      raise ValueError(f"init has shape {centroids.shape}, expected (k, D) = {(k, dim)}")
  if spherical:
    centroids = _l2_normalize(centroids)
  placed, num_valid = _place_points(points, mesh, axis_name, spherical)
  if mesh is not None:
    centroids = jax.device_put(centroids, NamedSharding(mesh, P()))
    num_local = placed.shape[0] // mesh.shape[axis_name]
  else:
    num_local = num_points
  num_reseed = min(k, num_local, MAX_RESEED_PER_ITERATION) if reseed_empty else 0
  step = _build_step(
    mesh, axis_name, int(chunk_size), bool(spherical), bool(bf16_matmul), num_reseed
  )
  num_valid = jnp.int32(num_valid)

  history = []
  for iteration in range(iters + 1):
    # The last pass only measures the returned centroids; its update is dropped.
    updated, inertia, counts = step(placed, centroids, num_valid)
    history.append(float(inertia))
    if callback is not None:
      callback(iteration, history[-1], time.perf_counter() - start)
    if iteration < iters:
      centroids = updated
  return KMeansResult(
    centroids=centroids,
    inertia_history=np.asarray(history, np.float64),
    counts=np.asarray(counts, np.int64),
  )
