"""Tests for mim_jax.data: sources, transforms and the grain loaders.

All data is written to tmp_path or comes from photos inside installed
packages, so these run in a clone without ../shared/data.
"""

import json
import os
import pickle

import grain.python as grain
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from mim_jax import data
from mim_jax.data import pipeline
from mim_jax.data import sources
from mim_jax.data import transforms

# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def _write_npz(path, num_train=40, num_test=10, size=16, compressed=True):
  rng = np.random.default_rng(0)
  arrays = {
    'x_train': rng.integers(0, 256, (num_train, size, size, 3), np.uint8),
    'y_train': np.arange(num_train, dtype=np.int64) % 5,
    'x_test': rng.integers(0, 256, (num_test, size, size), np.uint8),
    'y_test': np.arange(num_test, dtype=np.int32) % 5,
  }
  (np.savez_compressed if compressed else np.savez)(path, **arrays)
  return arrays


class _ArraySource:
  """A tiny in-memory source: image i is filled with value i % 256."""

  def __init__(self, length, size=8):
    self.length, self.size = length, size

  def __len__(self):
    return self.length

  def __getitem__(self, index):
    image = np.full((self.size, self.size, 3), index % 256, np.uint8)
    return {'image': image, 'label': np.int32(index % 3), 'index': np.int64(index)}

  def __repr__(self):
    return f'_ArraySource({self.length}, {self.size})'


def _add_noise_and_mask(example, rng):
  """A prepare_fn: a random mask and a per-example random number."""
  example['mask'] = rng.random(16) < 0.5
  example['noise'] = np.float32(rng.random())
  return example


def _two_view(size=8):
  return transforms.TwoViewTransform(image_size=size, second_image_size=4, color_jitter=0.4)


@pytest.fixture(scope='module')
def photo():
  return sources.EmbeddedPhotosSource(length=3)[0]['image']


def _assert_batches_equal(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for batch_a, batch_b in zip(batches_a, batches_b):
    assert batch_a.keys() == batch_b.keys()
    for key in batch_a:
      np.testing.assert_array_equal(batch_a[key], batch_b[key], err_msg=key)


# ----------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------


def test_two_views_share_one_crop(photo):
  view1, view2 = transforms.two_view_random_resized_crop(photo, np.random.default_rng(1), 64, 64)
  np.testing.assert_array_equal(view1, view2)
  # Different sizes: view1 downsampled must look like view2, unlike the view
  # of an independent crop.
  view1, view2 = transforms.two_view_random_resized_crop(
    photo, np.random.default_rng(2), 96, 32, interpolation2='bilinear'
  )
  assert view1.shape == (96, 96, 3) and view2.shape == (32, 32, 3)
  assert view1.dtype == view2.dtype == np.uint8
  small = np.asarray(Image.fromarray(view1).resize((32, 32), Image.BOX))
  same_crop_error = np.abs(small.astype(float) - view2).mean()
  _, other = transforms.two_view_random_resized_crop(photo, np.random.default_rng(3), 96, 32)
  other_crop_error = np.abs(other.astype(float) - view2).mean()
  assert same_crop_error < 6, same_crop_error
  assert other_crop_error > 3 * same_crop_error


def test_crop_params_respect_scale_and_ratio_bounds():
  rng = np.random.default_rng(0)
  height, width = 300, 400
  fractions, ratios = [], []
  for _ in range(2000):
    top, left, h, w = transforms.random_resized_crop_params(
      height, width, rng, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)
    )
    assert 0 <= top <= height - h and 0 <= left <= width - w
    fractions.append(h * w / (height * width))
    ratios.append(w / h)
  fractions, ratios = np.array(fractions), np.array(ratios)
  # Rounding h and w to pixels moves the area by well under 2 %.
  assert fractions.min() >= 0.2 * 0.98 and fractions.max() <= 1.0
  assert ratios.min() >= 0.75 * 0.98 and ratios.max() <= 4 / 3 * 1.02
  assert fractions.min() < 0.25 and fractions.max() > 0.9  # Spans the range.
  assert 0.45 < np.median(fractions) < 0.65  # U(0.2, 1) minus the rejects.


def test_unit_scale_and_ratio_give_the_centre_square(photo):
  height, width = photo.shape[:2]
  box = transforms.random_resized_crop_params(
    height, width, np.random.default_rng(0), scale=(1, 1), ratio=(1, 1)
  )
  side = min(height, width)
  assert box == ((height - side) // 2, (width - side) // 2, side, side)
  view, _ = transforms.two_view_random_resized_crop(
    photo, np.random.default_rng(5), 64, 64, scale=(1, 1), ratio=(1, 1)
  )
  # The region Resize + CenterCrop sees (MaPeT's offline tokens); only the
  # resampling order differs. The left square is far off.
  centre_error = np.abs(view - transforms.resize_center_crop(photo, 64).astype(float)).mean()
  left_square = np.asarray(Image.fromarray(photo[:side, :side]).resize((64, 64), Image.BICUBIC))
  left_error = np.abs(view - left_square.astype(float)).mean()
  assert centre_error < 10 and left_error > 4 * centre_error


def test_two_view_transform_is_deterministic_given_the_rng(photo):
  transform = transforms.TwoViewTransform(image_size=32, color_jitter=0.4)
  example = {'image': photo, 'label': np.int32(0), 'index': np.int64(7)}
  out_a = transform(example, np.random.default_rng(11))
  out_b = transform(example, np.random.default_rng(11))
  out_c = transform(example, np.random.default_rng(12))
  np.testing.assert_array_equal(out_a['image'], out_b['image'])
  assert not np.array_equal(out_a['image'], out_c['image'])
  assert set(out_a) == {'image', 'image2', 'label', 'index'}
  assert out_a['image'].shape == (32, 32, 3)
  assert out_a['image'].dtype == np.uint8
  np.testing.assert_array_equal(out_a['image'], out_a['image2'])
  assert out_a['index'] == 7


def test_two_view_transform_second_view_size_and_config():
  cfg = ml_collections.ConfigDict(
    {
      'image_size': 24,
      'second_image_size': 12,
      'crop_scale': (0.4, 1.0),
      'hflip': False,
      'color_jitter': 0.0,
      'second_interpolation': 'lanczos',
    }
  )
  transform = transforms.TwoViewTransform.from_config(cfg)
  assert transform.crop_scale == (0.4, 1.0) and not transform.hflip
  image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8)
  out = transform(
    {'image': image, 'label': np.int32(1), 'index': np.int64(0)}, np.random.default_rng(0)
  )
  assert out['image'].shape == (24, 24, 3)
  assert out['image2'].shape == (12, 12, 3)
  with pytest.raises(ValueError, match='interpolation'):
    transforms.TwoViewTransform(interpolation='cubic-ish')


def test_horizontal_flip():
  image = np.arange(2 * 5 * 3, dtype=np.uint8).reshape(2, 5, 3)
  rng = np.random.default_rng(0)
  np.testing.assert_array_equal(transforms.horizontal_flip(image, rng, p=1.0), image[:, ::-1])
  np.testing.assert_array_equal(transforms.horizontal_flip(image, rng, p=0.0), image)
  pil = Image.fromarray(image)
  flipped = transforms.horizontal_flip(pil, rng, p=1.0)
  np.testing.assert_array_equal(np.asarray(flipped), image[:, ::-1])
  flips = [not np.array_equal(transforms.horizontal_flip(image, rng), image) for _ in range(400)]
  assert 0.4 < np.mean(flips) < 0.6


def test_color_jitter_factor_ranges():
  grey = np.full((8, 8, 3), 100, np.uint8)
  rng = np.random.default_rng(0)
  means = [transforms.color_jitter(grey, rng, 0.4, 0, 0).mean() for _ in range(300)]
  assert min(means) >= 60 - 1 and max(means) <= 140 + 1
  assert min(means) < 70 and max(means) > 130  # Uses the whole range.
  # Contrast and saturation leave a constant grey image as it is.
  np.testing.assert_array_equal(transforms.color_jitter(grey, rng, 0, 0.4, 0.4), grey)
  # Hue rotates colours but keeps uint8 RGB.
  red = np.zeros((4, 4, 3), np.uint8)
  red[..., 0] = 200
  shifted = transforms.color_jitter(red, np.random.default_rng(1), 0, 0, 0, hue=0.5)
  assert shifted.dtype == np.uint8 and shifted.shape == red.shape
  assert not np.array_equal(shifted, red)


def test_resize_center_crop_shapes():
  image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), np.uint8)
  assert transforms.resize_center_crop(image, 20).shape == (20, 20, 3)
  assert transforms.resize_center_crop(image, 20, 24).shape == (20, 20, 3)
  out = data.EvalTransform(16)({'image': image, 'label': np.int32(2), 'index': np.int64(3)})
  assert out['image'].shape == (16, 16, 3) and out['label'] == 2


def test_normalize_numpy_and_jax():
  image = np.random.default_rng(0).integers(0, 256, (4, 4, 3), np.uint8)
  expected = (image / 255.0 - np.array(data.IMAGENET_MEAN)) / np.array(data.IMAGENET_STD)
  np.testing.assert_allclose(transforms.normalize(image), expected, atol=1e-5)
  on_device = transforms.normalize(jnp.asarray(image), data.IMAGENET_MEAN, data.IMAGENET_STD)
  assert isinstance(on_device, type(jnp.zeros(1)))
  np.testing.assert_allclose(np.asarray(on_device), expected, atol=1e-5)
  floats = transforms.normalize(image / 255.0, data.INCEPTION_MEAN, data.INCEPTION_STD)
  np.testing.assert_allclose(floats, image / 127.5 - 1, atol=1e-5)


# ----------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------


def test_npz_source(tmp_path):
  path = str(tmp_path / 'tiny.npz')
  arrays = _write_npz(path)
  source = sources.NpzSource(path, split='train')
  assert len(source) == 40
  example = source[7]
  np.testing.assert_array_equal(example['image'], arrays['x_train'][7])
  assert example['label'].dtype == np.int32 and example['label'] == 2
  assert example['index'].dtype == np.int64 and example['index'] == 7
  test = sources.NpzSource(path, split='test')
  assert test[0]['image'].shape == (16, 16, 3)  # Greyscale -> RGB.
  assert repr(source) == repr(sources.NpzSource(path, split='train'))
  source[0]  # Loads the pixels, which pickling to workers must leave out.
  assert len(pickle.dumps(source)) < arrays['x_train'].nbytes / 4
  with pytest.raises(KeyError, match='x_val'):
    sources.NpzSource(path, split='val')
  with pytest.raises(FileNotFoundError, match='missing.npz'):
    sources.NpzSource(str(tmp_path / 'missing.npz'))
  with pytest.raises(ValueError, match='uncompressed'):
    sources.NpzSource(path, mmap=True)


def test_npz_source_mmap(tmp_path):
  path = str(tmp_path / 'plain.npz')
  arrays = _write_npz(path, compressed=False)
  source = sources.NpzSource(path, split='train', mmap=True)
  for index in (0, 13, 39):
    np.testing.assert_array_equal(source[index]['image'], arrays['x_train'][index])
  restored = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(restored[5]['image'], arrays['x_train'][5])


def _write_imagefolder(root):
  rng = np.random.default_rng(0)
  for class_name, names in (
    ('zebra', ('b.png', 'a.JPEG')),
    ('ant', ('c.jpg', 'd.png', 'notes.txt')),
  ):
    os.makedirs(root / class_name)
    for name in names:
      path = root / class_name / name
      if name.endswith('.txt'):
        path.write_text('not an image')
        continue
      mode = 'L' if name == 'd.png' else 'RGB'
      pixels = rng.integers(0, 256, (12, 10, 3), np.uint8)
      Image.fromarray(pixels).convert(mode).save(path)


def test_imagefolder_source(tmp_path):
  root = tmp_path / 'train'
  _write_imagefolder(root)
  source = sources.ImageFolderSource(str(root))
  assert source.classes == ['ant', 'zebra']
  assert len(source) == 4
  names = [os.path.basename(source.path(i)) for i in range(4)]
  assert names == ['c.jpg', 'd.png', 'a.JPEG', 'b.png']
  assert [int(source[i]['label']) for i in range(4)] == [0, 0, 1, 1]
  for i in range(4):
    image = source[i]['image']
    assert image.shape == (12, 10, 3) and image.dtype == np.uint8
  assert source[3]['index'] == 3


def test_imagefolder_errors_name_the_path(tmp_path):
  root = tmp_path / 'train'
  _write_imagefolder(root)
  corrupt = root / 'zebra' / 'broken.jpg'
  corrupt.write_bytes(b'\xff\xd8\xff\xe0 this is not a jpeg')
  source = sources.ImageFolderSource(str(root))
  index = [source.path(i) for i in range(len(source))].index(str(corrupt))
  with pytest.raises(sources.ImageDecodeError) as error:
    source[index]
  assert str(corrupt) in str(error.value) and '\n' not in str(error.value)
  with pytest.raises(FileNotFoundError, match='nowhere'):
    sources.ImageFolderSource(str(tmp_path / 'nowhere'))
  (tmp_path / 'empty' / 'some_class').mkdir(parents=True)
  with pytest.raises(ValueError, match='no image files'):
    sources.ImageFolderSource(str(tmp_path / 'empty'))


def test_embedded_source_holds_real_photos():
  source = sources.EmbeddedPhotosSource(length=10)
  assert len(source) == 10 and source.num_photos >= 2
  for photo_id in range(source.num_photos):
    example = source[photo_id]
    image = example['image']
    assert image.ndim == 3 and image.shape[-1] == 3 and image.dtype == np.uint8
    assert min(image.shape[:2]) >= 200
    assert image.std() > 20  # A photograph, not a flat synthetic image.
    assert example['label'] == photo_id
  assert source[source.num_photos]['label'] == 0  # Cycles over the photos.
  assert source[9]['index'] == 9
  assert 'china.jpg' in repr(source)


def test_tfds_source_reads_mocked_array_record(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=6):
    source = sources.TfdsSource('imagenet2012', split='train', data_dir=str(tmp_path))
    assert len(source) == 6
    example = source[3]
  assert example['image'].dtype == np.uint8 and example['image'].ndim == 3
  assert example['image'].shape[-1] == 3
  assert example['label'].dtype == np.int32 and example['index'] == 3
  assert 'imagenet2012' in repr(source)


def test_tfds_not_prepared_says_how_to_prepare(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  with pytest.raises(FileNotFoundError, match='--manual_dir'):
    sources.TfdsSource('imagenet2012', data_dir=str(tmp_path))
  cfg = {'source': 'tfds', 'name': 'imagenet2012', 'split': 'train', 'data_dir': str(tmp_path)}
  with pytest.raises(ValueError, match='config.data.data_dir.*tfds build'):
    sources.validate_data_config(cfg)


def test_config_validation_names_the_field(tmp_path):
  with pytest.raises(ValueError, match="config.data.source: unknown source 'foo'"):
    sources.validate_data_config({'source': 'foo'})
  missing = str(tmp_path / 'nope.npz')
  with pytest.raises(ValueError, match='config.data.path.*nope.npz'):
    sources.validate_data_config({'source': 'npz', 'path': missing})
  with pytest.raises(ValueError, match='config.data.path.*val'):
    sources.validate_data_config({'source': 'imagefolder', 'path': str(tmp_path), 'split': 'val'})
  with pytest.raises(ValueError, match='config.data.name'):
    sources.validate_data_config({'source': 'tfds'})
  path = str(tmp_path / 'tiny.npz')
  _write_npz(path)
  with pytest.raises(ValueError, match="config.data.split.*'x_val'"):
    sources.validate_data_config({'source': 'npz', 'path': path, 'split': 'val'})
  cfg = ml_collections.ConfigDict(
    {'source': 'npz', 'path': path, 'split': 'train', 'name': '', 'data_dir': None}
  )
  assert len(data.build_source(cfg)) == 40
  assert len(data.build_source(cfg, split='test')) == 10
  embedded = data.build_source({'source': 'embedded', 'length': 12})
  assert len(embedded) == 12
  _write_imagefolder(tmp_path / 'folder' / 'train')
  folder = data.build_source(
    {'source': 'imagefolder', 'path': str(tmp_path / 'folder'), 'split': 'train'}
  )
  assert len(folder) == 4


# ----------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------


def _train_loader(source, seed=0, **kwargs):
  kwargs.setdefault('global_batch_size', 4)
  # grain's default (16 threads, 500 records ahead) is slow to start on 2 cores.
  kwargs.setdefault('read_options', grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))
  return pipeline.make_train_loader(source, _two_view(), _add_noise_and_mask, seed=seed, **kwargs)


def test_train_loader_batches_and_determinism():
  source = _ArraySource(24)
  loader_a = _train_loader(source, seed=1, read_options=None)  # Defaults.
  loader_b = _train_loader(source, seed=1)
  batches_a = [next(loader_a) for _ in range(4)]
  batches_b = [next(loader_b) for _ in range(4)]
  _assert_batches_equal(batches_a, batches_b)
  batch = batches_a[0]
  assert batch['image'].shape == (4, 8, 8, 3)
  assert batch['image'].dtype == np.uint8
  assert batch['image2'].shape == (4, 4, 4, 3)
  assert batch['mask'].shape == (4, 16) and batch['mask'].dtype == bool
  assert batch['index'].dtype == np.int64 and batch['label'].dtype == np.int32
  # Nothing was unreadable.
  assert batch['_bad'].dtype == np.int32 and not batch['_bad'].any()
  assert batch['_bad_index'].dtype == np.int64
  np.testing.assert_array_equal(batch['_bad_index'], -1)
  assert loader_a.bad_examples(batch) == []
  # Every example gets its own random stream.
  assert len(set(np.concatenate([b['noise'] for b in batches_a]))) == 16
  other = next(_train_loader(source, seed=2))
  assert not np.array_equal(other['index'], batch['index'])
  assert loader_a.describe(3) == 'index 3 of _ArraySource(24, 8)'


def test_train_loader_epochs_cover_the_data():
  source = _ArraySource(20)
  loader = _train_loader(source, num_epochs=2)
  assert len(loader) == 10 and loader.steps_per_epoch == 5
  batches = list(loader)
  assert len(batches) == 10
  first = np.concatenate([b['index'] for b in batches[:5]])
  second = np.concatenate([b['index'] for b in batches[5:]])
  assert sorted(first) == sorted(second) == list(range(20))
  assert not np.array_equal(first, second)  # Reshuffled per epoch.
  with pytest.raises(ValueError, match='not divisible by the number of processes 4'):
    _train_loader(source, global_batch_size=6, process_index=0, process_count=4)
  with pytest.raises(ValueError, match='larger than the dataset'):
    _train_loader(source, global_batch_size=24)


def test_train_loader_resumes_exactly():
  source = _ArraySource(16)
  loader = _train_loader(source, seed=5)
  for _ in range(3):
    next(loader)
  state = loader.get_state()
  assert isinstance(state, str)
  assert json.loads(state) == {
    'next_step': 3,
    'seed': 5,
    'global_batch_size': 4,
    'num_examples': 16,
    'shuffle': True,
  }
  uninterrupted = [next(loader) for _ in range(6)]  # Crosses an epoch.
  resumed_loader = _train_loader(source, seed=5)
  resumed_loader.set_state(state)
  _assert_batches_equal(uninterrupted, [next(resumed_loader) for _ in range(6)])
  with pytest.raises(ValueError, match='num_examples=16, the config says num_examples=17'):
    _train_loader(_ArraySource(17), seed=5).set_state(state)


def test_train_loader_worker_processes_change_nothing():
  source = _ArraySource(32)
  in_process = _train_loader(source, seed=7)
  expected = [next(in_process) for _ in range(6)]
  with _train_loader(source, seed=7, worker_count=2) as loader:
    batches = [next(loader) for _ in range(3)]
    state = loader.get_state()
  _assert_batches_equal(expected[:3], batches)
  assert type(batches[0]['image']) is np.ndarray  # Not shared memory.
  with pytest.raises(ValueError, match='closed'):
    next(loader)
  # A state from 2 workers resumes in-process (any worker count).
  in_process.set_state(state)
  _assert_batches_equal(expected[3:], [next(in_process) for _ in range(3)])


class _MethodWithWeights:
  """Like a method object: device weights (a teacher's) beside the host state prepare uses."""

  def __init__(self):
    self.weights = jnp.ones((256, 256), jnp.float32)
    self.offset = 3

  def prepare(self, example, rng):
    example = _add_noise_and_mask(example, rng)
    example['label'] = example['label'] + self.offset
    return example

  def prepare_using_weights(self, example, rng):
    del rng
    example['label'] = example['label'] + int(np.asarray(self.weights)[0, 0])
    return example


def test_worker_processes_get_the_methods_host_state_without_its_device_arrays(monkeypatch):
  """grain hands the transform and the bound `method.prepare` (the whole method object) to its
  worker processes by pickling. A device array unpickled there started the default backend in
  the worker, which failed on a GPU host (BENCHMARKS.md §13), and copied the teacher's weights
  into every worker. Here a worker can start no backend at all (as on that host)."""
  import cloudpickle  # pylint: disable=g-import-not-at-top

  method = _MethodWithWeights()
  source = _ArraySource(32)
  kwargs = dict(global_batch_size=4, read_options=grain.ReadOptions(num_threads=2))
  expected = pipeline.make_train_loader(source, _two_view(), method.prepare, seed=7, **kwargs)
  expected = [next(expected) for _ in range(2)]
  assert (expected[0]['label'] >= 3).all()
  monkeypatch.setenv('JAX_PLATFORMS', 'no_such_platform')  # the workers' environment
  with pipeline.make_train_loader(
    source, _two_view(), method.prepare, seed=7, worker_count=2, **kwargs
  ) as loader:
    _assert_batches_equal(expected, [next(loader) for _ in range(2)])
  blob = cloudpickle.dumps(pipeline._TransformAndPrepare(_two_view(), method.prepare))
  assert len(blob) < 64 * 1024, len(blob)  # not the 256 KiB of weights
  misuse = cloudpickle.loads(
    cloudpickle.dumps(pipeline._TransformAndPrepare(None, method.prepare_using_weights))
  )
  example = {'image': np.zeros((8, 8, 3), np.uint8), 'label': np.int32(0)}
  with pytest.raises(RuntimeError, match=r'device array \(256, 256\) float32 of the method'):
    misuse(example, np.random.SeedSequence(0))


@pytest.mark.parametrize('num_examples', [10, 11])
def test_eval_loader_covers_each_example_once(num_examples):
  source = _ArraySource(num_examples)
  valid_indices, batch_counts = [], []
  for shard_index in range(2):
    loader = pipeline.make_eval_loader(
      source,
      data.EvalTransform(4),
      global_batch_size=4,
      shard_options=grain.ShardOptions(shard_index, 2),
    )
    batches = list(loader)
    batch_counts.append(len(batches))
    assert len(batches) == len(loader)
    for batch in batches:
      assert batch['image'].shape == (2, 4, 4, 3)
      assert batch['valid'].dtype == bool
      valid_indices.extend(batch['index'][batch['valid']].tolist())
      # Images still match their index (value i at every pixel).
      np.testing.assert_array_equal(batch['image'][:, 0, 0, 0], batch['index'] % 256)
  assert batch_counts[0] == batch_counts[1] == 3
  assert sorted(valid_indices) == list(range(num_examples))
  assert valid_indices == sorted(valid_indices)  # In order.


def test_real_images_from_shared_data(shared_data):
  npz = data.build_source(
    {'source': 'npz', 'split': 'test', 'path': os.path.join(shared_data, 'imagenette2_32.npz')}
  )
  assert len(npz) == 3925 and npz[0]['image'].shape == (32, 32, 3)
  folder = data.build_source(
    {
      'source': 'imagefolder',
      'split': 'val',
      'path': os.path.join(shared_data, 'imagenette2_224_sample'),
    }
  )
  assert len(folder) == 200 and len(folder.classes) == 10
  loader = pipeline.make_train_loader(
    folder,
    data.TwoViewTransform(image_size=224, second_image_size=112),
    global_batch_size=8,
    seed=0,
  )
  batch = next(loader)
  assert batch['image'].shape == (8, 224, 224, 3)
  assert batch['image2'].shape == (8, 112, 112, 3)
  assert batch['image'].std() > 20
