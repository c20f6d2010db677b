"""Random-access image sources for the grain pipeline.

Every source follows grain's `RandomAccessDataSource` protocol (`__len__`,
`__getitem__`) and returns examples of the form

  {'image': uint8 [H, W, 3] RGB, 'label': int32, 'index': int64}

where `index` is the example's stable id inside its split. Each source has a
deterministic `__repr__` and a `describe(index)` naming where an example
lives (file path, record), which the training loader logs for examples it
skips. A file that cannot be read or decoded raises `ImageDecodeError`
carrying its path. Sources hold no open files or decoded data when pickled,
so grain worker processes re-open them cheaply.

Four kinds:
  tfds         a prepared TFDS dataset in ArrayRecord format (imagenet2012).
  imagefolder  root/<class>/<image files>, classes sorted -> labels.
  npz          an .npz file with x_{split} (uint8 NHWC) and y_{split}.
  embedded     real photos shipped inside scikit-learn / matplotlib, so a demo
               runs with no data at all.
"""

import importlib.util
import io
import os
import threading
from typing import Any
import zipfile

import numpy as np
from PIL import Image

from mim_jax import cli

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.ppm', '.pgm', '.tif', '.tiff', '.webp')
SOURCE_KINDS = ('tfds', 'imagefolder', 'npz', 'embedded')

# Real photographs inside installed dependencies: (package, path in package).
# matplotlib's other sample images are clip art, logos or an MRI slice.
EMBEDDED_PHOTOS = (
  ('sklearn', 'datasets/images/china.jpg'),
  ('sklearn', 'datasets/images/flower.jpg'),
  ('matplotlib', 'mpl-data/sample_data/grace_hopper.jpg'),
)


class ImageDecodeError(ValueError):
  """An image file or record could not be read or decoded.

  The message names it, and `path` holds the file path (or record name) alone,
  so the training loader can log it beside the examples it skipped.
  """

  def __init__(self, message: str, path: str | None = None):
    super().__init__(message)
    self.path = path

  def __reduce__(self):
    # Keeps `path` when grain worker processes send the error to the trainer.
    return type(self), (str(self), self.path)


# Lazily loaded pixels (npz, embedded photos) are read once per process even
# when the training loader's read threads ask for them at the same time.
_LAZY_LOAD_LOCK = threading.Lock()


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
  """Returns `image` as uint8 [H, W, 3]; greyscale is repeated to RGB."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'expected a uint8 image, got dtype {image.dtype}')
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f'expected an HWC image with 1, 3 or 4 channels, got shape {image.shape}')
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  elif image.shape[-1] == 4:
    image = image[:, :, :3]
  return image


def decode_image_file(path: str) -> np.ndarray:
  """Decodes an image file with PIL to uint8 RGB; errors name the file."""
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert('RGB'))
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    reason = ' '.join(str(e).split())
    raise ImageDecodeError(
      f'cannot decode image file {path}: {type(e).__name__}: {reason}', path=path
    ) from e


def decode_image_bytes(data: bytes, what: str) -> np.ndarray:
  """Decodes encoded image bytes (JPEG/PNG/...) to uint8 RGB."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      return np.asarray(image.convert('RGB'))
  except (OSError, ValueError, SyntaxError) as e:
    reason = ' '.join(str(e).split())
    raise ImageDecodeError(f'cannot decode image {what}: {reason}', path=what) from e


def _example(image: np.ndarray, label: int, index: int) -> dict[str, Any]:
  return {
    'image': image,
    'label': np.int32(label),
    'index': np.int64(index),
  }


def _check_index(index: int, length: int) -> int:
  index = int(index)
  if not 0 <= index < length:
    raise IndexError(f'index {index} out of range for a source of {length}')
  return index


# ----------------------------------------------------------------------------
# TFDS
# ----------------------------------------------------------------------------


def tfds_not_prepared_message(name: str, data_dir: str | None) -> str:
  """How to prepare a TFDS dataset so `tfds.data_source` can read it."""
  where = data_dir or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets')
  base = name.split('/')[0].split(':')[0]
  if base.startswith('imagenet2012'):
    how = (
      f'ImageNet needs a manual download: put ILSVRC2012_img_train.tar and '
      f'ILSVRC2012_img_val.tar in a folder MANUAL_DIR, then run (needs '
      f'tensorflow): tfds build {base} --manual_dir=MANUAL_DIR '
      f'--data_dir={where} --file_format=array_record'
    )
  else:
    how = (
      f'prepare it with (needs tensorflow): tfds build {base} '
      f'--data_dir={where} --file_format=array_record'
    )
  return (
    f'TFDS dataset {name!r} is not prepared in ArrayRecord format under data_dir {where}. {how}'
  )


class TfdsSource:
  """A prepared TFDS dataset read through `tfds.data_source` (ArrayRecord).

  Reading needs no TensorFlow. Images that come encoded (e.g. when a decoder
  skips decoding) are decoded with PIL.
  """

  def __init__(
    self,
    name: str,
    split: str = 'train',
    data_dir: str | None = None,
    image_key: str = 'image',
    label_key: str = 'label',
  ):
    self.name = name
    self.split = split
    self.data_dir = data_dir or None  # '' in a config means TFDS's default.
    self.image_key = image_key
    self.label_key = label_key
    self._data_source = self._open()

  def _open(self):
    cli.quiet_tensorflow()
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    try:
      builder = tfds.builder(self.name, data_dir=self.data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise ValueError(
        f'TFDS dataset {self.name!r} is not registered in tensorflow_datasets'
      ) from e
    try:
      return builder.as_data_source(split=self.split)
    except Exception as e:
      # tfds reports a missing dataset as a file-format problem; say the truth.
      if not builder.is_prepared():
        raise FileNotFoundError(tfds_not_prepared_message(self.name, self.data_dir)) from e
      raise

  def __len__(self) -> int:
    return len(self._data_source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = _check_index(index, len(self))
    record = self._data_source[index]
    image = record[self.image_key]
    if isinstance(image, bytes):
      image = decode_image_bytes(image, self.describe(index))
    return _example(as_rgb_uint8(image), int(record[self.label_key]), index)

  def describe(self, index: int) -> str:
    """Where example `index` lives, for logs of skipped examples."""
    where = f' in {self.data_dir}' if self.data_dir else ''
    return f'TFDS {self.name} split {self.split} record {int(index)}{where}'

  def __repr__(self) -> str:
    return f'TfdsSource(name={self.name!r}, split={self.split!r}, data_dir={self.data_dir!r})'


# ----------------------------------------------------------------------------
# ImageFolder
# ----------------------------------------------------------------------------


class ImageFolderSource:
  """root/<class>/<image>, torchvision ImageFolder order.

  Classes are the sorted sub-directory names (label = position); files are
  sorted within a class, searched recursively. Decoding uses PIL
  `convert('RGB')`.
  """

  def __init__(self, root: str):
    self.root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(self.root):
      raise FileNotFoundError(f'imagefolder root {self.root} does not exist or is not a directory')
    self.classes = sorted(
      entry.name
      for entry in os.scandir(self.root)
      if entry.is_dir() and not entry.name.startswith('.')
    )
    if not self.classes:
      raise ValueError(
        f'imagefolder root {self.root} has no class '
        f'sub-directories (expected root/<class>/<images>)'
      )
    paths, labels = [], []
    for label, class_name in enumerate(self.classes):
      class_dir = os.path.join(self.root, class_name)
      found = []
      for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames.sort()
        for filename in filenames:
          if filename.lower().endswith(IMAGE_EXTENSIONS):
            found.append(os.path.relpath(os.path.join(dirpath, filename), self.root))
      found.sort()
      paths.extend(found)
      labels.extend([label] * len(found))
    if not paths:
      raise ValueError(
        f'imagefolder root {self.root} has class directories but no image '
        f'files with extensions {", ".join(IMAGE_EXTENSIONS)}'
      )
    # Bytes arrays pickle compactly to grain workers (1.28M ImageNet paths).
    self._relative_paths = np.array([p.encode() for p in paths])
    self._labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self._labels)

  def path(self, index: int) -> str:
    return os.path.join(self.root, self._relative_paths[index].decode())

  def describe(self, index: int) -> str:
    """Where example `index` lives (its file), for logs of skipped examples."""
    return self.path(index)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = _check_index(index, len(self))
    image = decode_image_file(self.path(index))
    return _example(image, self._labels[index], index)

  def __repr__(self) -> str:
    return (
      f'ImageFolderSource(root={self.root!r}, '
      f'num_classes={len(self.classes)}, num_examples={len(self)})'
    )


# ----------------------------------------------------------------------------
# npz
# ----------------------------------------------------------------------------


def _npy_header(npz_path: str, member: str) -> tuple[tuple[int, ...], np.dtype, bool, int | None]:
  """Reads an .npz member's .npy header without reading its data.

  Returns (shape, dtype, fortran_order, data_offset); data_offset is the byte
  offset of the array in the .npz file when the member is stored
  uncompressed, else None.
  """
  with zipfile.ZipFile(npz_path) as archive:
    info = archive.getinfo(member)
    with archive.open(info) as stream:
      version = np.lib.format.read_magic(stream)
      if version == (1, 0):
        header = np.lib.format.read_array_header_1_0(stream)
      else:
        header = np.lib.format.read_array_header_2_0(stream)
      header_length = stream.tell()
  shape, fortran_order, dtype = header
  data_offset = None
  if info.compress_type == zipfile.ZIP_STORED:
    with open(npz_path, 'rb') as f:
      f.seek(info.header_offset)
      local_header = f.read(30)
      name_length = int.from_bytes(local_header[26:28], 'little')
      extra_length = int.from_bytes(local_header[28:30], 'little')
    data_offset = info.header_offset + 30 + name_length + extra_length + header_length
  return shape, dtype, fortran_order, data_offset


class NpzSource:
  """Images from an .npz: x_{split} uint8 [N, H, W(, C)], y_{split} ints.

  The labels are read at construction; the images on first access (in each
  grain worker). With `mmap=True` the images are memory-mapped instead of
  read, which needs the .npz written uncompressed (`np.savez`).
  """

  def __init__(self, path: str, split: str = 'train', mmap: bool = False):
    self.path = os.path.abspath(os.path.expanduser(path))
    self.split = split
    self.mmap = mmap
    self.image_key = f'x_{split}'
    self.label_key = f'y_{split}'
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f'npz file {self.path} does not exist')
    with np.load(self.path, allow_pickle=False) as npz:
      keys = list(npz.files)
      for key in (self.image_key, self.label_key):
        if key not in keys:
          raise KeyError(
            f'npz file {self.path} has no key {key!r} (split {split!r}); it has {keys}'
          )
      self._labels = np.asarray(npz[self.label_key]).astype(np.int32)
    shape, dtype, fortran_order, data_offset = _npy_header(self.path, self.image_key + '.npy')
    if dtype != np.uint8 or len(shape) not in (3, 4):
      raise ValueError(
        f'npz file {self.path}: {self.image_key} must be uint8 [N, H, W(, C)], got {dtype} {shape}'
      )
    if shape[0] != len(self._labels):
      raise ValueError(
        f'npz file {self.path}: {self.image_key} has {shape[0]} '
        f'images but {self.label_key} has {len(self._labels)} '
        f'labels'
      )
    if mmap and data_offset is None:
      raise ValueError(
        f'npz file {self.path}: mmap=True needs {self.image_key} stored '
        f'uncompressed (write it with np.savez, not np.savez_compressed), '
        f'or use mmap=False'
      )
    self._image_shape = shape
    self._fortran_order = fortran_order
    self._data_offset = data_offset
    self._images = None

  def _load_images(self) -> np.ndarray:
    if self.mmap:
      return np.memmap(
        self.path,
        dtype=np.uint8,
        mode='r',
        offset=self._data_offset,
        shape=self._image_shape,
        order='F' if self._fortran_order else 'C',
      )
    with np.load(self.path, allow_pickle=False) as npz:
      return npz[self.image_key]

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_images'] = None  # Workers re-read; never pickle the pixels.
    return state

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = _check_index(index, len(self))
    if self._images is None:
      with _LAZY_LOAD_LOCK:
        if self._images is None:
          self._images = self._load_images()
    image = as_rgb_uint8(np.array(self._images[index]))
    return _example(image, self._labels[index], index)

  def describe(self, index: int) -> str:
    """Where example `index` lives, for logs of skipped examples."""
    return f'{self.path} {self.image_key}[{int(index)}]'

  def __repr__(self) -> str:
    return f'NpzSource(path={self.path!r}, split={self.split!r}, num_examples={len(self)})'


# ----------------------------------------------------------------------------
# Embedded photos
# ----------------------------------------------------------------------------


def find_embedded_photos() -> list[str]:
  """Paths of the real photos found in installed packages (no imports)."""
  found = []
  for package, relative_path in EMBEDDED_PHOTOS:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
      continue
    path = os.path.join(list(spec.submodule_search_locations)[0], relative_path)
    if os.path.isfile(path):
      found.append(path)
  return found


class EmbeddedPhotosSource:
  """A virtual dataset cycling over photos shipped inside dependencies.

  scikit-learn ships china.jpg and flower.jpg, matplotlib grace_hopper.jpg.
  Example i is photo `i % num_photos` with label = photo id; the random crops
  that make examples differ come from the transforms, seeded per example.
  `length` makes epochs and sharding behave as with a real dataset.
  """

  def __init__(self, length: int = 1024):
    if length <= 0:
      raise ValueError(f'embedded source length must be positive, got {length}')
    self.length = int(length)
    self.photo_paths = find_embedded_photos()
    if not self.photo_paths:
      raise FileNotFoundError(
        'no embedded photos found: install scikit-learn (china.jpg, '
        'flower.jpg) or matplotlib (grace_hopper.jpg)'
      )
    self.photo_names = [os.path.basename(p) for p in self.photo_paths]
    self._photos = None

  @property
  def num_photos(self) -> int:
    return len(self.photo_paths)

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_photos'] = None
    return state

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = _check_index(index, len(self))
    if self._photos is None:
      with _LAZY_LOAD_LOCK:
        if self._photos is None:
          self._photos = [decode_image_file(p) for p in self.photo_paths]
    photo_id = index % self.num_photos
    return _example(self._photos[photo_id], photo_id, index)

  def describe(self, index: int) -> str:
    """Where example `index` lives (its photo), for logs of skipped examples."""
    return self.photo_paths[int(index) % self.num_photos]

  def __repr__(self) -> str:
    return f'EmbeddedPhotosSource(length={self.length}, photos={self.photo_names!r})'


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------


def _get(cfg: Any, field: str, default: Any = None) -> Any:
  # ConfigDict and dict both have .get; a missing optional field -> default.
  return cfg.get(field, default)


def _imagefolder_root(path: str, split: str | None) -> str:
  """root/<split> when a split is named, else the path itself."""
  path = os.path.expanduser(path)
  return os.path.join(path, split) if split else path


def validate_data_config(cfg: Any, split: str | None = None) -> None:
  """Checks a data config without reading any data.

  Args:
    cfg: ConfigDict or mapping with fields source, name, path, split,
      data_dir (and optionally length for 'embedded', mmap for 'npz').
    split: overrides `cfg.split` (e.g. the eval split).

  Raises:
    ValueError: naming the offending `config.data.<field>`.
  """
  kind = _get(cfg, 'source')
  split = split if split is not None else _get(cfg, 'split', 'train')
  if kind not in SOURCE_KINDS:
    raise ValueError(
      f'config.data.source: unknown source {kind!r}; choose one of {", ".join(SOURCE_KINDS)}'
    )
  path = _get(cfg, 'path')
  if kind == 'tfds':
    name = _get(cfg, 'name')
    if not name:
      raise ValueError('config.data.name: the tfds source needs a dataset name (e.g. imagenet2012)')
    cli.quiet_tensorflow()
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    data_dir = _get(cfg, 'data_dir') or None
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise ValueError(
        f'config.data.name: TFDS dataset {name!r} is not registered in tensorflow_datasets'
      ) from e
    if not builder.is_prepared():
      raise ValueError('config.data.data_dir: ' + tfds_not_prepared_message(name, data_dir))
    split_name = split.split('[')[0]
    if split_name not in builder.info.splits:
      raise ValueError(
        f'config.data.split: TFDS dataset {name!r} has no split '
        f'{split_name!r}; it has {sorted(builder.info.splits)}'
      )
  elif kind == 'imagefolder':
    if not path:
      raise ValueError('config.data.path: the imagefolder source needs a path')
    root = _imagefolder_root(path, split)
    if not os.path.isdir(root):
      raise ValueError(
        f'config.data.path: imagefolder directory {root} does not exist '
        f'(path {path!r} + split {split!r}; set split to "" to use path '
        f'itself as root/<class>/<images>)'
      )
    if not any(e.is_dir() for e in os.scandir(root)):
      raise ValueError(
        f'config.data.path: imagefolder directory {root} has no class sub-directories'
      )
  elif kind == 'npz':
    if not path:
      raise ValueError('config.data.path: the npz source needs a path')
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
      raise ValueError(f'config.data.path: npz file {path} does not exist')
    try:
      with np.load(path, allow_pickle=False) as npz:  # Reads the index only.
        keys = list(npz.files)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
      raise ValueError(f'config.data.path: {path} is not a readable .npz file: {e}') from e
    for key in (f'x_{split}', f'y_{split}'):
      if key not in keys:
        raise ValueError(f'config.data.split: npz file {path} has no key {key!r}; it has {keys}')
  elif kind == 'embedded':
    length = _get(cfg, 'length', 1024)
    if not isinstance(length, int) or length <= 0:
      raise ValueError(f'config.data.length: must be a positive int, got {length!r}')
    if not find_embedded_photos():
      raise ValueError(
        'config.data.source: no embedded photos found; install '
        'scikit-learn or matplotlib, or use another source'
      )


def build_source(cfg: Any, split: str | None = None):
  """Builds the source a data config names (after `validate_data_config`).

  Args:
    cfg: ConfigDict or mapping: source ('tfds'|'imagefolder'|'npz'|
      'embedded'), name (tfds), path (imagefolder root / npz file), split,
      data_dir (tfds); optional mmap (npz), length (embedded).
    split: overrides `cfg.split`, e.g. to build the eval split.
  """
  validate_data_config(cfg, split)
  kind = _get(cfg, 'source')
  split = split if split is not None else _get(cfg, 'split', 'train')
  if kind == 'tfds':
    return TfdsSource(_get(cfg, 'name'), split=split, data_dir=_get(cfg, 'data_dir'))
  if kind == 'imagefolder':
    return ImageFolderSource(_imagefolder_root(_get(cfg, 'path'), split))
  if kind == 'npz':
    return NpzSource(_get(cfg, 'path'), split=split, mmap=bool(_get(cfg, 'mmap', False)))
  return EmbeddedPhotosSource(length=_get(cfg, 'length', 1024))
