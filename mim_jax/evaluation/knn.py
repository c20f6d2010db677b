"""Weighted k-nearest-neighbour classification on frozen features (DINO protocol).

DINO (`eval_knn.py`, Caron et al. 2021, Sec. 4.1 / App. "k-NN"): features of the train and
test sets are l2-normalised; for every test image the k train images of highest cosine
similarity vote for their label with weight exp(similarity / T); the class with the largest
summed vote wins. DINO's defaults are k = 20 and T = 0.07, used here.

Everything runs in fp32 inside one jitted function per chunk of test images, so the train
bank (N x D) is read once per chunk; with a mesh, the bank can be sharded along its rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) over the last axis (torch.nn.functional.normalize)."""
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def knn_votes(
  train_features: jax.Array,
  train_labels: jax.Array,
  test_features: jax.Array,
  *,
  k: int,
  num_classes: int,
  temperature: float,
) -> jax.Array:
  """(B, num_classes) summed votes exp(cos / T) of each test row's k nearest train rows.

  Features need not be normalised (they are, here). Labels are int class ids.
  """
  train = l2_normalize(train_features)
  test = l2_normalize(test_features)
  sim = jnp.einsum("bd,nd->bn", test, train, precision=jax.lax.Precision.HIGHEST)
  top_sim, top_idx = jax.lax.top_k(sim, k)  # (B, k), sorted descending
  neighbour_labels = jnp.take(train_labels, top_idx, axis=0)  # (B, k)
  weights = jnp.exp(top_sim / temperature)  # DINO: (sim / T).exp()
  one_hot = jax.nn.one_hot(neighbour_labels, num_classes, dtype=jnp.float32)
  return jnp.einsum("bk,bkc->bc", weights, one_hot)


def knn_classify(
  train_features,
  train_labels,
  test_features,
  *,
  num_classes: int,
  k: int = 20,
  temperature: float = 0.07,
  chunk_size: int = 256,
) -> np.ndarray:
  """(num_test, num_classes) vote matrix, computed over fixed-size chunks of test rows.

  The last chunk is padded so one compiled shape serves every chunk.
  """
  n_train = len(train_features)
  if n_train != len(train_labels):
    raise ValueError(f"knn: {n_train} train features but {len(train_labels)} labels")
  if not 1 <= k <= n_train:
    raise ValueError(f"knn: k={k} must be in [1, {n_train}] (the train set size)")
  if temperature <= 0:
    raise ValueError(f"knn: temperature must be positive, got {temperature}")
  labels = np.asarray(train_labels)
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(
      f"knn: train labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
    )
  train = jnp.asarray(train_features, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  test = np.asarray(test_features, np.float32)
  chunk_size = min(chunk_size, max(len(test), 1))
  out = []
  for start in range(0, len(test), chunk_size):
    chunk = test[start : start + chunk_size]
    pad = chunk_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad, chunk.shape[1]), np.float32)])
    votes = knn_votes(
      train,
      labels,
      jnp.asarray(chunk),
      k=k,
      num_classes=num_classes,
      temperature=float(temperature),
    )
    out.append(np.asarray(votes)[: chunk_size - pad])
  return np.concatenate(out) if out else np.zeros((0, num_classes), np.float32)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict:
  """{'top1': ..., 'top5': ...} fractions; k larger than the class count is skipped."""
  scores, labels = np.asarray(scores), np.asarray(labels)
  # Stable ordering: among equal scores the lower class id ranks first (argmax convention).
  order = np.argsort(-scores, axis=1, kind="stable")
  out = {}
  for k in ks:
    if k <= scores.shape[1]:
      out[f"top{k}"] = float(np.mean(np.any(order[:, :k] == labels[:, None], axis=1)))
  return out


def knn_accuracy(
  train_features,
  train_labels,
  test_features,
  test_labels,
  *,
  num_classes: int,
  k: int = 20,
  temperature: float = 0.07,
  chunk_size: int = 256,
) -> dict:
  """Top-1 / top-5 of the weighted kNN classifier."""
  votes = knn_classify(
    train_features,
    train_labels,
    test_features,
    num_classes=num_classes,
    k=k,
    temperature=temperature,
    chunk_size=chunk_size,
  )
  return topk_accuracy(votes, test_labels)
