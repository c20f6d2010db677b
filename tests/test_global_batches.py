"""The training loader's batches depend only on (seed, global step).

Several processes are simulated in one with process_index/process_count or
explicit rows; the concatenation of their batches must be the 1-process
batch bit for bit, also across restarts and for replaced unreadable files.
"""

import json
import os
import pickle

import grain.python as grain
import numpy as np
from PIL import Image
import pytest

from mim_jax.data import pipeline
from mim_jax.data import sources
from mim_jax.data import transforms


class _ArraySource:
  """Image i is filled with value i % 256."""

  def __init__(self, length):
    self.length = length

  def __len__(self):
    return self.length

  def __getitem__(self, index):
    return {
      'image': np.full((8, 8, 3), index % 256, np.uint8),
      'label': np.int32(index % 3),
      'index': np.int64(index),
    }

  def __repr__(self):
    return f'_ArraySource({self.length})'


class _UnreadableSource(_ArraySource):
  def __getitem__(self, index):
    raise OSError(f'disk gone at {index}')

  def __repr__(self):
    return f'_UnreadableSource({self.length})'


def _add_noise(example, rng):
  example['noise'] = np.float32(rng.random())
  return example


def _loader(source, **kwargs):
  kwargs.setdefault('global_batch_size', 8)
  kwargs.setdefault('seed', 3)
  kwargs.setdefault('read_options', grain.ReadOptions(num_threads=2))
  transform = transforms.TwoViewTransform(image_size=8, second_image_size=4, color_jitter=0.4)
  return pipeline.make_train_loader(source, transform, _add_noise, **kwargs)


def _take(loader, count):
  return [next(loader) for _ in range(count)]


def _concat(per_process_batches):
  """Step-wise concatenation of several processes' batches."""
  return [
    {key: np.concatenate([batch[key] for batch in step]) for key in step[0]}
    for step in zip(*per_process_batches)
  ]


def _assert_equal(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for step, (batch_a, batch_b) in enumerate(zip(batches_a, batches_b)):
    assert batch_a.keys() == batch_b.keys()
    for key in batch_a:
      np.testing.assert_array_equal(batch_a[key], batch_b[key], err_msg=f'step {step} {key}')


@pytest.mark.parametrize('process_count', [2, 4])
def test_processes_together_load_the_one_process_batch(process_count):
  source = _ArraySource(24)  # 3 steps per epoch: steps 0..5 cross one.
  single = _take(_loader(source), 6)
  per_process = []
  for process_index in range(process_count):
    loader = _loader(source, process_index=process_index, process_count=process_count)
    assert loader.per_process_batch_size == 8 // process_count
    per_process.append(_take(loader, 6))
  _assert_equal(single, _concat(per_process))
  # The augmentation really is per example (not the same for all rows).
  assert len({float(x) for batch in single for x in batch['noise']}) == 48


def test_non_contiguous_rows():
  source = _ArraySource(24)
  single = _take(_loader(source), 6)
  even = _take(_loader(source, rows=np.arange(0, 8, 2)), 6)
  odd = _take(_loader(source, rows=np.array([1, 3, 5, 7])), 6)
  for full, even_rows, odd_rows in zip(single, even, odd):
    for key in full:
      np.testing.assert_array_equal(full[key][0::2], even_rows[key])
      np.testing.assert_array_equal(full[key][1::2], odd_rows[key])
  for bad_rows in ([3, 1], [0, 8], [[0, 1]], []):
    with pytest.raises(ValueError, match='rows must be increasing'):
      _loader(source, rows=np.array(bad_rows, np.int64))


def test_start_step_and_state_continue_exactly():
  source = _ArraySource(24)
  loader = _loader(source, num_epochs=3)
  assert len(loader) == 9 and loader.steps_per_epoch == 3
  everything = list(loader)
  assert len(everything) == 9
  _assert_equal(everything[4:], list(_loader(source, num_epochs=3, start_step=4)))
  assert list(_loader(source, num_epochs=3, start_step=9)) == []
  # A state saved by 1 process resumes on process 1 of 2, and back.
  state = _loader(source, start_step=5).get_state()
  assert json.loads(state)['next_step'] == 5
  second_half = _loader(source, process_index=1, process_count=2)
  second_half.set_state(state)
  _assert_equal([{k: v[4:] for k, v in b.items()} for b in everything[5:7]], _take(second_half, 2))
  one_process = _loader(source)
  one_process.set_state(second_half.get_state())
  _assert_equal(everything[7:9], _take(one_process, 2))


@pytest.mark.parametrize(
  'field, change, saved, config',
  [
    ('seed', {'seed': 4}, '3', '4'),
    ('num_examples', {'source': _ArraySource(25)}, '24', '25'),
    ('global_batch_size', {'global_batch_size': 4}, '8', '4'),
    ('shuffle', {'shuffle': False}, 'True', 'False'),
  ],
)
def test_set_state_names_the_field_that_differs(field, change, saved, config):
  state = _loader(_ArraySource(24), start_step=2).get_state()
  kwargs = dict(change)
  other = _loader(kwargs.pop('source', _ArraySource(24)), **kwargs)
  with pytest.raises(ValueError) as error:
    other.set_state(state)
  assert str(error.value) == (
    f'data state in the checkpoint has {field}={saved}, the config says {field}={config}'
  )


def test_set_state_refuses_an_old_grain_state():
  grain_state = json.dumps({'version': 2, 'last_seen_indices': {'0': 3}, 'worker_count': 0})
  with pytest.raises(ValueError, match='not a training-loader state'):
    _loader(_ArraySource(24)).set_state(grain_state)


def test_epochs_reshuffle_and_drop_the_remainder():
  source = _ArraySource(22)  # 5 steps of 4 per epoch; 2 examples dropped.
  batches = list(_loader(source, global_batch_size=4, num_epochs=3))
  assert len(batches) == 15
  epochs = [np.concatenate([b['index'] for b in batches[5 * e : 5 * e + 5]]) for e in range(3)]
  for order in epochs:
    assert len(set(order.tolist())) == 20  # No example twice in an epoch.
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])
  in_order = list(_loader(source, global_batch_size=4, num_epochs=2, shuffle=False))
  indices = np.concatenate([b['index'] for b in in_order])
  np.testing.assert_array_equal(indices, np.tile(np.arange(20), 2))
  # Each epoch's randomness differs too (keyed by the global position).
  assert not np.array_equal(in_order[0]['noise'], in_order[5]['noise'])


def _write_folder_with_corrupt_jpeg(root):
  rng = np.random.default_rng(0)
  for class_name in ('a', 'b'):
    os.makedirs(root / class_name)
    for i in range(4):
      pixels = rng.integers(0, 256, (12, 10, 3), np.uint8)
      Image.fromarray(pixels).save(root / class_name / f'{i}.jpg')
  corrupt = root / 'a' / '2_broken.jpg'
  corrupt.write_bytes(b'\xff\xd8\xff\xe0 this is not a jpeg')
  return str(corrupt)


def test_corrupt_jpeg_is_replaced_the_same_way_everywhere(tmp_path):
  corrupt = _write_folder_with_corrupt_jpeg(tmp_path)
  source = sources.ImageFolderSource(str(tmp_path))
  corrupt_index = [source.path(i) for i in range(len(source))].index(corrupt)
  with pytest.raises(sources.ImageDecodeError) as error:
    source[corrupt_index]
  assert error.value.path == corrupt
  assert pickle.loads(pickle.dumps(error.value)).path == corrupt  # Workers.
  loader = _loader(source, global_batch_size=4)  # 9 files: 2 steps/epoch.
  assert loader.describe(corrupt_index) == corrupt
  batches = _take(loader, 8)
  bad_steps = [step for step, batch in enumerate(batches) if batch['_bad'].any()]
  assert bad_steps  # In 3 of 4 epochs at least (1 in 9 is dropped).
  for step in bad_steps:
    batch = batches[step]
    row = int(np.flatnonzero(batch['_bad'])[0])
    assert batch['_bad'].sum() == 1
    assert batch['_bad_index'][row] == corrupt_index
    assert batch['index'][row] == corrupt_index + 1  # The next readable one.
    assert set(np.flatnonzero(batch['_bad_index'] >= 0)) == {row}
    assert loader.bad_examples(batch) == [corrupt]
    # The same batch after a restart at that step and on 2 processes.
    _assert_equal([batch], _take(_loader(source, global_batch_size=4, start_step=step), 1))
    halves = [
      _take(
        _loader(source, global_batch_size=4, start_step=step, process_index=p, process_count=2), 1
      )
      for p in range(2)
    ]
    _assert_equal([batch], _concat(halves))


def test_unreadable_everywhere_stops_with_one_line():
  loader = _loader(_UnreadableSource(5), global_batch_size=4)
  with pytest.raises(pipeline.UnreadableDataError) as error:
    next(loader)
  message = str(error.value)
  assert '\n' not in message
  assert '5 examples in a row could not be read' in message
  assert '(source index ' in message and 'and the 4 after it)' in message
  for index in range(5):
    assert f'index {index} of _UnreadableSource(5)' in message
  assert 'OSError: disk gone at' in message
