"""Linear probe pieces (mim_jax/evaluation/linear_probe.py): BN without affine, MAE's LARS."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from mim_jax.evaluation import linear_probe as lp


def test_batchnorm_has_no_affine_and_normalises_with_batch_statistics(torch_ref):
  torch = torch_ref
  head = lp.ProbeHead(num_classes=3)
  x = np.random.RandomState(0).randn(16, 5).astype(np.float32) * 3 + 2
  variables = head.init(jax.random.PRNGKey(0), jnp.asarray(x), train=False)
  # Only the linear layer is trainable; the BN holds statistics alone.
  assert set(variables["params"]) == {"head"}
  assert set(variables["batch_stats"]["bn"]) == {"mean", "var"}
  kernel = np.asarray(variables["params"]["head"]["kernel"])
  assert abs(kernel.std() - 0.01) < 0.004 and not np.any(variables["params"]["head"]["bias"])

  logits, updates = head.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
  bn = torch.nn.BatchNorm1d(5, affine=False, eps=1e-6).train()
  assert not list(bn.parameters())
  normed = bn(torch.from_numpy(x)).detach().numpy()
  np.testing.assert_allclose(logits, normed @ kernel, rtol=1e-4, atol=1e-5)
  stats = updates["batch_stats"]["bn"]
  np.testing.assert_allclose(stats["mean"], bn.running_mean.numpy(), rtol=1e-5)
  # Flax keeps the biased batch variance (PyTorch the unbiased one): 0.9 * 1 + 0.1 * var.
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * x.var(0), rtol=1e-5)
  # Eval mode uses the running statistics, not the batch's.
  eval_logits = head.apply(
    {"params": variables["params"], "batch_stats": updates["batch_stats"]},
    jnp.asarray(x[:2]),
    train=False,
  )
  expected = (x[:2] - stats["mean"]) / np.sqrt(stats["var"] + 1e-6) @ kernel
  np.testing.assert_allclose(eval_logits, expected, rtol=1e-4, atol=1e-5)


def _mae_lars_numpy(params, grads_seq, lrs, wd, momentum=0.9, trust=0.001):
  """MAE util/lars.py re-derived in float64 numpy."""
  params = {k: v.astype(np.float64).copy() for k, v in params.items()}
  mu = {k: np.zeros_like(v) for k, v in params.items()}
  for grads, lr in zip(grads_seq, lrs):
    for k, p in params.items():
      dp = grads[k].astype(np.float64)
      if p.ndim > 1:
        dp = dp + wd * p
        pn, un = np.linalg.norm(p), np.linalg.norm(dp)
        q = trust * pn / un if (pn > 0 and un > 0) else 1.0
        dp = dp * q
      mu[k] = mu[k] * momentum + dp
      params[k] = p - lr * mu[k]
  return params


def test_lars_matches_mae_with_a_changing_learning_rate():
  rs = np.random.RandomState(1)
  params = {"kernel": rs.randn(6, 4).astype(np.float32), "bias": rs.randn(4).astype(np.float32)}
  grads_seq = [
    {k: rs.randn(*v.shape).astype(np.float32) for k, v in params.items()} for _ in range(4)
  ]
  lrs = [0.0, 2.0, 4.0, 3.0]
  tx = lp.lars(lambda step: jnp.asarray(lrs)[step], weight_decay=0.05)
  state = tx.init(params)
  p = {k: jnp.asarray(v) for k, v in params.items()}
  for grads in grads_seq:
    updates, state = tx.update({k: jnp.asarray(v) for k, v in grads.items()}, state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
  expected = _mae_lars_numpy(params, grads_seq, lrs, 0.05)
  for k in params:
    np.testing.assert_allclose(p[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)


def _optim_cfg(name, **over):
  c = mlc.ConfigDict(
    dict(
      name=name,
      lr=0.0,
      base_lr=0.1,
      min_lr=0.0,
      warmup_steps=0,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      momentum=0.9,
      trust_coefficient=0.001,
    )
  )
  c.update(over)
  return c


def test_probe_lr_rule():
  assert lp.probe_lr(_optim_cfg("lars", base_lr=0.1), 16384) == pytest.approx(6.4)
  assert lp.probe_lr(_optim_cfg("adamw", lr=4e-3), 1024) == 4e-3


@pytest.mark.parametrize(
  "name, over",
  [("adamw", dict(lr=4e-3, weight_decay=1e-4)), ("lars", dict(lr=6.4, warmup_steps=5))],
)  # 0.1 x 16384 / 256
def test_probe_fits_separable_features(name, over):
  rs = np.random.RandomState(2)
  centers = rs.randn(4, 8) * 4 + 10  # far from zero mean: BN has work to do
  labels = rs.randint(0, 4, 512)
  feats = (centers[labels] + rs.randn(512, 8)).astype(np.float32)
  head = lp.ProbeHead(num_classes=4)
  tx, _ = lp.make_probe_optimizer(_optim_cfg(name, **over), total_steps=150, batch_size=64)
  v = head.init(jax.random.PRNGKey(0), jnp.asarray(feats[:2]), train=False)
  params, stats, opt_state = v["params"], v["batch_stats"], tx.init(v["params"])
  step = jax.jit(lambda p, s, o, f, y: lp.head_step(head, tx, p, s, o, f, y))
  for _ in range(150):
    idx = rs.randint(0, 512, 64)
    params, stats, opt_state, metrics = step(params, stats, opt_state, feats[idx], labels[idx])
  logits = lp.head_logits(head, params, stats, jnp.asarray(feats))
  assert np.mean(np.argmax(logits, 1) == labels) > 0.95, (name, float(metrics["loss"]))


def test_pool_features():
  normed = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
  np.testing.assert_array_equal(lp.pool_features({"normed": normed}, "cls"), normed[:, 0])
  np.testing.assert_allclose(lp.pool_features({"normed": normed}, "mean"), normed[:, 1:].mean(1))
  with pytest.raises(ValueError, match="config.pool"):
    lp.pool_features({"normed": normed}, "max")
