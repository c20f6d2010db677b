"""Pictures a person can read: image grids with a title on every row and column (the
methods' `visualize`, the notebooks). Methods import this neutral module, never each other."""

from __future__ import annotations

from typing import Sequence

import numpy as np

_BACKGROUND = 255
_INK = (20, 20, 20)


def _font(size: int):
  from PIL import ImageFont  # pylint: disable=g-import-not-at-top

  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow without scalable default fonts
    return ImageFont.load_default()


def labelled_grid(
  rows: Sequence[tuple[str, np.ndarray]],
  col_titles: Sequence[str] | None = None,
  *,
  cell: int = 128,
  title: str = "",
) -> np.ndarray:
  """uint8 (H, W, 3): row r shows rows[r][1] (N images, float in [0, 1] or uint8, HWC or
  HW) side by side with rows[r][0] written on its left; column titles on top. Images are
  enlarged by an integer factor to about `cell` pixels (nearest: patches stay sharp)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top

  if not rows:
    raise ValueError("labelled_grid needs at least one row")
  prepared = []
  for name, images in rows:
    images = np.asarray(images)
    if images.dtype != np.uint8:
      images = (np.clip(images.astype(np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
    if images.ndim == 3:  # (N, H, W) masks
      images = np.repeat(images[..., None], 3, axis=-1)
    prepared.append((name, images))
  h, w = prepared[0][1].shape[1:3]
  scale = max(1, cell // max(h, w))
  ch, cw = h * scale, w * scale
  cols = max(len(images) for _, images in prepared)
  font = _font(14)
  gap = 6
  left = 12 + max(int(font.getlength(name)) for name, _ in prepared)
  colw = max([cw] + [int(font.getlength(t)) + 4 for t in col_titles or []])
  top = (24 if col_titles else 6) + (26 if title else 0)
  canvas = Image.new(
    "RGB",
    (left + cols * (colw + gap), top + len(prepared) * (ch + gap)),
    (_BACKGROUND,) * 3,
  )
  draw = ImageDraw.Draw(canvas)
  if title:
    draw.text((left, 4), title, fill=_INK, font=_font(16))
  for c, text in enumerate(col_titles or []):
    draw.text((left + c * (colw + gap), top - 20), text, fill=_INK, font=font)
  for r, (name, images) in enumerate(prepared):
    y = top + r * (ch + gap)
    draw.text((6, y + ch // 2 - 8), name, fill=_INK, font=font)
    for c, image in enumerate(images):
      big = image.repeat(scale, axis=0).repeat(scale, axis=1)
      canvas.paste(Image.fromarray(big), (left + c * (colw + gap), y))
  return np.asarray(canvas)


def tint(images: np.ndarray, where: np.ndarray, colour, patch: int, grid_w: int, alpha=0.5):
  """images (B, H, W, 3) float with the patches flagged in `where` (B, N) blended toward
  `colour`."""
  out = np.array(images, np.float32, copy=True)
  colour = np.asarray(colour, np.float32)
  for b, n in zip(*np.nonzero(np.asarray(where))):
    r, c = divmod(int(n), grid_w)
    sl = (b, slice(r * patch, (r + 1) * patch), slice(c * patch, (c + 1) * patch))
    out[sl] = (1 - alpha) * out[sl] + alpha * colour
  return out
