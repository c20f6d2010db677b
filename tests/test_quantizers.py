"""EMA vector quantizers vs NumPy re-derivations of the reference updates.

NormEMAQuantizer follows `microsoft/unilm:beit2/norm_ema_quantizer.py`
(docs/reference_details.md#vq-kd-quantizer), EMAQuantizer the VQ-VAE-2 / sonnet EMA update
with Laplace smoothing. The NumPy versions below are written from those formulas in float64.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from mim_jax import config_lib
from mim_jax import quantizers as Q
from mim_jax import sharding

K, D = 16, 8
ATOL = 1e-6


# --------------------------------------------------------------------------- NumPy
def np_l2n(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_assign(flat, w):
  dist = (flat**2).sum(1, keepdims=True) + (w**2).sum(1) - 2.0 * flat @ w.T
  return dist.argmin(1)


def np_counts_sums(flat, ids, k):
  sums = np.zeros((k, flat.shape[1]))
  np.add.at(sums, ids, flat)
  return np.bincount(ids, minlength=k).astype(np.float64), sums


def np_norm_ema_step(state, z, decay=0.99, beta=1.0):
  """One training forward of the reference NormEMAVectorQuantizer (k-means done)."""
  w, cs = state["embedding"], state["cluster_size"]
  zn = np_l2n(np.asarray(z, np.float64))
  flat = zn.reshape(-1, w.shape[1])
  ids = np_assign(flat, w)
  loss = beta * np.mean((w[ids] - flat) ** 2)
  counts, sums = np_counts_sums(flat, ids, w.shape[0])
  means = np_l2n(sums / np.maximum(counts, 1.0)[:, None])
  new_w = np.where((counts == 0)[:, None], w, np_l2n(decay * w + (1 - decay) * means))
  return dict(embedding=new_w, cluster_size=decay * cs + (1 - decay) * counts), ids, loss


def np_ema_step(state, z, decay=0.99, beta=0.25, eps=1e-5):
  """One training forward of a VQ-VAE EMA quantizer with Laplace smoothing."""
  w, cs, ea = state["embedding"], state["cluster_size"], state["embed_avg"]
  flat = np.asarray(z, np.float64).reshape(-1, w.shape[1])
  ids = np_assign(flat, w)
  loss = beta * np.mean((w[ids] - flat) ** 2)
  counts, sums = np_counts_sums(flat, ids, w.shape[0])
  cs = decay * cs + (1 - decay) * counts
  ea = decay * ea + (1 - decay) * sums
  n = cs.sum()
  smoothed = (cs + eps) / (n + len(cs) * eps) * n
  return dict(embedding=ea / smoothed[:, None], cluster_size=cs, embed_avg=ea), ids, loss


def np_spherical_kmeans(samples, means, iters):
  for _ in range(iters):
    buckets = (samples @ means.T).argmax(1)
    counts, sums = np_counts_sums(samples, buckets, means.shape[0])
    new = np_l2n(sums / np.maximum(counts, 1.0)[:, None])
    means = np.where((counts == 0)[:, None], means, new)
  return means


# --------------------------------------------------------------------------- helpers
def batches(n, shape=(6, 10, D), seed=0):
  rs = np.random.RandomState(seed)
  return [rs.randn(*shape).astype(np.float32) for _ in range(n)]


def train_step(q):
  return jax.jit(lambda v, z: q.apply(v, z, train=True, mutable=["codebook"]))


def to_np(tree):
  return jax.tree.map(
    lambda x: np.asarray(x, np.float64) if x.dtype != bool else np.asarray(x),
    dict(tree["codebook"]),
  )


def assert_state_close(got, want, keys):
  for key in keys:
    np.testing.assert_allclose(
      np.asarray(got[key], np.float64), want[key], atol=ATOL, rtol=0, err_msg=key
    )


def init_vars(q, z):
  return q.init(jax.random.PRNGKey(0), jnp.asarray(z), train=True)


# --------------------------------------------------------------------------- updates
def test_norm_ema_updates_match_numpy():
  q = Q.NormEMAQuantizer(num_codes=K, dim=D, kmeans_init=False)
  zs = batches(4, shape=(3, 6, D))  # 18 rows for 16 codes: some stay unused
  variables = init_vars(q, zs[0])
  assert variables["codebook"]["initted"]
  np.testing.assert_allclose(
    np.linalg.norm(variables["codebook"]["embedding"], axis=1), 1.0, atol=1e-6
  )
  state = to_np(variables)
  step = train_step(q)
  saw_unused = False
  for z in zs:
    want, want_ids, want_loss = np_norm_ema_step(state, z)
    out, variables = step(variables, z)
    got = variables["codebook"]
    np.testing.assert_array_equal(np.asarray(out.ids), want_ids.reshape(z.shape[:-1]))
    np.testing.assert_allclose(float(out.loss), want_loss, atol=ATOL)
    assert_state_close(got, want, ("embedding", "cluster_size"))
    # z_q is the pre-update code of each row, and lookup() returns the same rows.
    np.testing.assert_allclose(
      np.asarray(out.z_q).reshape(-1, D), state["embedding"][want_ids], atol=ATOL
    )
    saw_unused |= bool((np.bincount(want_ids, minlength=K) == 0).any())
    state = want
  assert saw_unused, "the data should leave some codes unused to test that path"
  ids = jnp.asarray(want_ids[:5])
  np.testing.assert_array_equal(
    q.apply(variables, ids, method="lookup"), np.asarray(got["embedding"])[want_ids[:5]]
  )


def test_norm_ema_unused_codes_keep_their_vector():
  q = Q.NormEMAQuantizer(num_codes=K, dim=D, kmeans_init=False)
  z = batches(1, shape=(2, 5, D), seed=3)[0]  # 10 rows for 16 codes
  variables = init_vars(q, z)
  old = np.asarray(variables["codebook"]["embedding"])
  out, new = train_step(q)(variables, z)
  used = np.bincount(np.asarray(out.ids).ravel(), minlength=K) > 0
  assert 0 < used.sum() < K
  new = np.asarray(new["codebook"]["embedding"])
  np.testing.assert_array_equal(new[~used], old[~used])
  assert np.all(np.abs(new[used] - old[used]).max(axis=1) > 1e-4)


def test_ema_updates_match_numpy():
  q = Q.EMAQuantizer(num_codes=K, dim=D)
  zs = batches(4, seed=1)
  variables = init_vars(q, zs[0])
  state = to_np(variables)
  np.testing.assert_array_equal(state["cluster_size"], 1.0)
  np.testing.assert_array_equal(state["embed_avg"], state["embedding"])
  step = train_step(q)
  for z in zs:
    want, want_ids, want_loss = np_ema_step(state, z)
    out, variables = step(variables, z)
    np.testing.assert_array_equal(np.asarray(out.ids), want_ids.reshape(z.shape[:-1]))
    np.testing.assert_allclose(float(out.loss), want_loss, atol=ATOL)
    assert_state_close(variables["codebook"], want, ("embedding", "cluster_size", "embed_avg"))
    state = want


def test_ema_laplace_smoothing_formula():
  cluster_size = jnp.asarray([2.0, 0.0, 1.0, 5.0])
  eps = 0.1  # large, so that the smoothing is visible
  want = (np.array([2.0, 0.0, 1.0, 5.0]) + eps) / (8.0 + 4 * eps) * 8.0
  np.testing.assert_allclose(Q.laplace_smoothed(cluster_size, eps), want, rtol=1e-6)
  # And the module divides embed_avg by exactly that.
  q = Q.EMAQuantizer(num_codes=4, dim=3, eps=eps)
  z = np.random.RandomState(0).randn(7, 3).astype(np.float32)
  _, new = train_step(q)(init_vars(q, z), z)
  cb = new["codebook"]
  np.testing.assert_allclose(
    cb["embedding"],
    np.asarray(cb["embed_avg"])
    / np.asarray(
      (cb["cluster_size"] + eps) / (cb["cluster_size"].sum() + 4 * eps) * cb["cluster_size"].sum()
    )[:, None],
    rtol=1e-6,
  )


def test_spherical_kmeans_init_runs_once():
  q = Q.NormEMAQuantizer(num_codes=K, dim=D, kmeans_init=True, seed=7)
  z1, z2 = batches(2, shape=(3, 20, D), seed=2)
  variables = init_vars(q, z1)
  assert not variables["codebook"]["initted"]
  np.testing.assert_array_equal(variables["codebook"]["embedding"], 0.0)  # until the 1st batch
  step = train_step(q)
  out, variables = step(variables, z1)
  assert variables["codebook"]["initted"]

  flat = np_l2n(z1.astype(np.float64).reshape(-1, D))
  rows = np.asarray(
    Q.sample_row_indices(jax.random.fold_in(jax.random.PRNGKey(7), 0), flat.shape[0], K)
  )
  assert len(set(rows.tolist())) == K  # without replacement: enough rows
  means = np_spherical_kmeans(flat, flat[rows], 10)
  # The same forward then quantises with the k-means codes and EMA-updates them.
  want, want_ids, _ = np_norm_ema_step(dict(embedding=means, cluster_size=np.zeros(K)), z1)
  np.testing.assert_array_equal(np.asarray(out.ids).ravel(), want_ids)
  assert_state_close(variables["codebook"], want, ("embedding", "cluster_size"))

  # Second call: no re-init, a plain EMA step from the current state, same executable.
  want2, want_ids2, _ = np_norm_ema_step(want, z2)
  out2, variables = step(variables, z2)
  np.testing.assert_array_equal(np.asarray(out2.ids).ravel(), want_ids2)
  assert_state_close(variables["codebook"], want2, ("embedding", "cluster_size"))
  assert step._cache_size() == 1


def test_kmeans_function_and_small_batch_sampling():
  rs = np.random.RandomState(5)
  samples = np_l2n(rs.randn(40, D))
  start = samples[:K].copy()
  start[1] = start[0]  # a duplicate mean never wins a row (first index on ties): empty
  got = Q.kmeans(
    jnp.asarray(samples, jnp.float32), jnp.asarray(start, jnp.float32), 10, spherical=True
  )
  np.testing.assert_allclose(got, np_spherical_kmeans(samples, start, 10), atol=ATOL)
  np.testing.assert_allclose(got[1], start[1], atol=ATOL)  # empty clusters keep their mean
  # Fewer rows than codes: with replacement (reference randint branch).
  rows = np.asarray(Q.sample_row_indices(jax.random.PRNGKey(0), 5, K))
  assert rows.shape == (K,) and rows.min() >= 0 and rows.max() < 5


def test_straight_through_gradient_is_identity():
  rs = np.random.RandomState(4)
  z = jnp.asarray(rs.randn(2, 5, D).astype(np.float32))
  w = rs.randn(2, 5, D).astype(np.float32)
  for q in (Q.EMAQuantizer(num_codes=K, dim=D), Q.NormEMAQuantizer(K, D, kmeans_init=False)):
    variables = init_vars(q, z)

    def weighted_sum(z, q=q, variables=variables):
      return jnp.sum(w * q.apply(variables, z, train=True, mutable=["codebook"])[0].z_q)

    grad = jax.grad(weighted_sum)(z)
    if isinstance(q, Q.EMAQuantizer):
      want = w
    else:  # z_q = l2norm(z) + const: the gradient is the Jacobian of l2norm times w
      zz = np.asarray(z, np.float64)
      norm = np.linalg.norm(zz, axis=-1, keepdims=True)
      u = zz / norm
      want = (w - (w * u).sum(-1, keepdims=True) * u) / norm
    np.testing.assert_allclose(grad, want, atol=1e-5)


# --------------------------------------------------------------------------- devices
def _quantizer_pair(cls, axis_name=None):
  if cls is Q.NormEMAQuantizer:
    return cls(
      K,
      D,
      kmeans_init=True,
      restart_dead_codes=True,
      dead_code_threshold=0.005,
      axis_name=axis_name,
    )
  return cls(
    K, D, kmeans_init=True, restart_dead_codes=True, dead_code_threshold=0.995, axis_name=axis_name
  )


@pytest.mark.parametrize("cls", [Q.NormEMAQuantizer, Q.EMAQuantizer])
def test_sharded_jit_and_shard_map_match_single_device(cls):
  devices = jax.devices()
  assert len(devices) == 8, "conftest sets 8 fake CPU devices"
  mesh = Mesh(np.asarray(devices), ("data",))
  zs = batches(3, shape=(16, 6, D), seed=6)  # 96 rows, 12 per device
  q = _quantizer_pair(cls)
  variables0 = init_vars(q, zs[0])

  # Single device.
  step = train_step(q)
  single, v = [], variables0
  for z in zs:
    out, v = step(v, jax.device_put(z, devices[0]))
    single.append((np.asarray(out.ids), jax.tree.map(np.asarray, out.metrics), to_np(v)))
  assert single[0][2]["initted"] and single[-1][1]["codebook_used"] > 1

  # (a) plain jit over a global batch sharded on 'data' (GSPMD reductions).
  batch_sh = NamedSharding(mesh, P("data"))
  repl = NamedSharding(mesh, P())
  v = jax.device_put(variables0, repl)
  for (ids, _, state), z in zip(single, zs):
    out, v = step(v, jax.device_put(z, batch_sh))
    np.testing.assert_array_equal(np.asarray(out.ids), ids)
    for name, leaf in v["codebook"].items():
      copies = [np.asarray(s.data) for s in leaf.addressable_shards]
      assert len(copies) == 8 and all(c.shape == leaf.shape for c in copies), name
      for c in copies[1:]:
        np.testing.assert_array_equal(c, copies[0], err_msg=name)
      np.testing.assert_allclose(copies[0].astype(np.float64), state[name], atol=ATOL, err_msg=name)

  # (b) shard_map with axis_name='data': psum path.
  qm = _quantizer_pair(cls, axis_name="data")

  def body(v, z):
    out, new = qm.apply(v, z, train=True, mutable=["codebook"])
    return new, out.ids, out.metrics

  mapped = jax.jit(
    jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P(), P("data"), P()))
  )
  v = variables0
  for (ids, metrics, state), z in zip(single, zs):
    v, got_ids, got_metrics = mapped(v, jax.device_put(z, batch_sh))
    np.testing.assert_array_equal(np.asarray(got_ids), ids)
    assert_state_close(to_np(v), state, list(state))
    for name in metrics:
      np.testing.assert_allclose(got_metrics[name], metrics[name], rtol=1e-6, err_msg=name)


def test_codebook_vars_are_replicated_by_trainer_sharding():
  q = Q.NormEMAQuantizer(K, D)
  boxed = jax.eval_shape(
    lambda rng, z: q.init(rng, z, train=False), jax.random.PRNGKey(0), jnp.zeros((2, 3, D))
  )
  mesh = sharding.make_mesh({"data": -1})
  shardings = sharding.logical_shardings(boxed, mesh, config_lib.base_config().sharding_rules)
  flat = jax.tree_util.tree_leaves_with_path(shardings)
  assert {jax.tree_util.keystr(p) for p, _ in flat} == {
    "['codebook']['embedding']",
    "['codebook']['cluster_size']",
    "['codebook']['initted']",
  }
  assert all(s.spec == P() for _, s in flat)
  assert jax.tree.structure(nn.unbox(boxed)) == jax.tree.structure(boxed)


# --------------------------------------------------------------------------- modes
@pytest.mark.parametrize("cls", [Q.NormEMAQuantizer, Q.EMAQuantizer])
def test_eval_changes_nothing(cls):
  q = cls(K, D, kmeans_init=False, restart_dead_codes=True)
  z = batches(1, seed=8)[0]
  variables = init_vars(q, z)
  variables = train_step(q)(variables, z)[1]  # a non-trivial state
  out, same = q.apply(variables, z, train=False, mutable=["codebook"])
  jax.tree.map(np.testing.assert_array_equal, same, variables)
  out2 = q.apply(variables, z, train=True)  # train but immutable: no update either
  np.testing.assert_array_equal(out.ids, out2.ids)
  flat = np.asarray(z, np.float64).reshape(-1, D)
  if cls is Q.NormEMAQuantizer:
    flat = np_l2n(flat)
  np.testing.assert_array_equal(
    np.asarray(out.ids).ravel(), np_assign(flat, to_np(variables)["embedding"])
  )
  counts = np.bincount(np.asarray(out.ids).ravel(), minlength=K)
  p = counts[counts > 0] / counts.sum()
  np.testing.assert_allclose(
    out.metrics["codebook_perplexity"], np.exp(-(p * np.log(p)).sum()), rtol=1e-6
  )
  assert out.metrics["codebook_used"] == (counts > 0).sum()


@pytest.mark.parametrize("cls", [Q.NormEMAQuantizer, Q.EMAQuantizer])
def test_dead_code_restart(cls):
  z = batches(1, shape=(2, 5, D), seed=9)[0]  # 10 rows: many unused codes
  flat = np.asarray(z, np.float64).reshape(-1, D)
  if cls is Q.NormEMAQuantizer:
    flat = np_l2n(flat)
  base = init_vars(cls(K, D, kmeans_init=False), z)
  counts = np.bincount(np_assign(flat, to_np(base)["embedding"]), minlength=K)
  unused = np.flatnonzero(counts == 0)
  used = np.flatnonzero(counts > 0)
  cluster_size = np.full(K, 5.0, np.float32)
  cluster_size[unused[::2]] = 0.0  # dead after the update (0 < 1e-3)
  cluster_size[used[0]] = 0.0  # used now: 0.01 * count >= 1e-3, not dead
  want_dead = 0.99 * cluster_size + 0.01 * counts < 1e-3
  assert 0 < want_dead.sum() < len(unused)
  base = {"codebook": dict(base["codebook"], cluster_size=jnp.asarray(cluster_size))}

  _, off = train_step(cls(K, D, kmeans_init=False))(base, z)
  _, on = train_step(cls(K, D, kmeans_init=False, restart_dead_codes=True))(base, z)
  off, on = to_np(off), to_np(on)
  old = to_np(base)["embedding"]
  changed = np.abs(on["embedding"] - off["embedding"]).max(axis=1) > 0
  np.testing.assert_array_equal(changed, want_dead)  # exactly the dead codes
  rows = np.asarray(Q.sample_row_indices(jax.random.fold_in(jax.random.PRNGKey(0), 1), 10, K))
  np.testing.assert_allclose(on["embedding"][want_dead], flat[rows][want_dead], atol=ATOL)
  np.testing.assert_array_equal(on["cluster_size"][want_dead], Q.RESTART_CLUSTER_SIZE)
  np.testing.assert_array_equal(on["cluster_size"][~want_dead], off["cluster_size"][~want_dead])
  if cls is Q.NormEMAQuantizer:  # disabled: the dead (unused) codes keep their vector
    np.testing.assert_array_equal(off["embedding"][want_dead], old[want_dead])
  else:
    np.testing.assert_allclose(on["embed_avg"][want_dead], flat[rows][want_dead], atol=ATOL)

  # With a 'codebook' rng stream: deterministic given the key, rows of the batch.
  q = cls(K, D, kmeans_init=False, restart_dead_codes=True)
  run = jax.jit(
    lambda key: q.apply(base, z, train=True, mutable=["codebook"], rngs={"codebook": key})[1]
  )
  a, b, c = (to_np(run(jax.random.PRNGKey(s)))["embedding"] for s in (1, 1, 2))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  for vec in a[want_dead]:
    assert np.abs(flat - vec).max(axis=1).min() < ATOL


@pytest.mark.parametrize("cls", [Q.NormEMAQuantizer, Q.EMAQuantizer])
def test_bf16_input_keeps_fp32_state(cls):
  q = cls(K, D, kmeans_init=True, restart_dead_codes=True)
  z = jnp.asarray(batches(1, seed=10)[0], jnp.bfloat16)
  variables = init_vars(q, z)
  out, new = train_step(q)(variables, z)
  for name, leaf in new["codebook"].items():
    assert leaf.dtype == (jnp.bool_ if name == "initted" else jnp.float32), name
    assert np.all(np.isfinite(np.asarray(leaf, np.float32))), name
  assert out.z_q.dtype == jnp.float32 and out.loss.dtype == jnp.float32
  assert all(v.dtype == jnp.float32 for v in out.metrics.values())
  assert out.ids.dtype == jnp.int32 and out.ids.shape == z.shape[:-1]


def test_bad_input_dim_is_named():
  q = Q.NormEMAQuantizer(K, D)
  with pytest.raises(ValueError, match="dim=8"):
    q.init(jax.random.PRNGKey(0), jnp.zeros((2, D + 1)), train=False)
