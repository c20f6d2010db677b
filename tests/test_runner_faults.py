"""Faults a pod job meets, each done for real: non-finite steps, a corrupt JPEG mid-run, a
broken config file, a changed data order on resume, a full disk, a second trainer on the
same workdir, a changed teacher/tokenizer, SIGTERM during start-up.

The trainer runs as the command users type (subprocesses, one CPU device).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from train_util import assert_one_line_error
from train_util import checkpoint_steps
from train_util import logged_rows
from train_util import ROOT
from train_util import run_train
from train_util import smooth_images
from train_util import tiny_flags
from train_util import train_cmd
from train_util import train_env


def _error_line(result) -> str:
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  return lines[0]


# ------------------------------------------------------------------ non-finite steps
def test_non_finite_update_is_never_kept_and_the_run_resumes(trained_workdir, tiny_npz):
  workdir = trained_workdir  # checkpoints 2 and 4
  bad = run_train(
    workdir,
    tiny_flags(
      tiny_npz, total_steps=12, checkpoint_every=2, **{"optim.lr": 1e10, "optim.warmup_steps": 0}
    ),
  )
  assert bad.returncode == 3, bad.stderr[-2000:]
  line = _error_line(bad)
  # The first update at lr=1e10 leaves huge but finite parameters; a later one is not finite.
  bad_step = int(re.search(r"non-finite .* at step (\d+)", line).group(1))
  assert bad_step > 4, line
  assert checkpoint_steps(workdir) == [2, 4]
  from mim_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top

  params, _, step = ckpt_lib.read_trained_state(workdir)
  assert step == 4
  assert all(np.isfinite(np.asarray(x)).all() for x in _leaves(params))
  # Back at a normal learning rate the kept checkpoint trains on, finite.
  again = run_train(workdir, tiny_flags(tiny_npz, total_steps=8, checkpoint_every=4))
  assert again.returncode == 0, again.stderr[-2000:]
  rows = logged_rows(workdir)
  assert all(np.isfinite(rows[s]["loss"]) for s in range(5, 9))


def test_bounded_skips_of_non_finite_steps(tmp_path, tiny_npz):
  """max_nonfinite_skips lets a run pass a few bad steps; the parameters stay unchanged."""
  workdir = str(tmp_path / "w")
  flags = tiny_flags(
    tiny_npz,
    total_steps=3,
    checkpoint_every=3,
    max_nonfinite_skips=5,
    **{"optim.lr": 1e10, "optim.warmup_steps": 0},
  )
  result = run_train(workdir, flags)
  assert result.returncode == 0, result.stderr[-2000:]
  rows = logged_rows(workdir)
  assert rows[3]["nonfinite_steps"] >= 2
  from mim_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top

  params, _, _ = ckpt_lib.read_trained_state(workdir)
  assert all(np.isfinite(np.asarray(x)).all() for x in _leaves(params))


def _leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top

  return jax.tree.leaves(tree)


# ------------------------------------------------------------------ bad data
def _folder_with_a_corrupt_jpeg(tmp_path, n_bad=1):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  root = tmp_path / "folder"
  for c in ("a", "b"):
    (root / "train" / c).mkdir(parents=True)
    for i in range(12):
      Image.fromarray(smooth_images(1, 16, 10 * i + ord(c))[0]).save(
        root / "train" / c / f"{i}.png"
      )
  for i in range(n_bad):
    (root / "train" / "b" / f"broken{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
  return root


def _centroids(tmp_path) -> str:
  from mim_jax.tokenizers import centroids  # pylint: disable=g-import-not-at-top

  path = str(tmp_path / "codebook")
  rand = np.random.default_rng(0).random((16, 3 * 4 * 4), np.float32)
  centroids.CentroidTokenizer(rand, patch_size=4).save(path)
  return path


def _folder_flags(root, codebook, **over):
  flags = tiny_flags(
    "",
    **{
      "data.source": "imagefolder",
      "tokenizer.path": codebook,
      "tokenizer.build_if_missing": False,
      **over,
    },
  )
  return [f for f in flags if not f.startswith("--config.data.path=")] + [
    f"--config.data.path={root}"
  ]


@pytest.mark.slow
def test_corrupt_jpeg_mid_run_is_skipped_counted_and_identical_after_resume(tmp_path):
  root, codebook = _folder_with_a_corrupt_jpeg(tmp_path), _centroids(tmp_path)
  # 25 files, batch 8: the broken file is met once per 3-step epoch, 2 in 48 examples.
  flags = _folder_flags(
    root, codebook, total_steps=6, checkpoint_every=3, **{"data.max_bad_fraction": 0.1}
  )
  ref = run_train(str(tmp_path / "ref"), flags)
  assert ref.returncode == 0, ref.stderr[-3000:]
  assert "broken0.jpg" in ref.stderr  # logged with its path
  rows = logged_rows(str(tmp_path / "ref"))
  assert rows[6]["bad_examples"] >= 1  # 25 files, 6 batches of 8: the broken one is met
  first_bad = min(s for s in rows if rows[s]["bad_examples"] >= 1)
  # Interrupted after step 3 and resumed: the same substitution, the same losses.
  cut = str(tmp_path / "cut")
  part = run_train(
    cut,
    _folder_flags(
      root, codebook, total_steps=3, checkpoint_every=3, **{"data.max_bad_fraction": 0.1}
    ),
  )
  assert part.returncode == 0, part.stderr[-3000:]
  rest = run_train(cut, flags)
  assert rest.returncode == 0, rest.stderr[-3000:]
  cut_rows = logged_rows(cut)
  for s in range(1, 7):
    assert cut_rows[s]["bad_examples"] == rows[s]["bad_examples"], s
    np.testing.assert_allclose(cut_rows[s]["loss"], rows[s]["loss"], rtol=0, atol=1e-6)
  assert first_bad >= 1


def test_too_much_bad_data_stops_with_the_files_named(tmp_path):
  root, codebook = _folder_with_a_corrupt_jpeg(tmp_path, n_bad=12), _centroids(tmp_path)
  result = run_train(
    str(tmp_path / "w"),
    _folder_flags(root, codebook, total_steps=6, **{"data.max_bad_fraction": 0.05}),
  )
  assert result.returncode == 5, result.stderr[-3000:]
  line = _error_line(result)
  assert "config.data.max_bad_fraction" in line and "broken" in line, line


# ------------------------------------------------------------------ bad input, one line each
def _config_file(tmp_path, body: str) -> str:
  path = tmp_path / "exp.py"
  path.write_text(body)
  return str(path)


@pytest.mark.parametrize(
  "body,needles",
  [
    ("def get_config(arg=''):\n  return 1 +\n", ("exp.py:2", "SyntaxError")),
    (
      "import ml_collections\n\ndef get_config(arg=''):\n  raise ValueError('no such size')\n",
      ("exp.py:4", "no such size"),
    ),
    ("def get_config(arg=''):\n  return {'a': 1}\n", ("exp.py", "not an ml_collections")),
    ("import no_such_module_here\n", ("exp.py:1", "no_such_module_here")),
  ],
)
def test_broken_config_file_is_one_line(tmp_path, body, needles):
  started = time.time()
  result = run_train(str(tmp_path / "w"), [], config=_config_file(tmp_path, body), timeout=120)
  assert_one_line_error(result, *needles)
  assert time.time() - started < 60


def test_resume_with_a_changed_data_order_names_the_field(trained_workdir, tiny_npz):
  workdir = trained_workdir  # checkpoints 2 and 4
  result = run_train(workdir, tiny_flags(tiny_npz, total_steps=6, seed=7), timeout=120)
  assert_one_line_error(result, "seed")
  # worker_count no longer decides the order: resuming with another count continues.
  more = run_train(workdir, tiny_flags(tiny_npz, total_steps=6, **{"data.worker_count": 2}))
  assert more.returncode == 0, more.stderr[-2000:]
  assert checkpoint_steps(workdir)[-1] == 6


def _with_file_size_limit(cmd, max_bytes):
  """`cmd` run under RLIMIT_FSIZE=max_bytes with SIGXFSZ ignored (EFBIG errors, not a kill).

  The limit is set by a tiny Python that then execs `cmd`, not by subprocess's preexec_fn:
  that runs Python in the forked child of this multithreaded test process (JAX's and libtpu's
  threads), where a lock held by another thread at the fork deadlocks the child and with it
  the parent's Popen, which no subprocess timeout covers.
  """
  setup = (
    "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    f"resource.setrlimit(resource.RLIMIT_FSIZE, ({max_bytes}, {max_bytes})); "
    "os.execv(sys.argv[1], sys.argv[1:])"
  )
  return [sys.executable, "-c", setup, *cmd]


def test_full_disk_is_one_line_and_the_previous_checkpoint_survives(trained_workdir, tiny_npz):
  workdir = trained_workdir  # checkpoints 2 and 4
  # A real write failure from the OS (EFBIG) stands in for a full disk: no file may grow
  # past 4 KiB, so the next checkpoint's arrays cannot be written.
  result = subprocess.run(
    _with_file_size_limit(
      train_cmd(workdir, tiny_flags(tiny_npz, total_steps=6, checkpoint_every=2)), 4096
    ),
    env=train_env(),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 4, result.stderr[-3000:]
  line = _error_line(result)
  assert workdir in line, line
  assert checkpoint_steps(workdir) == [2, 4]
  from mim_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top

  _, _, step = ckpt_lib.read_trained_state(workdir)
  assert step == 4


def test_second_trainer_on_a_workdir_in_use_stops_with_one_line(tmp_path, tiny_npz):
  workdir = str(tmp_path / "w")
  # The first run's log goes to a file: a pipe nobody reads while it runs would fill up and
  # stall it.
  log_path = tmp_path / "first.log"
  with open(log_path, "w") as log:
    first = subprocess.Popen(
      train_cmd(workdir, tiny_flags(tiny_npz, total_steps=10_000, checkpoint_every=10_000)),
      env=train_env(),
      cwd=ROOT,
      stdout=subprocess.DEVNULL,
      stderr=log,
    )
  try:
    deadline = time.time() + 240
    while time.time() < deadline and not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
      assert first.poll() is None, log_path.read_text()[-2000:]
      time.sleep(0.2)
    second = run_train(workdir, tiny_flags(tiny_npz, total_steps=10_000), timeout=120)
    assert_one_line_error(second, "in use", str(first.pid))
  finally:
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=120)
  assert first.returncode == 0, log_path.read_text()[-2000:]


def test_changed_tokenizer_is_refused_on_resume(tmp_path, tiny_npz):
  workdir = str(tmp_path / "w")
  codebook = _centroids(tmp_path)
  flags = {"tokenizer.path": codebook, "tokenizer.build_if_missing": False}
  ok = run_train(workdir, tiny_flags(tiny_npz, total_steps=2, checkpoint_every=2, **flags))
  assert ok.returncode == 0, ok.stderr[-2000:]
  with open(os.path.join(workdir, "frozen.json")) as f:
    assert "tokenizer.path" in json.load(f)
  # The same path with other contents (a retrained codebook) is a different target.
  from mim_jax.tokenizers import centroids  # pylint: disable=g-import-not-at-top

  other = np.random.default_rng(1).random((16, 3 * 4 * 4), np.float32)
  centroids.CentroidTokenizer(other, patch_size=4).save(codebook)
  result = run_train(workdir, tiny_flags(tiny_npz, total_steps=4, **flags), timeout=120)
  assert_one_line_error(result, "config.tokenizer.path")


@pytest.mark.slow
def test_sigterm_during_start_up_exits_cleanly(tmp_path, tiny_npz):
  workdir = str(tmp_path / "w")
  proc = subprocess.Popen(
    train_cmd(workdir, tiny_flags(tiny_npz, total_steps=10_000)),
    env=train_env(),
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  time.sleep(4)  # importing jax / building the model: before the first step
  proc.send_signal(signal.SIGTERM)
  err = proc.communicate(timeout=180)[1]
  assert proc.returncode == 0, err[-3000:]
  assert "Traceback" not in err


# ------------------------------------------------------------------ damaged checkpoints
def _largest_file(directory: str) -> str:
  files = [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(
  trained_workdir, tiny_npz, damage
):
  workdir = trained_workdir  # checkpoints 2 and 4
  before = logged_rows(workdir)
  victim = _largest_file(os.path.join(workdir, "checkpoints", "4", "state"))
  data = bytearray(open(victim, "rb").read())
  if damage == "truncate":
    data = data[: len(data) // 2]
  else:  # real flipped bytes in the middle of the largest parameter array file
    for i in range(len(data) // 2, len(data) // 2 + 16):
      data[i] ^= 0xFF
  with open(victim, "wb") as f:
    f.write(data)
  again = run_train(workdir, tiny_flags(tiny_npz, total_steps=6, checkpoint_every=2))
  assert again.returncode == 0, again.stderr[-3000:]
  damaged = [line for line in again.stderr.splitlines() if "is damaged" in line]
  assert len(damaged) == 1, again.stderr[-3000:]
  assert "resumed from" in again.stderr and "checkpoints/2" in again.stderr
  kept = [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.startswith("damaged_4")]
  assert len(kept) == 1  # reported and kept, never deleted
  rows = logged_rows(workdir)  # steps 3-4 re-run from checkpoint 2: the same losses
  for s in (3, 4):
    np.testing.assert_allclose(rows[s]["loss"], before[s]["loss"], rtol=0, atol=1e-6)
  assert checkpoint_steps(workdir) == [2, 4, 6]
