"""Test set-up: 8 fake CPU devices for sharding tests, and the torchvision shim.

XLA_FLAGS must be set before JAX is first imported, so it lives here. Tests that
need one device build a one-device mesh explicitly.
"""

import os
import shutil
import sys

# Cheaper XLA:CPU code generation (LLVM without its expensive passes): the suite compiles
# hundreds of small programs and runs each a few times, so compilation dominates (the four
# method test files: 7.1 -> 4.9 min). It changes no HLO, so the numerical checks keep
# their tolerances; benchmarks/ measures speed with the default flags.
os.environ.setdefault(
  "XLA_FLAGS",
  "--xla_force_host_platform_device_count=8 "
  "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (compile-only TPU targets, tests/test_aot.py) allows one loading process per machine
# unless told otherwise; pytest-xdist workers and the CLI subprocesses may overlap.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import train_util  # noqa: E402  (tests/ is on sys.path for conftest and test modules)

SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")


@pytest.fixture(scope="session")
def shared_data():
  """Path of ../shared/data, or a skip when this clone has none."""
  if not os.path.isdir(SHARED_DATA):
    pytest.skip("../shared/data is absent (a user clone): this test needs the real images")
  return SHARED_DATA


@pytest.fixture(scope="session")
def torch_ref():
  """Imports torch + timm with the torchvision shim; returns the torch module."""
  torch = pytest.importorskip("torch", reason="torch is a test extra (pip install -e .[test])")
  from mim_jax.testing import torch_compat

  torch_compat.install()
  torch.set_num_threads(2)
  return torch


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory):
  """96 smooth 16 px images in 4 classes: the trainer tests' data (train_util.tiny_flags)."""
  path = tmp_path_factory.mktemp("data") / "tiny.npz"
  x = train_util.smooth_images(96, 16, 0)
  y = np.arange(96, dtype=np.int32) % 4
  np.savez(path, x_train=x, y_train=y, x_test=x[:16], y_test=y[:16])
  return str(path)


@pytest.fixture(scope="session")
def _trained_once(tmp_path_factory, tiny_npz):
  """One 4-step trainer run (checkpoints 2 and 4) that fault tests start from."""
  workdir = str(tmp_path_factory.mktemp("trained") / "w")
  result = train_util.run_train(
    workdir, train_util.tiny_flags(tiny_npz, total_steps=4, checkpoint_every=2)
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert train_util.checkpoint_steps(workdir) == [2, 4]
  return workdir


@pytest.fixture
def trained_workdir(_trained_once, tmp_path):
  """A private copy of a workdir trained for 4 steps with checkpoints at 2 and 4 (the
  flags of train_util.tiny_flags(tiny_npz, total_steps=4, checkpoint_every=2))."""
  workdir = str(tmp_path / "w")
  shutil.copytree(_trained_once, workdir)
  return workdir
