"""grain input pipelines: training batches that depend only on the global step.

Train: the global example order is epoch after epoch of a permutation of the
source, keyed by (seed, epoch); the last partial batch of each epoch is
dropped, and step s is positions [s*B, (s+1)*B) of that order (B the global
batch size). Each process builds only its rows of that global batch, and
each example's augmentation and method-specific randomness are keyed by
(seed, global position), so a batch is the same for any number of processes,
grain workers or restarts. One grain record is one process's whole batch of
one step, read through a sequential sampler; grain's workers build steps in
parallel and hand them back in order.

Because batches are global, the loader's state is one record for the whole
job, {"next_step", "seed", "global_batch_size", "num_examples", "shuffle"}:
every process writes the same one, and a checkpoint resumes on any process
count.

An example whose read or decode fails (OSError/ValueError, e.g.
`ImageDecodeError`) is replaced by the next readable source index after it,
with the randomness of the original position, so the replacement is the same
on resume; the batch marks it in `_bad` / `_bad_index`.

Eval: every example of the split exactly once, in order, each process taking
a contiguous shard; the last batch is padded and carries a `valid` mask so
all processes run the same number of steps.
"""

import collections
from collections.abc import Callable, Iterator
import concurrent.futures
import json
import math
import threading
from typing import Any
import weakref

from absl import flags
import grain.python as grain
import jax
import numpy as np

Example = dict[str, Any]
TrainTransform = Callable[[Example, np.random.Generator], Example]
PrepareFn = Callable[[Example, np.random.Generator], Example]
EvalTransformFn = Callable[[Example], Example]

# What a failed read or decode raises in the sources (ImageDecodeError is a
# ValueError); anything else is a bug and stops the run.
READ_ERRORS = (OSError, ValueError)
# Source indices tried, from the failed one on, before giving up.
MAX_READ_TRIES = 100
# Steps of grain's sampler for an endless loader (never reached).
_ENDLESS_STEPS = 2**40
# Leading words of the seed sequences, so the order and the per-example
# streams never share a key.
_ORDER_STREAM = 1
_EXAMPLE_STREAM = 2
# The fields of a training-loader state that must match to resume.
_STATE_FIELDS = ('seed', 'global_batch_size', 'num_examples', 'shuffle')


class UnreadableDataError(ValueError):
  """MAX_READ_TRIES source examples in a row failed to read or decode."""


def _mark_absl_flags_parsed() -> None:
  # grain reads its --grain_* absl flags in worker processes, which raise
  # UnparsedFlagAccessError when the program never parsed flags (notebooks,
  # pytest, scripts without absl.app). The workers inherit this state.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _per_process_batch_size(global_batch_size: int, shard_options: grain.ShardOptions) -> int:
  if global_batch_size <= 0:
    raise ValueError(f'global_batch_size must be positive, got {global_batch_size}')
  if global_batch_size % shard_options.shard_count:
    raise ValueError(
      f'global_batch_size {global_batch_size} is not divisible by the '
      f'number of processes {shard_options.shard_count}'
    )
  return global_batch_size // shard_options.shard_count


def describe_example(source, index: int) -> str:
  """Where source example `index` lives: its file path or record, for logs."""
  for method in ('describe', 'path'):
    describe = getattr(source, method, None)
    if callable(describe):
      return str(describe(int(index)))
  return f'index {int(index)} of {source!r}'


class _DeviceArrayLeftBehind:
  """What a loader worker process holds in place of a jax.Array that the transform or the
  method's prepare reaches (a bound `method.prepare` carries the whole method: its teacher's
  and tokenizer's weights). prepare is host work on numpy; shipping the arrays would copy
  them into every worker, and unpickling one there would start the default backend in the
  worker, which fails on a GPU or TPU host the trainer already holds (BENCHMARKS.md §13)."""

  def __init__(self, shape: tuple[int, ...], dtype: str):
    self.shape, self.dtype = shape, dtype

  def __getattr__(self, name):
    if name.startswith('__'):  # pickle and copy probe for optional hooks
      raise AttributeError(name)
    raise RuntimeError(self._why())

  def __array__(self, *args, **kwargs):
    raise RuntimeError(self._why())

  def _why(self) -> str:
    return (
      f'a grain worker used a device array {self.shape} {self.dtype} of the method: '
      'prepare must work on host (numpy) state only'
    )


def _host_pickle(obj) -> bytes:
  """cloudpickle (what grain sends to its worker processes) with every jax.Array replaced."""
  import io  # pylint: disable=g-import-not-at-top

  import cloudpickle  # pylint: disable=g-import-not-at-top

  class Pickler(cloudpickle.Pickler):
    def reducer_override(self, o):
      if isinstance(o, jax.Array):
        return _DeviceArrayLeftBehind, (tuple(o.shape), str(o.dtype))
      return super().reducer_override(o)

  buf = io.BytesIO()
  Pickler(buf).dump(obj)
  return buf.getvalue()


class _TransformAndPrepare:
  """The method-independent augmentation, then the method's own prepare."""

  def __init__(self, transform: TrainTransform | None, prepare_fn: PrepareFn | None):
    self._transform = transform
    self._prepare_fn = prepare_fn

  def __getstate__(self):  # for grain's worker processes: host state only
    return {'host': _host_pickle((self._transform, self._prepare_fn))}

  def __setstate__(self, state):
    import cloudpickle  # pylint: disable=g-import-not-at-top

    self._transform, self._prepare_fn = cloudpickle.loads(state['host'])

  def __call__(self, element: Example, seed: np.random.SeedSequence) -> Example:
    if self._transform is None and self._prepare_fn is None:
      return element
    # Separate streams, so e.g. turning hflip off leaves the masks unchanged.
    transform_seed, prepare_seed = seed.spawn(2)
    if self._transform is not None:
      element = self._transform(element, np.random.default_rng(transform_seed))
    if self._prepare_fn is not None:
      element = self._prepare_fn(element, np.random.default_rng(prepare_seed))
    return element


class _StepBatchSource:
  """grain record k = this process's rows of the global batch of step start+k.

  Row r of step s is global position p = s*B + r: source index
  order(epoch)[p - epoch * steps_per_epoch * B] with epoch = s //
  steps_per_epoch, augmented with the seed sequence (seed, p). Reads of one
  batch run on `read_threads` threads; the transforms run in order.
  """

  def __init__(
    self,
    source,
    transform: _TransformAndPrepare,
    *,
    rows: np.ndarray,
    global_batch_size: int,
    seed: int,
    shuffle: bool,
    steps_per_epoch: int,
    start_step: int,
    num_steps: int,
    read_threads: int,
  ):
    self._source = source
    self._transform = transform
    self._rows = rows
    self._global_batch_size = global_batch_size
    self._seed = seed
    self._shuffle = shuffle
    self._steps_per_epoch = steps_per_epoch
    self._start_step = start_step
    self._num_steps = num_steps
    self._read_threads = max(0, min(read_threads, len(rows)))
    self._num_examples = len(source)
    self._init_process_local()

  def _init_process_local(self) -> None:
    # Rebuilt in each grain worker, never pickled.
    self._lock = threading.Lock()
    self._orders = collections.OrderedDict()  # epoch -> permutation
    self._pool = None
    self._closed = False

  def __getstate__(self):
    state = dict(self.__dict__)
    for name in ('_lock', '_orders', '_pool', '_closed'):
      del state[name]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_process_local()

  def __len__(self) -> int:
    return self._num_steps

  def __repr__(self) -> str:
    return (
      f'_StepBatchSource({self._source!r}, global_batch_size='
      f'{self._global_batch_size}, seed={self._seed}, shuffle='
      f'{self._shuffle}, start_step={self._start_step})'
    )

  def _order(self, epoch: int) -> np.ndarray:
    """Source indices of the epoch's positions; the last two are cached."""
    with self._lock:
      order = self._orders.get(epoch)
      if order is None:
        seed = np.random.SeedSequence([_ORDER_STREAM, self._seed, epoch])
        order = np.random.default_rng(seed).permutation(self._num_examples)
        self._orders[epoch] = order
        while len(self._orders) > 2:  # Workers may straddle an epoch end.
          self._orders.popitem(last=False)
      return order

  def _read(self, index: int) -> tuple[Example, int]:
    """(source[index], -1), or the first readable example after it and index."""
    try:
      return self._source[index], -1
    except READ_ERRORS as e:
      first_error = f'{type(e).__name__}: {" ".join(str(e).split())}'
    tries = min(MAX_READ_TRIES, self._num_examples)
    for offset in range(1, tries):
      try:
        return self._source[(index + offset) % self._num_examples], index
      except READ_ERRORS:
        pass
    failed = [
      describe_example(self._source, (index + offset) % self._num_examples)
      for offset in range(tries)
    ]
    shown = ', '.join(failed[:10]) + (', ...' if len(failed) > 10 else '')
    raise UnreadableDataError(
      f'{tries} examples in a row could not be read (source index {index} '
      f'and the {tries - 1} after it): {shown}; the first error: '
      f'{first_error}'
    )

  def _read_all(self, indices: np.ndarray) -> list[tuple[Example, int]]:
    if self._read_threads > 1:
      with self._lock:
        if self._pool is None and not self._closed:
          self._pool = concurrent.futures.ThreadPoolExecutor(
            self._read_threads, thread_name_prefix='mim-jax-read'
          )
        pool = self._pool
      if pool is not None:
        return list(pool.map(self._read, indices.tolist()))
    return [self._read(index) for index in indices.tolist()]

  def __getitem__(self, record: int) -> dict[str, np.ndarray]:
    step = self._start_step + int(record)
    epoch, step_in_epoch = divmod(step, self._steps_per_epoch)
    positions_in_epoch = step_in_epoch * self._global_batch_size + self._rows
    if self._shuffle:
      indices = self._order(epoch)[positions_in_epoch]
    else:
      indices = positions_in_epoch
    positions = step * self._global_batch_size + self._rows
    examples, bad_index = [], []
    for (example, bad), position in zip(self._read_all(indices), positions.tolist()):
      seed = np.random.SeedSequence([_EXAMPLE_STREAM, self._seed, position])
      examples.append(self._transform(dict(example), seed))
      bad_index.append(bad)
    batch = jax.tree_util.tree_map(lambda *rows: np.stack(rows), *examples)
    bad_index = np.asarray(bad_index, np.int64)
    batch['_bad'] = (bad_index >= 0).astype(np.int32)
    batch['_bad_index'] = bad_index
    return batch

  def close(self) -> None:
    with self._lock:
      self._closed = True
      pool, self._pool = self._pool, None
    if pool is not None:
      pool.shutdown(wait=False, cancel_futures=True)


def _close_and_release(holder: list[Any]) -> None:
  for item in holder:
    if isinstance(item, _StepBatchSource):
      item.close()  # After its grain iterator: nothing reads from it now.
      continue
    inner = getattr(item, '_iterator', None)  # grain's DatasetIterator.
    if inner is not None:
      inner.close()
  holder.clear()


class Loader:
  """Iterator of per-process batches (dicts of numpy arrays).

  The evaluation loader is this class; the training loader is `TrainLoader`.
  `close()` (or leaving a `with` block) stops grain's worker processes.
  """

  def __init__(
    self,
    data_loader: grain.DataLoader | None,
    *,
    per_process_batch_size: int,
    global_batch_size: int,
    num_batches: int | None,
    steps_per_epoch: int | None = None,
  ):
    # The only references to the grain iterator (and the batch source it
    # reads), which the finalizer closes and drops at garbage collection or,
    # at the latest, at interpreter exit while modules still exist (grain's
    # own __del__ fails after that).
    self._holder = []
    self._finalizer = weakref.finalize(self, _close_and_release, self._holder)
    self.per_process_batch_size = per_process_batch_size
    self.global_batch_size = global_batch_size
    self.num_batches = num_batches  # None: endless.
    self.steps_per_epoch = steps_per_epoch
    self._start(data_loader)

  def _start(self, data_loader: grain.DataLoader | None, *resources: Any) -> None:
    """Replaces the grain iterator by a fresh one of `data_loader`."""
    _close_and_release(self._holder)
    self._data_loader = data_loader
    if data_loader is None:  # Nothing left to read.
      self._copy_from_shared_memory = False
      self._holder.append(iter(()))
    else:
      self._copy_from_shared_memory = data_loader.multiprocessing_options.num_workers > 0
      self._holder.append(iter(data_loader))
    self._holder.extend(resources)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  @property
  def _iterator(self) -> Iterator[dict[str, np.ndarray]]:
    if not self._finalizer.alive or not self._holder:
      raise ValueError('this Loader was closed')
    return self._holder[0]

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    if self._copy_from_shared_memory:
      # Worker batches arrive as SharedMemoryArrays; a plain copy frees the
      # segment at once instead of whenever the caller drops the batch.
      batch = jax.tree_util.tree_map(np.array, batch)
    return batch

  def __len__(self) -> int:
    if self.num_batches is None:
      raise TypeError('an endless loader (num_epochs=None) has no length')
    return self.num_batches

  def get_state(self) -> str:
    return self._iterator.get_state().decode()

  def set_state(self, state: str | bytes) -> None:
    if isinstance(state, str):
      state = state.encode()
    self._iterator.set_state(state)

  def close(self) -> None:
    """Stops worker processes now; the loader cannot be used afterwards."""
    self._finalizer()

  def __enter__(self) -> 'Loader':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


class TrainLoader(Loader):
  """Training batches of this process; state = the next global step.

  `get_state()` returns JSON text of one record for the whole job (the same
  on every process); `set_state(text)` continues at its step on a loader
  built for the same seed, batch size, source length and shuffle (any
  process count, rows or worker_count), and raises ValueError naming a field
  that differs.
  """

  def __init__(
    self,
    make_data_loader: Callable[[int], tuple[Any, Any]],
    *,
    source,
    start_step: int,
    seed: int,
    shuffle: bool,
    per_process_batch_size: int,
    global_batch_size: int,
    num_batches: int | None,
    steps_per_epoch: int,
  ):
    self._make_data_loader = make_data_loader
    self._source = source
    self._seed = seed
    self._shuffle = shuffle
    self._next_step = start_step
    super().__init__(
      None,
      per_process_batch_size=per_process_batch_size,
      global_batch_size=global_batch_size,
      num_batches=num_batches,
      steps_per_epoch=steps_per_epoch,
    )
    self._restart(start_step)

  def _restart(self, step: int) -> None:
    if not self._finalizer.alive:
      raise ValueError('this Loader was closed')
    self._start(*self._make_data_loader(step))
    self._next_step = step

  @property
  def next_step(self) -> int:
    """The global step of the batch `next()` returns."""
    return self._next_step

  def __next__(self) -> dict[str, np.ndarray]:
    batch = super().__next__()
    self._next_step += 1
    return batch

  def _identity(self) -> dict[str, Any]:
    return {
      'seed': self._seed,
      'global_batch_size': self.global_batch_size,
      'num_examples': len(self._source),
      'shuffle': self._shuffle,
    }

  def get_state(self) -> str:
    return json.dumps({'next_step': self._next_step, **self._identity()})

  def set_state(self, state: str | bytes) -> None:
    """Continues at the state's step; ValueError if its data order differs."""
    try:
      saved = json.loads(state)
    except ValueError:
      saved = None
    next_step = saved.get('next_step') if isinstance(saved, dict) else None
    if not isinstance(next_step, int) or next_step < 0:
      raise ValueError(
        'data state in the checkpoint is not a training-loader state with '
        'a next_step (written by an older mim_jax with per-process grain '
        'states?); it cannot be resumed'
      )
    for field, value in self._identity().items():
      if field in saved and saved[field] != value:
        raise ValueError(
          f'data state in the checkpoint has {field}='
          f'{saved[field]!r}, the config says {field}={value!r}'
        )
    self._restart(next_step)

  def describe(self, index: int) -> str:
    """Where source example `index` lives (file path or record)."""
    return describe_example(self._source, index)

  def bad_examples(self, batch: dict[str, np.ndarray]) -> list[str]:
    """Descriptions of the examples this local batch replaced (unreadable)."""
    bad = np.asarray(batch['_bad']).astype(bool)
    return [self.describe(index) for index in np.asarray(batch['_bad_index'])[bad].tolist()]


def _train_rows(
  global_batch_size: int, rows, process_index: int | None, process_count: int | None
) -> np.ndarray:
  """The global rows this process loads (checked)."""
  if rows is None:
    if (process_index is None) != (process_count is None):
      raise ValueError('pass both process_index and process_count, or neither')
    if process_count is None:
      process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} is not in [0, {process_count})')
    if global_batch_size % process_count:
      raise ValueError(
        f'global_batch_size {global_batch_size} is not divisible by the '
        f'number of processes {process_count}'
      )
    size = global_batch_size // process_count
    return np.arange(process_index * size, (process_index + 1) * size)
  rows = np.asarray(rows)
  if (
    rows.ndim != 1
    or not rows.size
    or rows.dtype.kind not in 'iu'
    or np.any(np.diff(rows) <= 0)
    or rows[0] < 0
    or rows[-1] >= global_batch_size
  ):
    raise ValueError(
      f'rows must be increasing global batch rows in [0, {global_batch_size}), got {rows.tolist()}'
    )
  return rows.astype(np.int64)


def make_train_loader(
  source,
  transform: TrainTransform | None,
  prepare_fn: PrepareFn | None = None,
  *,
  global_batch_size: int,
  seed: int,
  num_epochs: int | None = None,
  shuffle: bool = True,
  worker_count: int = 0,
  worker_buffer_size: int = 2,
  read_options: grain.ReadOptions | None = None,
  drop_remainder: bool = True,
  start_step: int = 0,
  rows: np.ndarray | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
) -> TrainLoader:
  """Training batches for this process: its rows of each global batch.

  Args:
    source: random-access source (see `sources.py`).
    transform: `transform(example, rng) -> example`, e.g. TwoViewTransform;
      None keeps examples as they are.
    prepare_fn: the method's host-side per-example work (masks,
      permutations), `prepare_fn(example, rng) -> example`; applied after
      `transform` with its own random stream.
    global_batch_size: batch over all processes.
    seed: order and augmentation seed (a non-negative int).
    num_epochs: None repeats forever (each epoch reshuffled); n gives
      n * steps_per_epoch steps in all (counted from step 0).
    shuffle: shuffle the example order (a new permutation each epoch).
    worker_count: 0 builds batches in this process (one ahead, on a thread);
      > 0 spawns grain worker processes, each building whole batches.
    worker_buffer_size: batches each worker prepares ahead.
    read_options: `num_threads` reads the examples of a batch in parallel
      (default 16); `prefetch_buffer_size` is ignored (one batch is read
      ahead per process).
    drop_remainder: must be True: each epoch's last partial batch is dropped.
    start_step: the global step of the first batch.
    rows: sorted global batch rows this process loads (from the batch
      sharding); default: the contiguous block [p*b, (p+1)*b) of process p,
      b = global_batch_size / process count.
    process_index, process_count: the p and count of the default rows;
      default jax's (tests pass them to simulate several processes).

  Returns:
    A TrainLoader of dicts of numpy arrays with a leading batch dim of
    len(rows), including int32 `_bad` (1 where an unreadable example was
    replaced) and int64 `_bad_index` (that example's source index, or -1).
  """
  if not isinstance(global_batch_size, (int, np.integer)) or global_batch_size <= 0:
    raise ValueError(f'global_batch_size must be a positive int, got {global_batch_size!r}')
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'seed must be a non-negative int, got {seed!r}')
  if not isinstance(start_step, (int, np.integer)) or start_step < 0:
    raise ValueError(f'start_step must be a non-negative int, got {start_step!r}')
  if num_epochs is not None and num_epochs <= 0:
    raise ValueError(f'num_epochs must be positive or None, got {num_epochs}')
  if not drop_remainder:
    raise ValueError('drop_remainder=False is not supported: every step is a whole global batch')
  global_batch_size, seed = int(global_batch_size), int(seed)
  start_step = int(start_step)
  rows = _train_rows(global_batch_size, rows, process_index, process_count)
  num_examples = len(source)
  steps_per_epoch = num_examples // global_batch_size
  if steps_per_epoch == 0:
    raise ValueError(
      f'global_batch_size {global_batch_size} is larger than the dataset ({num_examples} examples)'
    )
  num_batches = None if num_epochs is None else num_epochs * steps_per_epoch
  if worker_count > 0:
    _mark_absl_flags_parsed()
  read_threads = (read_options or grain.ReadOptions()).num_threads
  transform_and_prepare = _TransformAndPrepare(transform, prepare_fn)

  def make_data_loader(step: int) -> tuple[Any, ...]:
    num_steps = _ENDLESS_STEPS if num_batches is None else num_batches - step
    if num_steps <= 0:
      return (None,)
    batch_source = _StepBatchSource(
      source,
      transform_and_prepare,
      rows=rows,
      global_batch_size=global_batch_size,
      seed=seed,
      shuffle=shuffle,
      steps_per_epoch=steps_per_epoch,
      start_step=step,
      num_steps=num_steps,
      read_threads=read_threads,
    )
    # Records are whole batches in step order: no shuffling, sharding or
    # batching in grain; one batch is read ahead per process.
    data_loader = grain.DataLoader(
      data_source=batch_source,
      sampler=grain.SequentialSampler(num_steps, grain.NoSharding()),
      worker_count=worker_count,
      worker_buffer_size=worker_buffer_size,
      shard_options=grain.NoSharding(),
      read_options=grain.ReadOptions(num_threads=1, prefetch_buffer_size=1),
    )
    return data_loader, batch_source

  return TrainLoader(
    make_data_loader,
    source=source,
    start_step=start_step,
    seed=seed,
    shuffle=shuffle,
    per_process_batch_size=len(rows),
    global_batch_size=global_batch_size,
    num_batches=num_batches,
    steps_per_epoch=steps_per_epoch,
  )


class PaddedShardSource:
  """One process's contiguous shard of a source, padded to whole batches.

  Slots past the shard's end repeat its first example with valid=False, so
  every process yields the same number of batches.
  """

  def __init__(self, source, shard_index: int, shard_count: int, batch_size: int):
    self._source = source
    self.shard_index = shard_index
    self.shard_count = shard_count
    num_examples = len(source)
    # Same split as grain's even_split without dropping: the first
    # (num_examples % shard_count) shards get one extra example.
    base, extra = divmod(num_examples, shard_count)
    self.start = shard_index * base + min(shard_index, extra)
    self.num_valid = base + (1 if shard_index < extra else 0)
    largest_shard = base + (1 if extra else 0)
    self.num_batches = max(1, math.ceil(largest_shard / batch_size))
    self._length = self.num_batches * batch_size

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> Example:
    valid = index < self.num_valid
    position = self.start + index if valid else min(self.start, len(self._source) - 1)
    example = dict(self._source[position])
    example['valid'] = np.bool_(valid)
    return example

  def __repr__(self) -> str:
    return (
      f'PaddedShardSource({self._source!r}, shard_index='
      f'{self.shard_index}, shard_count={self.shard_count}, '
      f'length={self._length})'
    )


class _EvalMap(grain.MapTransform):
  """Applies a deterministic transform and keeps the padding mask."""

  def __init__(self, transform: EvalTransformFn | None):
    self._transform = transform

  def map(self, element: Example) -> Example:
    valid = element.pop('valid')
    if self._transform is not None:
      element = self._transform(element)
    element['valid'] = valid
    return element


def make_eval_loader(
  source,
  transform: EvalTransformFn | None,
  *,
  global_batch_size: int,
  worker_count: int = 0,
  worker_buffer_size: int = 2,
  read_options: grain.ReadOptions | None = None,
  shard_options: grain.ShardOptions | None = None,
) -> Loader:
  """One ordered pass over a split; batches carry a bool `valid` mask.

  Each process reads a contiguous shard; padding examples (valid=False) fill
  the last batch and equalise the batch count across processes, so drop
  them from metrics with the mask.
  """
  shard_options = shard_options or grain.ShardByJaxProcess()
  batch_size = _per_process_batch_size(global_batch_size, shard_options)
  padded = PaddedShardSource(
    source, shard_options.shard_index, shard_options.shard_count, batch_size
  )
  if worker_count > 0:
    _mark_absl_flags_parsed()
  # The shard is already this process's: no further sharding in grain.
  sampler = grain.IndexSampler(
    num_records=len(padded), shard_options=grain.NoSharding(), shuffle=False, num_epochs=1
  )
  data_loader = grain.DataLoader(
    data_source=padded,
    sampler=sampler,
    operations=[_EvalMap(transform), grain.Batch(batch_size=batch_size, drop_remainder=False)],
    worker_count=worker_count,
    worker_buffer_size=worker_buffer_size,
    shard_options=grain.NoSharding(),
    read_options=read_options,
  )
  return Loader(
    data_loader,
    per_process_batch_size=batch_size,
    global_batch_size=global_batch_size,
    num_batches=padded.num_batches,
  )
