"""Accelerator efficiency numbers (mim_jax/perf.py): the peak table, XLA's FLOP count per
device of a sharded program, and TFLOP/s / MFU from them."""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from mim_jax import perf


@pytest.mark.parametrize(
  "kind,peak",
  [
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),  # v5e: the longer prefix wins over v5p's "TPU v5"
    ("TPU v5", 459.0),
    ("TPU v6 lite", 918.0),
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("cpu", None),
    ("TPU v99", None),
  ],
)
def test_peak_by_device_kind(kind, peak):
  assert perf.peak_tflops(kind) == peak


def test_flops_are_per_device_of_the_sharded_program():
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices: run with the conftest's XLA_FLAGS")

  def f(x, w):
    return jnp.tanh(x @ w).sum()

  counts = {}
  for n in (1, 8):
    mesh = Mesh(np.array(jax.devices()[:n]), ("d",))
    x = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=NamedSharding(mesh, P("d")))
    w = jax.ShapeDtypeStruct((128, 256), jnp.float32, sharding=NamedSharding(mesh, P()))
    counts[n] = perf.cost(jax.jit(f).lower(x, w).compile())["flops"]
  matmul = 2 * 64 * 128 * 256
  assert counts[1] == pytest.approx(matmul, rel=0.02)
  assert counts[8] == pytest.approx(matmul / 8, rel=0.02)


def test_tflops_and_mfu():
  row = perf.efficiency(197e12 * 0.5, 1.0, device_kind="TPU v5 lite")
  assert row == pytest.approx({"tflops_per_device": 98.5, "mfu": 0.5})
  assert perf.efficiency(1e12, 0.5, device_kind="cpu") == {"tflops_per_device": 2.0}
  assert perf.efficiency(None, 1.0) == {}


def test_ccvit_step_bench_accepts_both_dtypes():
  """`--dtype both` used to end in a KeyError after minutes of set-up."""
  import argparse  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top

  path = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "benchmarks", "ccvit_step_bench.py"
  )
  spec = importlib.util.spec_from_file_location("ccvit_step_bench", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  assert bench._dtypes("both") == ["fp32", "bf16"]  # pylint: disable=protected-access
  assert bench._dtypes("bf16") == ["bf16"]  # pylint: disable=protected-access
  with pytest.raises(argparse.ArgumentTypeError, match="fp32, bf16, both"):
    bench._dtypes("float32")  # pylint: disable=protected-access


def _logged_row(tmp_path, step_s, **compiled):
  """The row a MetricLogger writes for one step of `step_s` seconds after set_compiled."""
  from mim_jax import metrics  # pylint: disable=g-import-not-at-top

  tmp_path.mkdir()
  log = metrics.MetricLogger(str(tmp_path), total_steps=10, tensorboard=False)
  log.set_compiled(1.0, **compiled)
  log.mark(0)
  log._last_time -= step_s  # pylint: disable=protected-access  # the step took step_s
  return log.write(1, {"loss": 1.0}, images_per_step=8)


def test_flop_rate_comes_from_model_flops_where_the_method_has_a_formula(tmp_path):
  """XLA:GPU's cost analysis leaves out the cuBLAS calls (an H200 CCViT step: 5.7 of 127.7
  GFLOP per image, BENCHMARKS.md §13): the rate and MFU use the analytic model FLOPs, split
  over the devices; XLA's count only where no formula exists, never under scan_layers."""
  chips = jax.device_count()
  row = _logged_row(tmp_path / "a", 2.0, cost={"flops": 5e9}, model_flops=chips * 4e12)
  assert row["tflops_per_device"] == pytest.approx(2.0, rel=0.01)
  row = _logged_row(tmp_path / "b", 2.0, cost={"flops": 5e9}, scan_layers=True, model_flops=8e12)
  assert row["tflops_per_device"] == pytest.approx(4.0 / chips, rel=0.01)
  row = _logged_row(tmp_path / "c", 2.0, cost={"flops": 6e12})
  assert row["tflops_per_device"] == pytest.approx(3.0, rel=0.01)
  assert "tflops_per_device" not in _logged_row(
    tmp_path / "d", 2.0, cost={"flops": 6e12}, scan_layers=True
  )


def test_model_flops_of_configs():
  import ml_collections  # pylint: disable=g-import-not-at-top

  from configs import ccvit_vitb  # pylint: disable=g-import-not-at-top
  from mim_jax import flops  # pylint: disable=g-import-not-at-top

  c = ccvit_vitb.get_config("")
  assert flops.model_flops(c) == flops.step_flops(c)["total"] > 0
  assert flops.model_flops(ml_collections.ConfigDict({"batch_size": 8})) is None
  assert flops.model_flops(ml_collections.ConfigDict({"method": {"name": "knn"}})) is None
