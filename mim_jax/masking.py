"""Host-side (numpy) patch masks: BEiT-style block masks, random masks, CCViT replacing.

These run once per example inside data-loader workers, so they are plain Python
and numpy with scalar draws from the caller's `np.random.Generator` only; the
same generator state always gives the same mask.

All masks are flat bool arrays in row-major patch order (True = masked), the
layout of the reference's `bool_masked_pos`.
"""

import math
from typing import Optional, Sequence, Union

import numpy as np

# A 'loop' mask (CAE) that makes no progress in this many consecutive rounds is
# reported instead of spinning forever; practical settings never get close.
_MAX_STALLED_ROUNDS = 10_000

_EXACT_MODES = (True, False, "loop")


def _check_grid(grid: Sequence[int]) -> tuple[int, int]:
  if len(grid) != 2:
    raise ValueError(f"grid must be (height, width), got {grid!r}")
  height, width = (int(g) for g in grid)
  if height != grid[0] or width != grid[1] or height < 1 or width < 1:
    raise ValueError(f"grid must hold two positive integers, got {grid!r}")
  return height, width


def _place_one_block(
  rng: np.random.Generator,
  mask: np.ndarray,
  budget: int,
  min_block: float,
  log_aspect_lo: float,
  log_aspect_hi: float,
) -> int:
  """One `_mask` call of the reference: up to 10 attempts to add a rectangle.

  Returns the number of newly masked cells (0 when all attempts failed). Each
  attempt draws area, aspect, top and left like the reference; the uniforms for
  all 10 attempts are drawn in one call because scalar draws dominated the cost
  (unused ones are simply dropped, which leaves every used draw i.i.d.).
  """
  height, width = mask.shape
  for u_area, u_aspect, u_top, u_left in rng.random((10, 4)).tolist():
    # Python's random.uniform(a, b) is a + (b - a) * U[0, 1); this also covers
    # budget < min_block, where the area lands in [budget, min_block].
    area = min_block + (budget - min_block) * u_area
    aspect = math.exp(log_aspect_lo + (log_aspect_hi - log_aspect_lo) * u_aspect)
    h = round(math.sqrt(area * aspect))
    w = round(math.sqrt(area / aspect))
    if w < width and h < height:
      # floor(U * n) is uniform on {0..n-1} up to 2^-53 granularity: randint
      # over [0, height - h] inclusive.
      top = int(u_top * (height - h + 1))
      left = int(u_left * (width - w + 1))
      window = mask[top : top + h, left : left + w]
      new_cells = h * w - int(np.count_nonzero(window))
      if 0 < new_cells <= budget:
        window[...] = True
        return new_cells
  return 0


def block_mask(
  rng: np.random.Generator,
  grid: Sequence[int] = (14, 14),
  num_masked: int = 75,
  min_block: float = 16,
  max_block: Optional[int] = None,
  min_aspect: float = 0.3,
  max_aspect: Optional[float] = None,
  exact: Union[bool, str] = True,
) -> np.ndarray:
  """BEiT v2 block-wise mask, flat bool of length H*W.

  As `microsoft/unilm:beit2/masking_generator.py` (docs/reference_details.md#block-wise-masking).

  Args:
    rng: the only source of randomness.
    grid: (H, W) patch grid.
    num_masked: target number of masked patches.
    min_block: smallest block area drawn (16 in BEiT v2 / CCViT / CAE).
    max_block: largest budget per block; None means `num_masked`.
    min_aspect: smallest block aspect ratio h/w.
    max_aspect: largest aspect ratio; None means 1 / min_aspect.
    exact: True (BEiT v2 / CCViT): after the block loop stops, mask random
      single unmasked patches so exactly `num_masked` are masked. False
      (BEiT v1): return the union of blocks as is (at most `num_masked`).
      'loop' (CAE, `Atten4Vis/CAE:furnace/masking_generator.py`): keep adding
      blocks until exactly `num_masked`, with no single-patch top-up.

  Returns:
    np.ndarray of bool, shape (H*W,), row-major.
  """
  height, width = _check_grid(grid)
  num_patches = height * width
  if not 0 <= num_masked <= num_patches:
    raise ValueError(
      f"num_masked={num_masked} must lie in [0, H*W={num_patches}] for grid {tuple(grid)}"
    )
  if not min_block > 0:
    raise ValueError(f"min_block={min_block} must be positive")
  max_block = num_masked if max_block is None else max_block
  if max_block < 1 and num_masked > 0:
    raise ValueError(f"max_block={max_block} must be at least 1")
  if not min_aspect > 0:
    raise ValueError(f"min_aspect={min_aspect} must be positive")
  # `or`, like the reference: 0 also means "the reciprocal of min_aspect".
  max_aspect = max_aspect or 1.0 / min_aspect
  if not max_aspect > 0:
    raise ValueError(f"max_aspect={max_aspect} must be positive")
  if isinstance(exact, str) or exact not in _EXACT_MODES:
    if exact != "loop":
      raise ValueError(f"exact={exact!r} must be True, False or 'loop'")
  else:
    exact = bool(exact)
  log_lo, log_hi = math.log(min_aspect), math.log(max_aspect)

  mask = np.zeros((height, width), dtype=bool)
  count = 0
  stalled = 0
  while count < num_masked:
    budget = min(num_masked - count, max_block)
    added = _place_one_block(rng, mask, budget, min_block, log_lo, log_hi)
    if added == 0:
      if exact != "loop":
        break
      stalled += 1
      if stalled >= _MAX_STALLED_ROUNDS:
        raise RuntimeError(
          f"block_mask(exact='loop') made no progress in {stalled} rounds at "
          f"{count}/{num_masked} masked (grid={tuple(grid)}, min_block={min_block}, "
          f"max_block={max_block}); use exact=True for a random top-up"
        )
      continue
    stalled = 0
    count += added

  flat = mask.reshape(-1)
  if exact is True and count < num_masked:
    unmasked = np.flatnonzero(~flat)
    flat[rng.choice(unmasked, num_masked - count, replace=False)] = True
  return flat


def random_mask(rng: np.random.Generator, num_patches: int, num_masked: int) -> np.ndarray:
  """Exactly `num_masked` of `num_patches` positions, uniform over all subsets."""
  if num_patches < 1:
    raise ValueError(f"num_patches={num_patches} must be positive")
  if not 0 <= num_masked <= num_patches:
    raise ValueError(f"num_masked={num_masked} must lie in [0, num_patches={num_patches}]")
  mask = np.zeros(num_patches, dtype=bool)
  mask[rng.choice(num_patches, num_masked, replace=False)] = True
  return mask


def replaced_positions(rng: np.random.Generator, mask: np.ndarray, num_replaced: int) -> np.ndarray:
  """CCViT centroid replacing: `num_replaced` positions among the unmasked.

  `Cakeyan/CCViT_Public:datasets.py` (docs/reference_details.md#ccvit-centroid-replacing).

  Drawn uniformly without replacement from the positions where `mask` is
  False, so the result is disjoint from `mask`. Same shape as `mask`.
  """
  mask = np.asarray(mask)
  if num_replaced < 0:
    raise ValueError(f"num_replaced={num_replaced} must be non-negative")
  unmasked = np.flatnonzero(mask.reshape(-1) == 0)
  if num_replaced > unmasked.size:
    raise ValueError(
      f"num_replaced={num_replaced} exceeds the {unmasked.size} unmasked positions "
      f"({mask.size} patches, {mask.size - unmasked.size} masked)"
    )
  replaced = np.zeros(mask.size, dtype=bool)
  replaced[rng.choice(unmasked, num_replaced, replace=False)] = True
  return replaced.reshape(mask.shape)
