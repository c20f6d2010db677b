"""kNN as a monitor during pre-training (`config.knn_monitor.every > 0` in any pre-training
config): every N steps the method's encoder (`method.encoder_params`) embeds the first
`num_train` examples of the train split and the first `num_test` of the test split
(Resize -> CenterCrop, no augmentation), and the weighted kNN top-1 (k = 20, cosine, T = 0.07,
DINO's protocol) is logged as `knn_top1` beside the training metrics. It needs labels, so
the source must have them (tfds / imagefolder / npz; the embedded photos' labels are photo
ids). Cheap: no training, one forward pass over a few thousand images.
"""

from __future__ import annotations

import jax
import numpy as np

from mim_jax.data import sources as data_sources
from mim_jax.evaluation import backbones
from mim_jax.evaluation import extract
from mim_jax.evaluation import knn


class _First:
  def __init__(self, source, n):
    self._s, self._n = source, min(int(n), len(source)) if n else len(source)

  def __len__(self):
    return self._n

  def __getitem__(self, i):
    return self._s[int(i)]


def validate(config) -> None:
  """Named errors for config.knn_monitor before anything is built."""
  m = config.knn_monitor
  if not m.every:
    return
  for f in ("every", "num_train", "num_test", "k", "batch_size"):
    if (
      not isinstance(m[f], int) or m[f] < 0 or (f != "num_train" and f != "num_test" and m[f] == 0)
    ):
      raise ValueError(f"config.knn_monitor.{f} must be a positive integer, got {m[f]!r}")
  if m.pool not in ("mean", "cls"):
    raise ValueError(f"config.knn_monitor.pool must be 'mean' or 'cls', got {m.pool!r}")
  if not 0 < m.crop_pct <= 1:
    raise ValueError(f"config.knn_monitor.crop_pct must be in (0, 1], got {m.crop_pct!r}")
  for split in (m.train_split, m.test_split):
    data_sources.validate_data_config(config.data, split)


class KnnMonitor:
  """`monitor(params) -> {'knn_top1': ...}` for the trainer's loop."""

  def __init__(self, config, mesh, method):
    m = config.knn_monitor
    self.config, self.mesh, self.method, self.m = config, mesh, method, m
    self.every = int(m.every)
    self.train_source = _First(data_sources.build_source(config.data, m.train_split), m.num_train)
    self.test_source = _First(data_sources.build_source(config.data, m.test_split), m.num_test)
    self.image_size = int(config.data.image_size)
    self.resize = int(round(self.image_size / m.crop_pct))
    self._fn = None

  def _encoder_fn(self, encoder):
    if self._fn is None:
      spec = backbones.infer_spec(
        encoder,
        num_heads=backbones._heads_from_config(  # pylint: disable=protected-access
          self.config.model
        ),
        abs_pos=self.config.model.get("abs_pos"),
        source="knn monitor",
      )
      self._fn = extract.encoder_fn(spec.vit_kwargs(), self.m.pool)
    return self._fn

  def __call__(self, params) -> dict:
    encoder = self.method.encoder_params(jax.device_get(params))
    encoder = backbones._unstack_if_scanned(jax.tree.map(np.asarray, encoder))  # pylint: disable=protected-access
    fn = self._encoder_fn(encoder)
    kw = dict(
      batch_size=self.m.batch_size,
      image_size=self.image_size,
      resize_size=self.resize,
      interpolation=self.config.data.interpolation,
    )
    train_x, train_y = extract.extract_features(fn, encoder, self.train_source, self.mesh, **kw)
    test_x, test_y = extract.extract_features(fn, encoder, self.test_source, self.mesh, **kw)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    acc = knn.knn_accuracy(
      train_x,
      train_y,
      test_x,
      test_y,
      num_classes=num_classes,
      k=self.m.k,
      temperature=self.m.temperature,
    )
    return {"knn_top1": float(acc["top1"])}
