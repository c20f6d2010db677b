"""Pictures a person can read (mim_jax/visual.py): every method's visualisation has row and
column titles, CCViT's reconstruction is in pixel space, MaPeT draws its two-stream masks,
and the demo's own picture (the README's first command) is titled."""

import os

import jax.numpy as jnp
import method_util
import numpy as np
from PIL import Image
import pytest

from mim_jax import methods
from mim_jax import visual


def _ink(region: np.ndarray) -> int:
  """Dark pixels (text) in a region of a white-background picture."""
  return int((region.min(axis=-1) < 100).sum())


def test_labelled_grid_writes_its_titles_in_the_margins():
  rows = [("input", np.ones((3, 8, 8, 3))), ("masked", np.ones((3, 8, 8, 3)))]
  titled = visual.labelled_grid(rows, ["#1", "#2", "#3"], cell=64)
  bare = visual.labelled_grid([("", r[1]) for r in rows], None, cell=64)
  assert titled.dtype == np.uint8 and titled.ndim == 3
  # Images are white here: the only dark pixels are the titles' letters.
  assert _ink(titled[:, :40]) > 20 and _ink(titled[:20]) > 10
  assert _ink(bare) == 0


def _visualize(name, tmp_path, **method_over):
  c = method_util.tiny_config(name, tmp_path)
  c.method.update(method_over)
  method = methods.build(c)
  batch, variables = method_util.batch_and_variables(method, 3)
  extra = {k: v for k, v in variables.items() if k != "params"}
  return method, batch, method.visualize(variables["params"], extra, method.consts(), batch)


@pytest.mark.parametrize(
  "name,over,rows",
  [
    ("beitv2_vitb", {}, 3),
    ("ccvit_vitb", {}, 5),
    ("mapet_vitb", {}, 2),
    ("mapet_vitb", {"mode": "mim", "num_masked": 6}, 2),
  ],
)
def test_every_visualisation_is_titled(tmp_path, name, over, rows):
  _, _, picture = _visualize(name, tmp_path, **over)
  assert picture.dtype == np.uint8 and picture.shape[-1] == 3
  assert _ink(picture[:, :30]) > 20, "no row titles"
  assert _ink(picture[:18]) > 20, "no column titles"
  # Every row band has its title: the left margin has ink in each of `rows` horizontal bands.
  bands = np.array_split(picture[18:, :30], rows, axis=0)
  assert all(_ink(b) > 0 for b in bands)


def test_ccvit_shows_its_pixel_prediction_in_pixel_space():
  """The 'predicted pixels' row de-normalises the pixel block's per-patch-normalised output
  with each original patch's mean and (unbiased) variance: a perfect prediction shows the
  original patch."""
  from mim_jax.methods import ccvit  # pylint: disable=g-import-not-at-top

  patches = jnp.asarray(np.random.default_rng(0).random((2, 5, 48), np.float32))
  back = ccvit.per_patch_denormalize(ccvit.per_patch_normalize(patches), patches)
  np.testing.assert_allclose(back, patches, atol=1e-5)


def test_the_demo_picture_has_titles(tmp_path):
  """`make demo`'s command, two steps: its visualization.png carries row and column titles."""
  from train_util import ROOT
  from train_util import run_train  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path / "demo")
  r = run_train(
    workdir,
    ["--config.total_steps=2", "--config.tensorboard=False"],
    config=os.path.join(ROOT, "configs", "ccvit_demo.py"),
    timeout=600,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  picture = np.asarray(Image.open(os.path.join(workdir, "visualization.png")).convert("RGB"))
  assert _ink(picture[:, :30]) > 20 and _ink(picture[:18]) > 20
