"""Fine-tuning augmentation: RandAugment, random erasing, mixup / cutmix, label smoothing.

The recipe of every paper here (BEiT v2 Table 10, MaPeT Table 9, CAE v2 Table 10, CCViT
Table 6) is timm's `create_transform` as called by BEiT's `run_class_finetuning.py`:
RandomResizedCrop(scale 0.08-1, bicubic) -> hflip -> RandAugment 'rand-m9-mstd0.5-inc1'
-> normalise -> RandomErasing(0.25, mode 'pixel', one box); then, on the batch, timm's
`Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode='batch',
label_smoothing=0.1)`. Colour jitter is off whenever RandAugment is on (timm).

Host side (numpy/PIL, per example, driven by the grain record's Generator): crop, flip,
RandAugment and the *position* of the erased box. Device side (JAX, per batch): the
normalisation, filling the box with N(0, 1) noise in normalised space (timm's 'pixel'
mode), and mixup / cutmix with their soft labels.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps

from mim_jax.data import transforms

# ----------------------------------------------------------------------------- RandAugment
# timm `_RAND_INCREASING_TRANSFORMS` ('inc1'): ops whose strength grows with the magnitude.
RAND_INCREASING_OPS = (
  "AutoContrast",
  "Equalize",
  "Invert",
  "Rotate",
  "PosterizeIncreasing",
  "SolarizeIncreasing",
  "SolarizeAdd",
  "ColorIncreasing",
  "ContrastIncreasing",
  "BrightnessIncreasing",
  "SharpnessIncreasing",
  "ShearX",
  "ShearY",
  "TranslateXRel",
  "TranslateYRel",
)
_LEVEL_DENOM = 10.0
_ENHANCE = {
  "ColorIncreasing": ImageEnhance.Color,
  "ContrastIncreasing": ImageEnhance.Contrast,
  "BrightnessIncreasing": ImageEnhance.Brightness,
  "SharpnessIncreasing": ImageEnhance.Sharpness,
}


def fill_color(mean: Sequence[float] = transforms.IMAGENET_MEAN) -> tuple[int, ...]:
  """timm's `img_mean` hparam: the dataset mean as uint8, the fill of geometric ops."""
  return tuple(min(255, round(255 * m)) for m in mean)


def op_argument(name: str, magnitude: float, negate: bool, translate_pct: float = 0.45):
  """timm's LEVEL_TO_ARG for the increasing ops; `negate` is the random sign flip."""
  level = magnitude / _LEVEL_DENOM
  sign = -1.0 if negate else 1.0
  if name == "Rotate":
    return sign * level * 30.0
  if name in ("ShearX", "ShearY"):
    return sign * level * 0.3
  if name in ("TranslateXRel", "TranslateYRel"):
    return sign * level * translate_pct
  if name == "PosterizeIncreasing":
    return 4 - int(level * 4)
  if name == "SolarizeIncreasing":
    return 256 - min(256, int(level * 256))
  if name == "SolarizeAdd":
    return min(128, int(level * 110))
  if name in _ENHANCE:
    return max(0.1, 1.0 + sign * level * 0.9)
  return None


def apply_op(
  img: Image.Image, name: str, arg, *, fill=fill_color(), resample=Image.Resampling.BICUBIC
) -> Image.Image:
  """One RandAugment op on an RGB PIL image (semantics of timm's op functions)."""
  affine = dict(resample=resample, fillcolor=fill)
  w, h = img.size
  if name == "AutoContrast":
    return ImageOps.autocontrast(img)
  if name == "Equalize":
    return ImageOps.equalize(img)
  if name == "Invert":
    return ImageOps.invert(img)
  if name == "Rotate":
    return img.rotate(arg, **affine)
  if name == "PosterizeIncreasing":
    if arg <= 0:  # magnitude 10 keeps 0 bits: black, as Pillow < 11 did (now it raises)
      return img.point([0] * 256 * len(img.getbands()))
    return img if arg >= 8 else ImageOps.posterize(img, arg)
  if name == "SolarizeIncreasing":
    return ImageOps.solarize(img, arg)
  if name == "SolarizeAdd":
    lut = [min(255, i + arg) if i < 128 else i for i in range(256)]
    return img.point(lut * 3)
  if name in _ENHANCE:
    return _ENHANCE[name](img).enhance(arg)
  if name == "ShearX":
    return img.transform(img.size, Image.Transform.AFFINE, (1, arg, 0, 0, 1, 0), **affine)
  if name == "ShearY":
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, arg, 1, 0), **affine)
  if name == "TranslateXRel":
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, arg * w, 0, 1, 0), **affine)
  if name == "TranslateYRel":
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, arg * h), **affine)
  raise ValueError(f"unknown RandAugment op {name!r}")


class RandAugment:
  """timm RandAugment 'rand-m{M}-mstd{S}-inc1': `num_ops` ops drawn uniformly with
  replacement, each applied with probability `prob` at magnitude ~ N(M, S) clipped to
  [0, 10] (redrawn per op application)."""

  def __init__(
    self,
    magnitude: float = 9,
    magnitude_std: float = 0.5,
    num_ops: int = 2,
    prob: float = 0.5,
    mean: Sequence[float] = transforms.IMAGENET_MEAN,
    interpolation: str = "bicubic",
    ops: Sequence[str] = RAND_INCREASING_OPS,
  ):
    self.magnitude, self.magnitude_std = float(magnitude), float(magnitude_std)
    self.num_ops, self.prob, self.ops = int(num_ops), float(prob), tuple(ops)
    self.fill = fill_color(mean)
    self.resample = transforms.INTERPOLATIONS[interpolation]

  @classmethod
  def from_string(cls, spec: str, **kw) -> "RandAugment":
    """Parses timm's config string, e.g. 'rand-m9-mstd0.5-inc1' (increasing ops only)."""
    parts = spec.split("-")
    if parts[0] != "rand":
      raise ValueError(
        f"config.data.rand_augment must look like 'rand-m9-mstd0.5-inc1', got {spec!r}"
      )
    args = dict(magnitude=10.0, magnitude_std=0.0, num_ops=2, prob=0.5)
    for part in parts[1:]:
      for key, field in (
        ("mstd", "magnitude_std"),
        ("m", "magnitude"),
        ("n", "num_ops"),
        ("p", "prob"),
        ("inc", None),
      ):
        if part.startswith(key) and part[len(key) :].replace(".", "", 1).isdigit():
          if field is None and part[len(key) :] != "1":
            raise ValueError(
              f"config.data.rand_augment: only the increasing ops (inc1) "
              f"are implemented, got {spec!r}"
            )
          if field:
            args[field] = float(part[len(key) :])
          break
      else:
        raise ValueError(f"config.data.rand_augment: cannot parse {part!r} in {spec!r}")
    return cls(**args, **kw)

  def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
    for name in rng.choice(self.ops, self.num_ops, replace=True):
      if self.prob < 1.0 and rng.random() > self.prob:
        continue
      m = self.magnitude
      if self.magnitude_std > 0:
        m = rng.normal(m, self.magnitude_std)
      m = max(0.0, min(m, _LEVEL_DENOM))
      arg = op_argument(str(name), m, negate=bool(rng.random() > 0.5))
      img = apply_op(img, str(name), arg, fill=self.fill, resample=self.resample)
    return img


# ----------------------------------------------------------------------------- erasing
def random_erasing_box(
  rng: np.random.Generator,
  height: int,
  width: int,
  *,
  probability: float = 0.25,
  min_area: float = 0.02,
  max_area: float = 1 / 3,
  min_aspect: float = 0.3,
) -> np.ndarray:
  """timm RandomErasing's box (one box, 10 attempts): int32 [top, left, h, w]; h = 0: none."""
  if rng.random() > probability:
    return np.zeros(4, np.int32)
  log_ratio = (math.log(min_aspect), math.log(1 / min_aspect))
  area = height * width
  for _ in range(10):
    target = rng.uniform(min_area, max_area) * area
    aspect = math.exp(rng.uniform(*log_ratio))
    h = int(round(math.sqrt(target * aspect)))
    w = int(round(math.sqrt(target / aspect)))
    if w < width and h < height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return np.array([top, left, h, w], np.int32)
  return np.zeros(4, np.int32)


def erase(rng: jax.Array, images: jax.Array, boxes: jax.Array) -> jax.Array:
  """Fills each image's box (normalised space) with N(0, 1) noise, per pixel and channel."""
  _, height, width, _ = images.shape
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  top, left, h, w = (boxes[:, i][:, None, None] for i in range(4))
  inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
  noise = jax.random.normal(rng, images.shape, jnp.float32).astype(images.dtype)
  return jnp.where(inside[..., None], noise, images)


# ----------------------------------------------------------------------------- transforms
class FinetuneTrainTransform:
  """RandomResizedCrop -> hflip -> RandAugment (uint8) + the random-erasing box."""

  def __init__(
    self,
    image_size: int,
    *,
    crop_scale=(0.08, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    interpolation: str = "bicubic",
    hflip: bool = True,
    rand_augment: str = "rand-m9-mstd0.5-inc1",
    reprob: float = 0.25,
    mean: Sequence[float] = transforms.IMAGENET_MEAN,
  ):
    self.image_size = int(image_size)
    self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)
    self.resample = transforms.INTERPOLATIONS[interpolation]
    self.hflip, self.reprob = bool(hflip), float(reprob)
    self.rand_augment = (
      RandAugment.from_string(rand_augment, mean=mean, interpolation=interpolation)
      if rand_augment
      else None
    )

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    pil = Image.fromarray(np.asarray(example["image"], np.uint8)).convert("RGB")
    top, left, h, w = transforms.random_resized_crop_params(
      pil.height, pil.width, rng, self.crop_scale, self.crop_ratio
    )
    pil = pil.crop((left, top, left + w, top + h)).resize((self.image_size,) * 2, self.resample)
    pil = transforms.horizontal_flip(pil, rng) if self.hflip else pil
    if self.rand_augment is not None:
      pil = self.rand_augment(pil, rng)
    out = {k: v for k, v in example.items() if k != "image"}
    out["image"] = np.asarray(pil, np.uint8)
    out["erase"] = random_erasing_box(
      rng, self.image_size, self.image_size, probability=self.reprob
    )
    return out


# ----------------------------------------------------------------------------- mixup
def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """timm `one_hot(target, n, on_value=1 - s + s/n, off_value=s/n)`, fp32."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def cutmix_box(lam: jax.Array, cy: jax.Array, cx: jax.Array, height: int, width: int):
  """timm `rand_bbox` (margin 0) for a given centre: (yl, yh, xl, xh) and the corrected lam
  1 - box area / image area (`cutmix_bbox_and_lam(correct_lam=True)`).

  As in timm 0.4.12, which BEiT's fine-tuning code pins, the box is [c - cut//2, c + cut//2)
  (timm >= 0.9 ends it at c + (cut + 1)//2); lam is corrected to the area actually cut.
  """
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)  # int() of a non-negative float
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  yl = jnp.clip(cy - cut_h // 2, 0, height)
  yh = jnp.clip(cy + cut_h // 2, 0, height)
  xl = jnp.clip(cx - cut_w // 2, 0, width)
  xh = jnp.clip(cx + cut_w // 2, 0, width)
  corrected = 1.0 - ((yh - yl) * (xh - xl)).astype(jnp.float32) / float(height * width)
  return (yl, yh, xl, xh), corrected


def mixup_cutmix(
  rng: jax.Array,
  images: jax.Array,
  labels: jax.Array,
  *,
  num_classes: int,
  mixup_alpha: float = 0.8,
  cutmix_alpha: float = 1.0,
  prob: float = 1.0,
  switch_prob: float = 0.5,
  label_smoothing: float = 0.1,
):
  """timm Mixup in 'batch' mode on a (global) batch: every image is mixed with its mirror
  in the batch (x.flip(0)); one lam and one box for the whole batch.

  Returns (mixed images, soft targets (B, num_classes) fp32, lam). With both alphas 0 or
  prob 0 it is label smoothing alone (lam = 1).
  """
  batch, height, width, _ = images.shape
  flipped_labels = labels[::-1]
  if (mixup_alpha <= 0 and cutmix_alpha <= 0) or prob <= 0:
    return images, smooth_one_hot(labels, num_classes, label_smoothing), jnp.float32(1.0)
  k_apply, k_switch, k_mix, k_cut, k_cy, k_cx = jax.random.split(rng, 6)
  apply = jax.random.uniform(k_apply) < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mix = jax.random.beta(k_mix, max(mixup_alpha, 1e-6), max(mixup_alpha, 1e-6))
  lam_cut = jax.random.beta(k_cut, max(cutmix_alpha, 1e-6), max(cutmix_alpha, 1e-6))
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_cut, lam_mix), 1.0).astype(jnp.float32)

  cy = jax.random.randint(k_cy, (), 0, height)
  cx = jax.random.randint(k_cx, (), 0, width)
  (yl, yh, xl, xh), lam_corrected = cutmix_box(lam, cy, cx, height, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  in_box = (rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh)
  flipped = images[::-1]
  cut = jnp.where(in_box[None, :, :, None], flipped, images)
  mixed = images * lam.astype(images.dtype) + flipped * (1.0 - lam).astype(images.dtype)
  do_cut = apply & use_cutmix
  out = jnp.where(do_cut, cut, jnp.where(apply, mixed, images))
  lam = jnp.where(do_cut, lam_corrected, lam)
  y1 = smooth_one_hot(labels, num_classes, label_smoothing)
  y2 = smooth_one_hot(flipped_labels, num_classes, label_smoothing)
  return out, y1 * lam + y2 * (1.0 - lam), lam


def soft_cross_entropy(
  logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
  """timm SoftTargetCrossEntropy: mean over rows of sum(-t * log_softmax(logits)), fp32."""
  losses = -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32), -1), -1)
  if weights is None:
    return losses.mean()
  weights = weights.astype(jnp.float32)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)
