"""Tests for mim_jax.masking: BEiT v2 block masks, random masks, CCViT replaced positions."""

import math
import random

import numpy as np
import pytest
from scipy import stats

from mim_jax import masking

GRID = (14, 14)


def reference_block_mask(
  py_rng: random.Random,
  np_rng: np.random.RandomState,
  grid=GRID,
  num_masked=75,
  min_block=16,
  min_aspect=0.3,
  exact=True,
):
  """Straightforward re-implementation of `microsoft/unilm:beit2/masking_generator.py`
  (docs/reference_details.md#block-wise-masking) driven by Python's `random` (and
  np.random for the top-up), written independently of mim_jax.masking.

  Returns (flat int mask, count before the top-up, number of blocks placed,
  (h, w) of the first block).
  """
  height, width = grid
  log_lo, log_hi = math.log(min_aspect), math.log(1 / min_aspect)
  mask = np.zeros(grid, dtype=np.int32)
  count, blocks, first = 0, 0, None
  while count < num_masked:
    budget = num_masked - count
    delta = 0
    for _ in range(10):
      area = py_rng.uniform(min_block, budget)
      aspect = math.exp(py_rng.uniform(log_lo, log_hi))
      h = int(round(math.sqrt(area * aspect)))
      w = int(round(math.sqrt(area / aspect)))
      if w < width and h < height:
        top = py_rng.randint(0, height - h)
        left = py_rng.randint(0, width - w)
        already = mask[top : top + h, left : left + w].sum()
        if 0 < h * w - already <= budget:
          first = first or (h, w)
          for i in range(top, top + h):
            for j in range(left, left + w):
              if mask[i, j] == 0:
                mask[i, j] = 1
                delta += 1
        if delta > 0:
          break
    if delta == 0:
      break
    count += delta
    blocks += 1
  before_top_up = count
  if exact and count < num_masked:
    rows, cols = (mask == 0).nonzero()
    pick = np_rng.choice(rows.shape[0], num_masked - count, replace=False)
    mask[rows[pick], cols[pick]] = 1
  return mask.reshape(-1), before_top_up, blocks, first


class _BlockRecorder:
  """Wraps masking._place_one_block to record each placed block's new cells."""

  def __init__(self, monkeypatch):
    self.blocks = []
    original = masking._place_one_block

    def recording(rng, mask, budget, *args):
      before = mask.copy()
      added = original(rng, mask, budget, *args)
      if added:
        self.blocks.append((before, mask.copy(), budget, added))
      return added

    monkeypatch.setattr(masking, "_place_one_block", recording)


def _isolated_cells(masks):
  """Per mask: masked cells with no masked 4-neighbour (what a top-up leaves)."""
  padded = np.pad(masks, ((0, 0), (1, 1), (1, 1)))
  neighbours = (
    padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
  )
  return ((masks > 0) & (neighbours == 0)).sum(axis=(1, 2)).astype(np.float64)


def _mask_stats(masks, counts_before, first_blocks):
  masks = np.asarray(masks, dtype=np.float64).reshape(len(masks), *GRID)
  first = np.asarray([hw for hw in first_blocks if hw], np.float64)
  full_rows = (masks.sum(axis=2) == GRID[1]).any(axis=1)
  full_cols = (masks.sum(axis=1) == GRID[0]).any(axis=1)
  return dict(
    count_before=np.asarray(counts_before, np.float64),
    needs_top_up=(np.asarray(counts_before) < 75).astype(np.float64),
    row_profile=masks.mean(axis=2),  # per-mask fraction masked in each row
    col_profile=masks.mean(axis=1),
    any_full_line=(full_rows | full_cols).astype(np.float64),
    isolated_cells=_isolated_cells(masks),
    first_block_hw=first,
    first_block_log_aspect=np.log(first[:, 0] / first[:, 1]),
  )


def _z(a, b):
  """Two-sample z statistic of the means (columns independently)."""
  se = np.sqrt(a.var(axis=0, ddof=1) / len(a) + b.var(axis=0, ddof=1) / len(b))
  return np.abs(a.mean(axis=0) - b.mean(axis=0)) / np.maximum(se, 1e-12)


def test_block_mask_exact_count_shape_dtype():
  for seed in range(400):
    mask = masking.block_mask(np.random.default_rng(seed))
    assert mask.shape == (196,) and mask.dtype == np.bool_
    assert mask.sum() == 75


def test_block_mask_other_settings_exact():
  rng = np.random.default_rng(0)
  for num_masked in (0, 1, 30, 98, 150, 196):
    for _ in range(20):
      assert masking.block_mask(rng, num_masked=num_masked).sum() == num_masked
  mask = masking.block_mask(rng, grid=(6, 20), num_masked=40, min_block=4)
  assert mask.shape == (120,) and mask.sum() == 40


def test_block_mask_is_deterministic_given_seed():
  first = [masking.block_mask(np.random.default_rng(seed)) for seed in range(20)]
  again = [masking.block_mask(np.random.default_rng(seed)) for seed in range(20)]
  assert all(np.array_equal(a, b) for a, b in zip(first, again))
  assert len({a.tobytes() for a in first}) == 20


def test_every_block_is_a_rectangle_smaller_than_the_grid(monkeypatch):
  # What is guaranteed: each block is an axis-aligned rectangle with h < H and
  # w < W that adds at most `budget` cells; the union of blocks (exact=False)
  # can still fill a whole row or column when two blocks sit side by side.
  recorder = _BlockRecorder(monkeypatch)
  for grid in (GRID, (5, 20)):
    for seed in range(300):
      recorder.blocks.clear()
      num_masked = 75 if grid == GRID else 40
      mask = masking.block_mask(
        np.random.default_rng(seed), grid=grid, num_masked=num_masked, exact=False
      )
      assert mask.sum() <= num_masked  # 10 failed attempts can leave it empty
      union = np.zeros(grid, bool)
      for before, after, budget, added in recorder.blocks:
        new = after & ~before
        assert new.sum() == added and 0 < added <= budget
        rows, cols = np.nonzero(new)
        top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
        assert bottom - top + 1 < grid[0] and right - left + 1 < grid[1]
        assert after[top : bottom + 1, left : right + 1].all()  # the whole rectangle is masked
        union |= new
      np.testing.assert_array_equal(union.reshape(-1), mask)


def test_block_mask_matches_reference_distribution(monkeypatch):
  num = 3000
  recorder = _BlockRecorder(monkeypatch)
  ours_before, ours_blocks, ours_first = [], [], []
  rng = np.random.default_rng(1234)
  for _ in range(num):
    recorder.blocks.clear()
    blocks_only = masking.block_mask(rng, exact=False)
    ours_before.append(blocks_only.sum())
    ours_blocks.append(len(recorder.blocks))
    if recorder.blocks:  # the first block lands on an empty grid: a full rectangle
      rows, cols = np.nonzero(recorder.blocks[0][1])
      ours_first.append((np.ptp(rows) + 1, np.ptp(cols) + 1))
  rng = np.random.default_rng(99)
  ours = [masking.block_mask(rng) for _ in range(num)]

  py_rng, np_rng = random.Random(4321), np.random.RandomState(4321)
  ref = [reference_block_mask(py_rng, np_rng) for _ in range(num)]
  ref_masks, ref_before, ref_blocks, ref_first = (list(column) for column in zip(*ref))

  a = _mask_stats(ours, ours_before, ours_first)
  b = _mask_stats(ref_masks, ref_before, ref_first)
  for name in a:
    z = _z(a[name], b[name])
    assert np.all(z < 4.5), (name, z, a[name].mean(axis=0), b[name].mean(axis=0))
  assert _z(np.array(ours_blocks, np.float64), np.array(ref_blocks, np.float64)) < 4.5
  # Sanity: the statistics are not degenerate (top-up happens, blocks vary).
  assert 0.05 < a["needs_top_up"].mean() < 0.95
  assert 2.0 < np.mean(ours_blocks) < 8.0


class _NoChoiceRng:
  """A Generator stand-in whose `choice` (the random top-up) must never run."""

  def __init__(self, seed):
    self._rng = np.random.default_rng(seed)

  def random(self, *args, **kwargs):
    return self._rng.random(*args, **kwargs)

  def integers(self, *args, **kwargs):
    return self._rng.integers(*args, **kwargs)

  def choice(self, *args, **kwargs):
    raise AssertionError("the loop variant must not top up with single patches")


def test_block_mask_loop_mode_is_exact_without_top_up():
  rng = _NoChoiceRng(5)
  for num_masked in (98, 49, 30):
    for _ in range(60):
      assert masking.block_mask(rng, num_masked=num_masked, exact="loop").sum() == num_masked
  # The same stand-in does reach the top-up in BEiT v2 mode.
  with pytest.raises(AssertionError, match="top up"):
    for _ in range(100):
      masking.block_mask(rng, exact=True)


def test_block_mask_loop_mode_reports_impossible_settings():
  # On a 2x2 grid only 1x1 blocks fit, but min_block=16 never draws one.
  with pytest.raises(RuntimeError, match="no progress"):
    masking.block_mask(np.random.default_rng(0), grid=(2, 2), num_masked=4, exact="loop")


@pytest.mark.parametrize(
  "kwargs, name",
  [
    (dict(num_masked=197), "num_masked"),
    (dict(num_masked=-1), "num_masked"),
    (dict(min_block=0), "min_block"),
    (dict(min_aspect=0.0), "min_aspect"),
    (dict(max_aspect=-2.0), "max_aspect"),
    (dict(max_block=0), "max_block"),
    (dict(exact="sometimes"), "exact"),
    (dict(grid=(14,)), "grid"),
    (dict(grid=(0, 14)), "grid"),
  ],
)
def test_block_mask_validates_arguments(kwargs, name):
  with pytest.raises(ValueError, match=name):
    masking.block_mask(np.random.default_rng(0), **kwargs)


def test_random_mask_exact_and_uniform():
  rng = np.random.default_rng(0)
  draws = np.stack([masking.random_mask(rng, 20, 5) for _ in range(8000)])
  assert draws.dtype == np.bool_ and (draws.sum(axis=1) == 5).all()
  assert stats.chisquare(draws.sum(axis=0)).pvalue > 1e-4
  # Pairs too: all C(20, 2) pairs equally likely to be masked together.
  pair_counts = (draws[:, :, None] & draws[:, None, :]).sum(axis=0)[np.triu_indices(20, 1)]
  assert stats.chisquare(pair_counts).pvalue > 1e-4
  np.testing.assert_array_equal(
    masking.random_mask(np.random.default_rng(3), 196, 75),
    masking.random_mask(np.random.default_rng(3), 196, 75),
  )
  with pytest.raises(ValueError, match="num_masked"):
    masking.random_mask(rng, 10, 11)


def test_replaced_positions_disjoint_exact_uniform():
  mask = masking.block_mask(np.random.default_rng(7))
  unmasked = np.flatnonzero(~mask)
  rng = np.random.default_rng(1)
  draws = np.stack([masking.replaced_positions(rng, mask, 20) for _ in range(6000)])
  assert draws.dtype == np.bool_ and (draws.sum(axis=1) == 20).all()
  assert not (draws & mask).any()
  assert stats.chisquare(draws.sum(axis=0)[unmasked]).pvalue > 1e-4
  # 2-D int masks (the reference's layout) keep their shape.
  grid_mask = mask.reshape(GRID).astype(np.int32)
  replaced = masking.replaced_positions(np.random.default_rng(2), grid_mask, 121)
  assert replaced.shape == GRID and replaced.sum() == 121
  assert not (replaced & (grid_mask == 1)).any()
  with pytest.raises(ValueError, match="num_replaced=122 exceeds the 121 unmasked"):
    masking.replaced_positions(rng, mask, 122)
