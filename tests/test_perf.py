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
