"""grain input pipelines: per-process batches with exact, resumable order.

Train: IndexSampler (global shuffle per epoch, sharded per JAX process) ->
source[i] -> RandomMap(transform, prepare_fn) -> Batch(per-process batch).
Per-example randomness comes from grain's per-record Generator
(Philox(seed + global position)), so an example's augmentation depends only
on the seed and its position in the sampled order, never on restarts. Which
examples share a batch does depend on worker_count (each grain worker batches
its own interleaved slice of the order), so resume with the same count;
grain's state check refuses any other.

Eval: every example of the split exactly once, in order, each process taking
a contiguous shard; the last batch is padded and carries a `valid` mask so
all processes run the same number of steps.
"""
import math
import weakref
from typing import Any, Callable, Iterator

from absl import flags
import grain.python as grain
import jax
import numpy as np

Example = dict[str, Any]
TrainTransform = Callable[[Example, np.random.Generator], Example]
PrepareFn = Callable[[Example, np.random.Generator], Example]
EvalTransformFn = Callable[[Example], Example]


def _mark_absl_flags_parsed() -> None:
  # grain reads its --grain_* absl flags in worker processes, which raise
  # UnparsedFlagAccessError when the program never parsed flags (notebooks,
  # pytest, scripts without absl.app). The workers inherit this state.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _default_shard_options() -> grain.ShardOptions:
  return grain.ShardByJaxProcess(drop_remainder=True)


def _per_process_batch_size(global_batch_size: int,
                            shard_options: grain.ShardOptions) -> int:
  if global_batch_size <= 0:
    raise ValueError(f'global_batch_size must be positive, got '
                     f'{global_batch_size}')
  if global_batch_size % shard_options.shard_count:
    raise ValueError(
        f'global_batch_size {global_batch_size} is not divisible by the '
        f'number of processes {shard_options.shard_count}')
  return global_batch_size // shard_options.shard_count


class _TransformAndPrepare(grain.RandomMapTransform):
  """The method-independent augmentation, then the method's own prepare."""

  def __init__(self, transform: TrainTransform | None,
               prepare_fn: PrepareFn | None):
    self._transform = transform
    self._prepare_fn = prepare_fn

  def random_map(self, element: Example, rng: np.random.Generator) -> Example:
    # Separate streams, so e.g. turning hflip off leaves the masks unchanged.
    transform_seed, prepare_seed = rng.integers(0, 2**63 - 1, size=2)
    if self._transform is not None:
      element = self._transform(element, np.random.default_rng(transform_seed))
    if self._prepare_fn is not None:
      element = self._prepare_fn(element, np.random.default_rng(prepare_seed))
    return element


def _close_and_release(holder: list[grain.PyGrainDatasetIterator]) -> None:
  for iterator in holder:
    inner = getattr(iterator, '_iterator', None)  # grain's DatasetIterator.
    if inner is not None:
      inner.close()
  holder.clear()


class Loader:
  """Iterator of per-process batches (dicts of numpy arrays) with state.

  `get_state()` returns JSON text to store beside a model checkpoint;
  `set_state(text)` on a loader built with the same arguments continues
  with exactly the batches the saved one would have produced next.
  """

  def __init__(self, data_loader: grain.DataLoader, *,
               per_process_batch_size: int, global_batch_size: int,
               num_batches: int | None, steps_per_epoch: int | None = None):
    self._data_loader = data_loader
    # The only reference to the grain iterator, which the finalizer closes
    # and drops at garbage collection or, at the latest, at interpreter exit
    # while modules still exist (grain's own __del__ fails after that).
    self._holder = [iter(data_loader)]
    self._finalizer = weakref.finalize(self, _close_and_release, self._holder)
    self._copy_from_shared_memory = (
        data_loader.multiprocessing_options.num_workers > 0)
    self.per_process_batch_size = per_process_batch_size
    self.global_batch_size = global_batch_size
    self.num_batches = num_batches  # None: endless.
    self.steps_per_epoch = steps_per_epoch

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  @property
  def _iterator(self) -> grain.PyGrainDatasetIterator:
    if not self._holder:
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
    shard_options: grain.ShardOptions | None = None,
) -> Loader:
  """Training batches for this process.

  Args:
    source: random-access source (see `sources.py`).
    transform: `transform(example, rng) -> example`, e.g. TwoViewTransform;
      None keeps examples as they are.
    prepare_fn: the method's host-side per-example work (masks,
      permutations), `prepare_fn(example, rng) -> example`; applied after
      `transform` with its own random stream.
    global_batch_size: batch over all processes; each gets
      global_batch_size // process count.
    seed: shuffle and augmentation seed (a non-negative 32-bit int).
    num_epochs: None repeats forever (each epoch reshuffled).
    shuffle: global shuffle of the example order.
    worker_count: 0 runs in this process; > 0 spawns grain worker processes.
    worker_buffer_size: batches each worker prepares ahead.
    read_options: grain.ReadOptions for the source reads (threads, buffer).
    drop_remainder: drop a final partial batch (only with num_epochs set).
    shard_options: defaults to grain.ShardByJaxProcess(drop_remainder=True);
      tests pass grain.ShardOptions(i, n) to simulate n processes.
  """
  shard_options = shard_options or _default_shard_options()
  batch_size = _per_process_batch_size(global_batch_size, shard_options)
  examples_per_process = len(source) // shard_options.shard_count
  steps_per_epoch = examples_per_process // batch_size
  if steps_per_epoch == 0:
    raise ValueError(
        f'global_batch_size {global_batch_size} is larger than the dataset '
        f'({len(source)} examples over {shard_options.shard_count} processes)')
  num_batches = None
  if num_epochs is not None:
    num_batches = examples_per_process * num_epochs / batch_size
    num_batches = math.floor(num_batches) if drop_remainder else math.ceil(
        num_batches)
  if worker_count > 0:
    _mark_absl_flags_parsed()
  sampler = grain.IndexSampler(
      num_records=len(source), shard_options=shard_options, shuffle=shuffle,
      num_epochs=num_epochs, seed=int(seed))
  operations = [
      _TransformAndPrepare(transform, prepare_fn),
      grain.Batch(batch_size=batch_size, drop_remainder=drop_remainder),
  ]
  data_loader = grain.DataLoader(
      data_source=source, sampler=sampler, operations=operations,
      worker_count=worker_count, worker_buffer_size=worker_buffer_size,
      shard_options=shard_options, read_options=read_options)
  return Loader(data_loader, per_process_batch_size=batch_size,
                global_batch_size=global_batch_size, num_batches=num_batches,
                steps_per_epoch=steps_per_epoch)


class PaddedShardSource:
  """One process's contiguous shard of a source, padded to whole batches.

  Slots past the shard's end repeat its first example with valid=False, so
  every process yields the same number of batches.
  """

  def __init__(self, source, shard_index: int, shard_count: int,
               batch_size: int):
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
    position = self.start + index if valid else min(self.start,
                                                    len(self._source) - 1)
    example = dict(self._source[position])
    example['valid'] = np.bool_(valid)
    return example

  def __repr__(self) -> str:
    return (f'PaddedShardSource({self._source!r}, shard_index='
            f'{self.shard_index}, shard_count={self.shard_count}, '
            f'length={self._length})')


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
  padded = PaddedShardSource(source, shard_options.shard_index,
                             shard_options.shard_count, batch_size)
  if worker_count > 0:
    _mark_absl_flags_parsed()
  # The shard is already this process's: no further sharding in grain.
  sampler = grain.IndexSampler(num_records=len(padded),
                               shard_options=grain.NoSharding(),
                               shuffle=False, num_epochs=1)
  data_loader = grain.DataLoader(
      data_source=padded, sampler=sampler,
      operations=[_EvalMap(transform),
                  grain.Batch(batch_size=batch_size, drop_remainder=False)],
      worker_count=worker_count, worker_buffer_size=worker_buffer_size,
      shard_options=grain.NoSharding(), read_options=read_options)
  return Loader(data_loader, per_process_batch_size=batch_size,
                global_batch_size=global_batch_size,
                num_batches=padded.num_batches)

