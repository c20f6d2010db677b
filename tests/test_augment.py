"""Fine-tuning augmentation (mim_jax/evaluation/augment.py) against timm's implementations."""

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from mim_jax.evaluation import augment


def _photo(size=40, seed=0):
  """A smooth colourful image (gradients + blobs) so geometric ops move real content."""
  rs = np.random.RandomState(seed)
  y, x = np.mgrid[0:size, 0:size] / size
  img = np.stack([x, y, (x + y) / 2], -1) * 200 + 20
  img += rs.randn(size // 8, size // 8, 3).repeat(8, 0).repeat(8, 1)[:size, :size] * 15
  return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def timm_aa(torch_ref):
  del torch_ref
  from timm.data import auto_augment  # pylint: disable=g-import-not-at-top

  return auto_augment


@pytest.mark.parametrize("negate", [False, True])
@pytest.mark.parametrize("magnitude", [9.0, 4.3])
def test_every_rand_augment_op_matches_timm(timm_aa, monkeypatch, magnitude, negate):
  monkeypatch.setattr(timm_aa, "_randomly_negate", (lambda v: -v) if negate else (lambda v: v))
  img = _photo()
  hparams = dict(
    translate_const=int(40 * 0.45),
    img_mean=augment.fill_color(),
    interpolation=Image.Resampling.BICUBIC,
  )
  for name in augment.RAND_INCREASING_OPS:
    op = timm_aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)
    expected = np.asarray(op(img))
    ours = augment.apply_op(img, name, augment.op_argument(name, magnitude, negate))
    np.testing.assert_array_equal(np.asarray(ours), expected, err_msg=name)
    if name not in ("AutoContrast", "Equalize", "Invert"):
      assert augment.op_argument(name, magnitude, negate) is not None, name


def test_posterize_at_full_magnitude_keeps_zero_bits():
  # rand-m9-mstd0.5 draws magnitudes up to the clip at 10, where posterize keeps 0 bits
  # (timm / Pillow < 11: a black image; Pillow >= 11 refuses bits=0 in ImageOps.posterize).
  img = _photo()
  assert augment.op_argument("PosterizeIncreasing", 10.0, False) == 0
  out = np.asarray(augment.apply_op(img, "PosterizeIncreasing", 0))
  assert out.shape == np.asarray(img).shape and not out.any()
  ra = augment.RandAugment(
    magnitude=10.0, magnitude_std=0.5, num_ops=2, prob=1.0, ops=("PosterizeIncreasing",)
  )
  for seed in range(5):
    ra(img, np.random.default_rng(seed))


def test_rand_augment_string_and_determinism():
  ra = augment.RandAugment.from_string("rand-m9-mstd0.5-inc1")
  assert (ra.magnitude, ra.magnitude_std, ra.num_ops, ra.prob) == (9.0, 0.5, 2, 0.5)
  assert ra.fill == (124, 116, 104)  # timm's img_mean for the ImageNet mean
  with pytest.raises(ValueError, match="rand_augment"):
    augment.RandAugment.from_string("rand-m9-inc0")
  with pytest.raises(ValueError, match="rand_augment"):
    augment.RandAugment.from_string("auto-m9")
  img = _photo()
  a = ra(img, np.random.default_rng(3))
  b = ra(img, np.random.default_rng(3))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  changed = [
    np.any(np.asarray(ra(img, np.random.default_rng(s))) != np.asarray(img)) for s in range(40)
  ]
  # P(no op applied) = 0.5 * 0.5 (+ ops that are no-ops on this image): most draws change it.
  assert 0.5 < np.mean(changed) < 0.95


class _Replay:
  """Feeds the same uniform numbers to timm (python `random`) and to our Generator calls."""

  def __init__(self, values):
    self.values = list(values)

  def _next(self):
    return self.values.pop(0)

  def random(self):
    return self._next()

  def uniform(self, a, b):
    return a + (b - a) * self._next()

  def randint(self, a, b):  # python: inclusive
    return a + int(self._next() * (b - a + 1))

  def integers(self, a, b):  # numpy: exclusive
    return a + int(self._next() * (b - a))


@pytest.mark.parametrize("seed", range(6))
def test_random_erasing_box_matches_timm(torch_ref, monkeypatch, seed):
  torch = torch_ref
  from timm.data import random_erasing  # pylint: disable=g-import-not-at-top

  values = np.random.RandomState(seed).rand(64)
  values[0] = 0.1 if seed % 3 else 0.9  # 0.9 > 0.25: no erasing
  if seed == 4:
    values[1:3] = [0.99, 0.99]  # a first attempt too tall to fit at 0.3 aspect
  monkeypatch.setattr(random_erasing, "random", _Replay(values))
  eraser = random_erasing.RandomErasing(probability=0.25, mode="pixel", device="cpu")
  img = torch.full((3, 24, 20), 7.0)
  out = eraser(img.clone()).numpy()
  changed = np.any(out != 7.0, axis=0)
  top, left, h, w = augment.random_erasing_box(_Replay(values), 24, 20, probability=0.25)
  expected = np.zeros((24, 20), bool)
  expected[top : top + h, left : left + w] = True
  np.testing.assert_array_equal(changed, expected)
  # The device side fills exactly that box with N(0, 1) noise.
  images = jnp.full((1, 24, 20, 3), 7.0)
  erased = np.asarray(
    augment.erase(jax.random.PRNGKey(0), images, jnp.asarray([[top, left, h, w]]))
  )
  np.testing.assert_array_equal(np.any(erased[0] != 7.0, -1), expected)


@pytest.mark.parametrize("lam", [0.31, 0.77, 0.95])
def test_cutmix_box_matches_timm(torch_ref, lam):
  del torch_ref
  from timm.data import mixup as timm_mixup  # pylint: disable=g-import-not-at-top

  for seed in range(5):
    np.random.seed(seed)
    box, lam_t = timm_mixup.cutmix_bbox_and_lam((2, 3, 24, 30), lam)
    np.random.seed(seed)
    cy, cx = np.random.randint(0, 24), np.random.randint(0, 30)
    (yl, yh, xl, xh), lam_o = augment.cutmix_box(jnp.float32(lam), cy, cx, 24, 30)
    # timm >= 0.9 ends the box at c + (cut + 1) // 2; BEiT's pinned timm 0.4.12 (which the
    # papers ran) at c + cut // 2, one pixel shorter for odd cuts. We follow 0.4.12.
    cut_h, cut_w = int(24 * np.sqrt(1 - lam)), int(30 * np.sqrt(1 - lam))
    assert (int(yl), int(xl)) == (int(box[0]), int(box[2]))
    assert int(yh) == min(24, int(box[1]) - cut_h % 2 * (cy + (cut_h + 1) // 2 <= 24))
    assert int(xh) == min(30, int(box[3]) - cut_w % 2 * (cx + (cut_w + 1) // 2 <= 30))
    area = (int(yh) - int(yl)) * (int(xh) - int(xl))
    assert float(lam_o) == pytest.approx(1 - area / (24 * 30), abs=1e-6)
    if cut_h % 2 == 0 and cut_w % 2 == 0:
      assert float(lam_o) == pytest.approx(lam_t, abs=1e-6)


def test_mixup_cutmix_label_mixing_matches_timm(torch_ref):
  torch = torch_ref
  from timm.data import mixup as timm_mixup  # pylint: disable=g-import-not-at-top

  rs = np.random.RandomState(0)
  images = jnp.asarray(rs.randn(6, 16, 12, 3).astype(np.float32))
  labels = jnp.asarray([0, 3, 1, 4, 4, 2])
  fn = jax.jit(lambda k: augment.mixup_cutmix(k, images, labels, num_classes=5))
  kinds = set()
  for seed in range(12):
    mixed, targets, lam = (np.asarray(a) for a in fn(jax.random.PRNGKey(seed)))
    expected = timm_mixup.mixup_target(
      torch.tensor(np.asarray(labels)), 5, float(lam), smoothing=0.1
    ).numpy()
    np.testing.assert_allclose(targets, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
    flipped = np.asarray(images)[::-1]
    from_flip = np.all(mixed == flipped, -1) & ~np.all(mixed == np.asarray(images), -1)
    if from_flip.any():  # cutmix: one box copied from the mirror image, lam = kept area
      kinds.add("cutmix")
      np.testing.assert_allclose(1 - from_flip[0].mean(), lam, rtol=1e-6)
      assert np.all(from_flip[:3] == from_flip[0])
    else:  # mixup: a convex blend with the mirror image
      kinds.add("mixup")
      np.testing.assert_allclose(
        mixed, np.asarray(images) * lam + flipped * (1 - lam), rtol=1e-5, atol=1e-6
      )
  assert kinds == {"cutmix", "mixup"}  # switch_prob 0.5 over 12 draws


def test_label_smoothing_only_and_soft_cross_entropy():
  labels = jnp.asarray([1, 0])
  images = jnp.ones((2, 4, 4, 3))
  out, targets, lam = augment.mixup_cutmix(
    jax.random.PRNGKey(0), images, labels, num_classes=4, mixup_alpha=0.0, cutmix_alpha=0.0
  )
  assert float(lam) == 1.0 and out is images
  np.testing.assert_allclose(
    targets, [[0.025, 0.925, 0.025, 0.025], [0.925, 0.025, 0.025, 0.025]], rtol=1e-6
  )
  logits = jnp.asarray([[1.0, 2.0, 0.5, -1.0], [0.2, 0.1, 0.0, 3.0]])
  logp = jax.nn.log_softmax(logits)
  expected = -np.mean(np.sum(np.asarray(targets) * np.asarray(logp), 1))
  assert float(augment.soft_cross_entropy(logits, targets)) == pytest.approx(expected, rel=1e-6)


def test_finetune_train_transform_outputs():
  t = augment.FinetuneTrainTransform(16, reprob=1.0)
  ex = {"image": np.asarray(_photo(40)), "label": np.int32(3), "index": np.int64(5)}
  a = t(ex, np.random.default_rng(0))
  b = t(ex, np.random.default_rng(0))
  assert a["image"].shape == (16, 16, 3) and a["image"].dtype == np.uint8
  assert a["label"] == 3 and a["erase"].dtype == np.int32 and a["erase"][2] > 0
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["erase"], b["erase"])
