"""`python -m mim_jax.aot` for GPU targets: the real train step compiled for compile-only
NVIDIA GPUs (jax's CUDA plugin, the `gpu-aot` extra that `make test` installs), without a GPU
or any NVIDIA library."""

from importlib import metadata
import json
import os
import subprocess
import sys

from absl import flags
import pytest

flags.FLAGS.mark_as_parsed()

from mim_jax import aot  # noqa: E402
from mim_jax import aot_gpu  # noqa: E402
from mim_jax import runner  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSENT = {"data.source": "npz", "data.path": "/nonexistent/train.npz"}
needs_plugin = pytest.mark.skipif(
  not aot_gpu.plugin_installed(),
  reason='jax\'s CUDA plugin is not installed (pip install -e ".[gpu-aot]"; make test does)',
)
HAS_GPU = any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg"))


def _run(args, env=None, timeout=300):
  env = {k: v for k, v in dict(os.environ, **(env or {})).items() if k != "XLA_FLAGS"}
  return subprocess.run(
    [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
  )


def _aot(tmp_path, *args, config="configs/ccvit_vitb.py:runlocal"):
  out = str(tmp_path / "report.json")
  r = _run(["-m", "mim_jax.aot", f"--config={config}", f"--out={out}", *args])
  return r, (json.load(open(out)) if os.path.exists(out) else None)


def _errors(r):
  return [line for line in r.stderr.splitlines() if line.startswith("error:")]


@needs_plugin
def test_runlocal_config_compiles_for_h100_8(tmp_path):
  absent = [f"--config.{k}={v}" for k, v in ABSENT.items()]
  r, report = _aot(tmp_path, "--topology=h100-8", *absent)
  assert r.returncode == 0, r.stderr[-3000:]
  assert report["platform"] == "gpu" and report["chips"] == 8 and report["processes"] == 1
  assert report["device_kind"] == "NVIDIA H100 80GB HBM3"
  assert report["hbm_per_chip_gib"] == pytest.approx(79.11, abs=0.01)  # 84,942,979,072 B
  mem = report["memory_per_chip_gib"]
  assert mem["arguments"] > 0 and mem["temp"] > 0 and 0 < mem["total"] < 79
  assert report["fits"] is True and report["batch_per_chip"] == report["global_batch"] / 8
  # XLA:GPU has no cost analysis: the count is the lowered HLO's, and says so.
  assert report["xla_flops_source"].startswith("lowered HLO")
  ratio = report["xla_gflops_per_image"] / report["analytic_gflops_per_image"]
  assert 0.9 < ratio < 1.3, ratio
  assert any("/nonexistent/train.npz" in n for n in report["standins"]), report["standins"]
  lines = r.stdout.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(report["config"] + " on h100-8 (8 GPUs, ")
  assert "fits" in lines[0] and "of 79.1 GiB per GPU" in lines[0], lines[0]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]


@needs_plugin
def test_oversize_batch_on_a_gpu_exits_nonzero_naming_the_shortfall(tmp_path):
  """XLA:GPU compiles it (memory is checked only when a step runs): the total decides."""
  r, report = _aot(tmp_path, "--topology=h100-8", "--config.batch_size=262144")
  assert r.returncode == 1, r.stderr[-3000:]
  errors = _errors(r)
  assert len(errors) == 1, r.stderr[-3000:]
  assert "GiB per GPU, h100 has 79.1 GiB" in errors[0], errors[0]
  assert "--config.model.remat=True" in errors[0]
  assert "Traceback" not in r.stderr and report is None


@needs_plugin
def test_h100_16_is_two_hosts_of_8():
  code = (
    "import mim_jax; from mim_jax import aot\n"
    "d = aot.target_devices(aot.parse_topology('h100-16'))\n"
    "print(len(d), len({x.process_index for x in d}), d[0].device_kind)"
  )
  r = _run(["-c", code], env={"MIM_JAX_CUDA_PLUGIN": "1"}, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.strip().splitlines()[-1] == "16 2 NVIDIA H100 80GB HBM3"


@pytest.mark.parametrize(
  "name, chips, shape",
  [
    ("h100-8", 8, (1, 1, 8)),
    ("h200-1", 1, (1, 1, 1)),
    ("a100-4", 4, (1, 1, 4)),
    ("h100-16", 16, (1, 2, 8)),
    ("h200-64", 64, (1, 8, 8)),
  ],
)
def test_gpu_names_map_to_hosts_of_8(name, chips, shape):
  t = aot.parse_topology(name)
  assert (t.platform, t.chips, t.shape, t.unit) == ("gpu", chips, shape, "GPU")


@pytest.mark.parametrize(
  "name, num_slices, needle",
  [
    ("h100-12", 1, "h100 targets are 1 to 8 GPUs on one host or hosts of 8"),
    ("h100-0", 1, "h100 targets are 1 to 8 GPUs"),
    ("b200-8", 1, "or a GPU target, one of ['a100', 'h100', 'h200']"),
    ("h100-8", 2, "GPU targets have no slices; name the GPUs in all (h100-16"),
  ],
)
def test_bad_gpu_names(name, num_slices, needle):
  with pytest.raises(runner.ConfigError) as e:
    aot.parse_topology(name, num_slices)
  assert needle in str(e.value) and "\n" not in str(e.value)


@needs_plugin
def test_bad_gpu_count_from_the_cli_is_one_line(tmp_path):
  r, _ = _aot(tmp_path, "--topology=h200-12")
  assert r.returncode == 2, r.stderr[-2000:]
  errors = _errors(r)
  assert len(errors) == 1 and "--topology=h200-12: h200 targets are 1 to 8" in errors[0], r.stderr


def test_device_memory_is_the_target_descriptions():
  """HBM in the report is what the compiler is told (CUDA's total: GiB, not the GB of the
  product name)."""
  assert aot_gpu.memory_gib("a100") == pytest.approx(79.26, abs=0.01)
  assert aot_gpu.memory_gib("h100") == pytest.approx(79.11, abs=0.01)
  assert aot_gpu.memory_gib("h200") == pytest.approx(141.0, abs=0.01)
  for gpu, major in (("a100", 8), ("h100", 9), ("h200", 9)):
    assert f"cuda_compute_capability {{\n    major: {major}\n" in aot_gpu.target_config(gpu)


def test_missing_cuda_plugin_is_one_line(monkeypatch):
  real = metadata.version

  def version(name):
    if name == "jax-cuda12-plugin":
      raise metadata.PackageNotFoundError(name)
    return real(name)

  monkeypatch.setattr(metadata, "version", version)
  with pytest.raises(
    runner.ConfigError, match=r"need jax's CUDA plugin: pip install -e \"\.\[gpu-aot\]\""
  ):
    aot.target_devices(aot.parse_topology("h100-8"))


@needs_plugin
@pytest.mark.skipif(HAS_GPU, reason="a GPU is visible: the plugin is meant to load")
def test_cpu_runs_with_the_cuda_plugin_installed_stay_quiet():
  """Without a GPU, `import mim_jax` hides the plugin from jax (mim_jax/__init__.py): no
  "Could not find cuda drivers" lines, no traceback from its CUDA check."""
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES")}
  code = "import mim_jax, jax; print(jax.devices()[0].platform)"
  r = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
  )
  assert r.returncode == 0 and r.stdout.strip() == "cpu", r.stderr[-2000:]
  assert "cuda" not in r.stderr.lower() and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_an_untileable_dot_compiles_again_with_cublas_on_gpu_targets_only():
  """caev2_vitb at 128 per GPU on h200-1 stopped XLA:GPU with "Couldn't find output tile sizes
  that satisfy hlo: %dot..." (no GPU to autotune on); the real H200 compiled it. The dry run
  compiles again with cuBLAS for the matmuls and says so in the report and summary line."""

  class Lowered:
    def __init__(self):
      self.calls = []

    def compile(self, compiler_options=None):
      self.calls.append(compiler_options)
      if compiler_options is None:
        raise RuntimeError("INTERNAL: Couldn't find output tile sizes that satisfy hlo: %dot.764")
      return "compiled"

  gpu, tpu = aot.parse_topology("h200-1"), aot.parse_topology("v5e-4")
  lowered = Lowered()
  assert aot.compile_for(lowered, gpu) == ("compiled", {"xla_gpu_enable_triton_gemm": False})
  assert lowered.calls == [None, {"xla_gpu_enable_triton_gemm": False}]
  with pytest.raises(RuntimeError, match="tile sizes"):  # a TPU compile error is not retried
    aot.compile_for(Lowered(), tpu)

  class Other(Lowered):
    def compile(self, compiler_options=None):
      raise RuntimeError("INTERNAL: something else")

  with pytest.raises(RuntimeError, match="something else"):
    aot.compile_for(Other(), gpu)
  report = {
    "config": "caev2 B/16 batch 128 bfloat16",
    "topology": "h200-1",
    "platform": "gpu",
    "chips": 1,
    "batch_per_chip": 128,
    "hbm_per_chip_gib": 141.0,
    "memory_per_chip_gib": {"total": 10.57, "arguments": 1.64, "temp": 8.93},
    "xla_gflops_per_image": 108.3,
    "analytic_gflops_per_image": 107.6,
    "compile_s": 77,
    "compiler_options": {"xla_gpu_enable_triton_gemm": False},
  }
  assert aot.summary_line(report).endswith("compiled in 77 s, xla_gpu_enable_triton_gemm=False")
