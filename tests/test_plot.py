"""`python -m mim_jax.plot` (mim_jax/plot.py) and the reference runs it overlays
(docs/reference_runs/)."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from mim_jax import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "docs", "reference_runs")
RUNLOCAL = (
  "beitv2_vitb",
  "peco_vitb",
  "peco_mae_vitb",
  "mapet_vitb",
  "ccvit_vitb",
  "caev2_vitb",
  "vqkd_vitb",
  "peco_vqvae",
)


def test_every_method_and_the_demo_have_a_reference_run():
  for name in RUNLOCAL + ("ccvit_demo",):
    path = os.path.join(REFERENCE, name, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) >= 5 and all(np.isfinite(r["loss"]) for r in rows), name
    assert rows[-1]["loss"] < rows[0]["loss"], f"{name}: the reference run does not learn"


def test_plot_command_on_the_demo_run_writes_a_png(tmp_path):
  out = tmp_path / "curves.png"
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "mim_jax.plot",
      os.path.join(REFERENCE, "ccvit_demo"),
      os.path.join(REFERENCE, "vqkd_vitb"),
      f"--out={out}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert r.returncode == 0, r.stderr[-2000:]
  for panel in ("losses", "accuracy", "learning rate", "throughput", "codebook usage"):
    assert panel in r.stdout
  image = np.asarray(Image.open(out))
  assert image.shape[0] > 300 and image.shape[1] > 600


def test_a_resumed_run_keeps_the_last_value_of_a_relogged_step(tmp_path):
  rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "loss": 2.0}]
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  _, series = plot.read_run(str(tmp_path))
  assert series["loss"] == [(1, 3.0), (2, 2.0)]


def test_a_missing_run_is_one_line(tmp_path, capsys):
  assert plot.main([str(tmp_path / "nowhere"), f"--out={tmp_path / 'x.png'}"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error:") and "no metrics.jsonl" in err and "\n" not in err
