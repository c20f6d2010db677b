"""kNN on frozen features (mim_jax/evaluation/knn.py) against hand-built toy sets."""

import numpy as np
import pytest

from mim_jax.evaluation import knn


def _unit(angles_deg):
  a = np.deg2rad(np.asarray(angles_deg, np.float64))
  return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


def _reference_votes(train, labels, test, k, temperature, num_classes):
  """DINO's weighted vote written as explicit loops in float64."""
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  test = test / np.linalg.norm(test, axis=1, keepdims=True)
  votes = np.zeros((len(test), num_classes))
  for i, t in enumerate(test):
    sims = [(float(t @ x), j) for j, x in enumerate(train)]
    sims.sort(key=lambda s: -s[0])
    for s, j in sims[:k]:
      votes[i, labels[j]] += np.exp(s / temperature)
  return votes


def test_known_neighbours_on_the_circle():
  # Class 0 around 0 deg, class 1 around 120 deg, class 2 around 240 deg.
  train_angles = [-10, 0, 10, 110, 120, 130, 230, 240, 250]
  labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
  train = _unit(train_angles) * np.array([[1.0], [3.0], [0.5]] * 3, np.float32)  # scale-free
  test = _unit([5, 118, 245, 60])  # the last one is equidistant from 10 and 110 deg
  votes = knn.knn_classify(train, labels, test, num_classes=3, k=3, temperature=0.07)
  np.testing.assert_allclose(votes, _reference_votes(train, labels, test, 3, 0.07, 3), rtol=1e-4)
  assert list(np.argmax(votes[:3], 1)) == [0, 1, 2]
  # 60 deg: neighbours 10 (class 0), 110 (class 1) tie at cos 50 deg; the third is 0 deg.
  assert np.argmax(votes[3]) == 0 and votes[3, 2] == 0
  np.testing.assert_allclose(votes[3, 1], np.exp(np.cos(np.deg2rad(50)) / 0.07), rtol=1e-5)


def test_temperature_weights_the_votes():
  """One very close class-1 neighbour against two farther class-0 neighbours (k=3)."""
  # Cosine to the test point (0 deg): 0.990 (8.1 deg), 0.900 (+-25.84 deg); 170 deg is not
  # among the k=3 nearest.
  train = _unit([8.1, 25.84, -25.84, 170])
  labels = np.array([1, 0, 0, 1])
  test = _unit([0])
  sharp = knn.knn_classify(train, labels, test, num_classes=2, k=3, temperature=0.07)
  flat = knn.knn_classify(train, labels, test, num_classes=2, k=3, temperature=1.0)
  assert np.argmax(sharp[0]) == 1  # e^(0.99/0.07) > 2 e^(0.9/0.07)
  assert np.argmax(flat[0]) == 0  # e^0.99 < 2 e^0.9
  np.testing.assert_allclose(flat[0], [2 * np.exp(0.9), np.exp(0.99)], rtol=1e-3)


def test_random_features_match_loops_and_chunking_is_invisible():
  rs = np.random.RandomState(0)
  train = rs.randn(200, 16).astype(np.float32)
  labels = rs.randint(0, 7, 200)
  test = rs.randn(37, 16).astype(np.float32)
  ref = _reference_votes(train, labels, test, 20, 0.07, 7)
  for chunk in (5, 37, 1000):
    votes = knn.knn_classify(
      train, labels, test, num_classes=7, k=20, temperature=0.07, chunk_size=chunk
    )
    np.testing.assert_allclose(votes, ref, rtol=2e-4)
  acc = knn.knn_accuracy(train, labels, test, np.argmax(ref, 1), num_classes=7)
  assert acc["top1"] == 1.0 and acc["top5"] == 1.0


def test_topk_accuracy_and_errors():
  scores = np.array([[0.1, 0.5, 0.4], [0.3, 0.3, 0.4], [0.6, 0.3, 0.1]])
  acc = knn.topk_accuracy(scores, np.array([2, 0, 0]), ks=(1, 2, 5))
  assert acc == {"top1": 1 / 3, "top2": 1.0}
  with pytest.raises(ValueError, match="k=5"):
    knn.knn_classify(np.ones((3, 2)), np.zeros(3, int), np.ones((1, 2)), num_classes=2, k=5)
  with pytest.raises(ValueError, match="labels"):
    knn.knn_classify(np.ones((3, 2)), np.array([0, 1, 4]), np.ones((1, 2)), num_classes=2, k=1)
