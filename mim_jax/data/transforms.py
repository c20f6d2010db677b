"""Host-side image transforms (numpy + PIL), deterministic given a Generator.

They follow the reference repos' torchvision/timm pipelines on PIL images:
BEiT v2 / CAE v2 pre-training is ColorJitter -> RandomHorizontalFlip ->
two-view RandomResizedCrop with ONE set of crop params for both views
(`beit2/transforms.py`, `RandomResizedCropAndInterpolationWithTwoPic`).
Views stay uint8: normalisation happens on device (`normalize`), because
e.g. CCViT normalises only after replacing patches by centroids.
"""

import math
from typing import Any, Sequence

import numpy as np
from PIL import Image
from PIL import ImageEnhance

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

INTERPOLATIONS = {
  'nearest': Image.Resampling.NEAREST,
  'bilinear': Image.Resampling.BILINEAR,
  'bicubic': Image.Resampling.BICUBIC,
  'lanczos': Image.Resampling.LANCZOS,
  'box': Image.Resampling.BOX,
  'hamming': Image.Resampling.HAMMING,
}

Size = int | Sequence[int]  # int -> square; (height, width) otherwise.


def _to_pil(image: np.ndarray | Image.Image) -> Image.Image:
  if isinstance(image, Image.Image):
    return image.convert('RGB') if image.mode != 'RGB' else image
  return Image.fromarray(np.asarray(image, np.uint8))


def _like_input(image: Image.Image, original) -> np.ndarray | Image.Image:
  return image if isinstance(original, Image.Image) else np.asarray(image)


def _resample(interpolation: str) -> Image.Resampling:
  try:
    return INTERPOLATIONS[interpolation]
  except KeyError:
    raise ValueError(
      f'unknown interpolation {interpolation!r}; choose one of {", ".join(INTERPOLATIONS)}'
    ) from None


def _height_width(size: Size) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  height, width = size
  return int(height), int(width)


# ----------------------------------------------------------------------------
# Crops
# ----------------------------------------------------------------------------


def random_resized_crop_params(
  height: int,
  width: int,
  rng: np.random.Generator,
  scale: Sequence[float] = (0.2, 1.0),
  ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
  """torchvision `RandomResizedCrop.get_params`: (top, left, h, w).

  Up to 10 tries of (area ~ U(scale) * image area, log aspect ~ U(log ratio));
  then a centre crop of the whole image clamped to the ratio bounds.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _resized_crop(
  image: Image.Image, box: tuple[int, int, int, int], size: Size, interpolation: str
) -> Image.Image:
  top, left, h, w = box
  out_height, out_width = _height_width(size)
  # Crop first: PIL's resize(box=...) would filter across the crop border.
  cropped = image.crop((left, top, left + w, top + h))
  return cropped.resize((out_width, out_height), _resample(interpolation))


def two_view_random_resized_crop(
  image: np.ndarray | Image.Image,
  rng: np.random.Generator,
  size1: Size,
  size2: Size,
  scale: Sequence[float] = (0.2, 1.0),
  ratio: Sequence[float] = (3 / 4, 4 / 3),
  interpolation1: str = 'bicubic',
  interpolation2: str = 'bicubic',
) -> tuple[np.ndarray, np.ndarray]:
  """One crop, two resizes: the student view and the tokenizer/teacher view.

  Scale (1, 1) with ratio (1, 1) always falls back to the centre square, the
  region Resize + CenterCrop sees (MaPeT's offline tokens rely on it).

  Returns:
    (view1, view2), uint8 [size1..., 3] and [size2..., 3].
  """
  pil = _to_pil(image)
  box = random_resized_crop_params(pil.height, pil.width, rng, scale, ratio)
  view1 = _resized_crop(pil, box, size1, interpolation1)
  view2 = _resized_crop(pil, box, size2, interpolation2)
  return np.asarray(view1), np.asarray(view2)


def resize_center_crop(
  image: np.ndarray | Image.Image,
  size: Size,
  resize_size: int | None = None,
  interpolation: str = 'bicubic',
) -> np.ndarray:
  """torchvision Resize(shorter side = resize_size) -> CenterCrop(size).

  resize_size defaults to the crop size (CLIP / MaPeT token caches); CCViT's
  tokenizer data uses 256 -> 224.
  """
  pil = _to_pil(image)
  crop_height, crop_width = _height_width(size)
  if resize_size is None:
    resize_size = min(crop_height, crop_width)
  width, height = pil.size
  # torchvision keeps the short side exact and truncates the long side.
  if width <= height:
    new_width, new_height = resize_size, int(resize_size * height / width)
  else:
    new_width, new_height = int(resize_size * width / height), resize_size
  if (new_width, new_height) != (width, height):
    pil = pil.resize((new_width, new_height), _resample(interpolation))
  top = int(round((new_height - crop_height) / 2.0))
  left = int(round((new_width - crop_width) / 2.0))
  if top < 0 or left < 0:
    raise ValueError(
      f'crop {crop_height}x{crop_width} is larger than the resized image {new_height}x{new_width}'
    )
  return np.asarray(pil.crop((left, top, left + crop_width, top + crop_height)))


# ----------------------------------------------------------------------------
# Flip and colour
# ----------------------------------------------------------------------------


def horizontal_flip(
  image: np.ndarray | Image.Image, rng: np.random.Generator, p: float = 0.5
) -> np.ndarray | Image.Image:
  """Mirrors left-right with probability p; returns the input's type."""
  if rng.random() >= p:
    return image
  if isinstance(image, Image.Image):
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.ascontiguousarray(np.asarray(image)[:, ::-1])


def _adjust_hue(image: Image.Image, hue_factor: float) -> Image.Image:
  """torchvision F_pil.adjust_hue: shift H in PIL's uint8 HSV space."""
  h, s, v = image.convert('HSV').split()
  shift = np.uint8(int(hue_factor * 255) % 256)
  hue = (np.asarray(h, np.uint8) + shift).astype(np.uint8)  # Wraps mod 256.
  return Image.merge('HSV', (Image.fromarray(hue, 'L'), s, v)).convert('RGB')


def color_jitter(
  image: np.ndarray | Image.Image,
  rng: np.random.Generator,
  brightness: float = 0.4,
  contrast: float = 0.4,
  saturation: float = 0.4,
  hue: float = 0.0,
) -> np.ndarray | Image.Image:
  """torchvision ColorJitter on a PIL/uint8 image; returns the input's type.

  Factors ~ U[max(0, 1 - v), 1 + v] (hue ~ U[-hue, hue]), applied in a random
  order; a strength of 0 disables that op. Contrast blends with the mean grey
  of the whole image, so jitter before cropping to match the references.
  """
  if not 0 <= hue <= 0.5:
    raise ValueError(f'hue must be in [0, 0.5], got {hue}')
  pil = _to_pil(image)
  for op in rng.permutation(4):
    if op == 0 and brightness > 0:
      factor = rng.uniform(max(0.0, 1 - brightness), 1 + brightness)
      pil = ImageEnhance.Brightness(pil).enhance(factor)
    elif op == 1 and contrast > 0:
      factor = rng.uniform(max(0.0, 1 - contrast), 1 + contrast)
      pil = ImageEnhance.Contrast(pil).enhance(factor)
    elif op == 2 and saturation > 0:
      factor = rng.uniform(max(0.0, 1 - saturation), 1 + saturation)
      pil = ImageEnhance.Color(pil).enhance(factor)
    elif op == 3 and hue > 0:
      pil = _adjust_hue(pil, rng.uniform(-hue, hue))
  return _like_input(pil, image)


# ----------------------------------------------------------------------------
# Normalisation (host or device)
# ----------------------------------------------------------------------------


def normalize(
  x, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, dtype=np.float32
):
  """(x - mean) / std over the last (channel) axis; numpy or jax arrays.

  Integer inputs are pixels in [0, 255] and are divided by 255 first (like
  torchvision's ToTensor); float inputs are taken to be in [0, 1] already.
  """
  if isinstance(x, np.ndarray):
    xp = np
  else:
    import jax.numpy as xp  # pylint: disable=g-import-not-at-top
  is_integer = xp.issubdtype(x.dtype, xp.integer)
  x = x.astype(dtype)
  if is_integer:
    x = x / 255.0
  mean = xp.asarray(mean, dtype)
  std = xp.asarray(std, dtype)
  return ((x - mean) / std).astype(dtype)


# ----------------------------------------------------------------------------
# Config-driven per-example transforms
# ----------------------------------------------------------------------------


def _pass_through(example: dict[str, Any]) -> dict[str, Any]:
  """Every field but the raw image (label, index, anything a source adds)."""
  return {k: v for k, v in example.items() if k != 'image'}


class TwoViewTransform:
  """ColorJitter -> hflip -> shared RandomResizedCrop into two uint8 views.

  Called as transform(example, rng) on a source example, it returns
  {'image': view1, 'image2': view2, 'label', 'index', ...}. BEiT v2 uses
  color_jitter 0.4, CCViT 0 (no jitter), CAE v2 crop_scale (0.4, 1); MaPeT
  uses crop_scale = crop_ratio = (1, 1) and hflip False.
  """

  def __init__(
    self,
    image_size: Size = 224,
    second_image_size: Size | None = None,
    crop_scale: Sequence[float] = (0.2, 1.0),
    crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: bool = True,
    color_jitter: float = 0.4,
    interpolation: str = 'bicubic',
    second_interpolation: str = 'bicubic',
  ):
    self.image_size = image_size
    self.second_image_size = image_size if second_image_size is None else second_image_size
    self.crop_scale = tuple(float(s) for s in crop_scale)
    self.crop_ratio = tuple(float(r) for r in crop_ratio)
    self.hflip = bool(hflip)
    self.color_jitter = float(color_jitter)
    self.interpolation = interpolation
    self.second_interpolation = second_interpolation
    _resample(interpolation)  # Fail at construction, not in a worker.
    _resample(second_interpolation)
    if not 0 < self.crop_scale[0] <= self.crop_scale[1]:
      raise ValueError(f'crop_scale must satisfy 0 < min <= max, got {self.crop_scale}')
    if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
      raise ValueError(f'crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}')
    if self.color_jitter < 0:
      raise ValueError(f'color_jitter must be >= 0, got {self.color_jitter}')

  @classmethod
  def from_config(cls, cfg: Any) -> 'TwoViewTransform':
    """From a ConfigDict / mapping; missing fields keep the defaults."""
    fields = (
      'image_size',
      'second_image_size',
      'crop_scale',
      'crop_ratio',
      'hflip',
      'color_jitter',
      'interpolation',
      'second_interpolation',
    )
    return cls(**{f: cfg[f] for f in fields if f in cfg})

  @property
  def views_identical(self) -> bool:
    return (
      _height_width(self.image_size) == _height_width(self.second_image_size)
      and self.interpolation == self.second_interpolation
    )

  def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    pil = _to_pil(example['image'])
    if self.color_jitter > 0:
      pil = color_jitter(pil, rng, self.color_jitter, self.color_jitter, self.color_jitter, 0.0)
    if self.hflip:
      pil = horizontal_flip(pil, rng)
    box = random_resized_crop_params(pil.height, pil.width, rng, self.crop_scale, self.crop_ratio)
    view1 = np.asarray(_resized_crop(pil, box, self.image_size, self.interpolation))
    view2 = (
      view1
      if self.views_identical
      else np.asarray(_resized_crop(pil, box, self.second_image_size, self.second_interpolation))
    )
    return {**_pass_through(example), 'image': view1, 'image2': view2}

  def __repr__(self) -> str:
    return (
      f'TwoViewTransform(image_size={self.image_size!r}, '
      f'second_image_size={self.second_image_size!r}, '
      f'crop_scale={self.crop_scale}, crop_ratio={self.crop_ratio}, '
      f'hflip={self.hflip}, color_jitter={self.color_jitter}, '
      f'interpolation={self.interpolation!r}, '
      f'second_interpolation={self.second_interpolation!r})'
    )


class EvalTransform:
  """Resize (shorter side) -> CenterCrop, one view: transform(example)."""

  def __init__(
    self, image_size: Size = 224, resize_size: int | None = None, interpolation: str = 'bicubic'
  ):
    self.image_size = image_size
    self.resize_size = resize_size
    self.interpolation = interpolation
    _resample(interpolation)

  def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
    image = resize_center_crop(
      example['image'], self.image_size, self.resize_size, self.interpolation
    )
    return {**_pass_through(example), 'image': image}

  def __repr__(self) -> str:
    return (
      f'EvalTransform(image_size={self.image_size!r}, '
      f'resize_size={self.resize_size!r}, '
      f'interpolation={self.interpolation!r})'
    )
