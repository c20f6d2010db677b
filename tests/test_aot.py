"""`python -m mim_jax.aot`: the real train step compiled for compile-only Cloud TPU devices
(libtpu, installed by `make test`), from shapes alone: no data file, no weights."""

import json
import os
import subprocess
import sys

from absl import flags
import jax
import pytest

flags.FLAGS.mark_as_parsed()

from mim_jax import aot  # noqa: E402
from mim_jax import config_lib  # noqa: E402
from mim_jax import runner  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Files that do not exist: the command must never need them.
ABSENT = {
  "data.source": "npz",
  "data.path": "/nonexistent/train.npz",
  "tokenizer.path": "/nonexistent/centroids",
}
PAPER_CONFIGS = aot.PAPER_CONFIGS


def _aot(tmp_path, name, *args, config="configs/ccvit_vitb.py:runlocal", timeout=300):
  out = str(tmp_path / f"{name}.json")
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the tests' quick XLA:CPU flags; the target is a TPU
  cmd = [sys.executable, "-m", "mim_jax.aot", f"--config={config}", f"--out={out}", *args]
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  report = json.load(open(out)) if os.path.exists(out) else None
  return r, report


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
  """ccvit_vitb:runlocal on v5e-4 with the layers unrolled and scanned, from the CLI."""
  tmp = tmp_path_factory.mktemp("aot")
  absent = [f"--config.{k}={v}" for k, v in ABSENT.items()]
  plain = _aot(tmp, "plain", "--topology=v5e-4", *absent)
  scanned = _aot(tmp, "scan", "--topology=v5e-4", "--config.model.scan_layers=True", *absent)
  return plain, scanned


def test_runlocal_config_compiles_for_v5e_4_without_data_or_weights(reports):
  (r, report), _ = reports
  assert r.returncode == 0, r.stderr[-3000:]
  assert report["topology"] == "v5e-4" and report["chips"] == 4
  assert report["device_kind"] == "TPU v5 lite" and report["hbm_per_chip_gib"] == 16
  mem = report["memory_per_chip_gib"]
  assert mem["arguments"] > 0 and mem["temp"] > 0 and 0 < mem["total"] < 16
  assert report["fits"] is True
  assert report["batch_per_chip"] == report["global_batch"] / 4
  assert report["xla_gflops_per_image"] > 0 and report["analytic_gflops_per_image"] > 0
  assert report["compile_s"] > 0
  # The named data file and codebook were replaced, never opened.
  assert any("/nonexistent/train.npz" in n for n in report["standins"]), report["standins"]
  assert any(n.startswith("tokenizer.path: random:") for n in report["standins"])
  lines = r.stdout.strip().splitlines()
  # e.g. "ccvit T/4 batch 32 float32 on v5e-4 (4 chips, 8 per chip): fits, ..." (T/8 at 64 px
  # where ../shared/data is absent)
  assert len(lines) == 1 and lines[0].startswith(report["config"] + " on v5e-4 (4 chips")
  assert "fits" in lines[0]
  # libtpu was told which slice it stands in for: none of its start-up warnings.
  assert "could not determine TPU" not in r.stderr, r.stderr[-2000:]


def test_scan_layers_counts_the_same_flops(reports):
  (_, plain), (r, scanned) = reports
  assert r.returncode == 0, r.stderr[-3000:]
  assert scanned["scan_layers"] is True and plain["scan_layers"] is False
  ratio = scanned["xla_gflops_per_image"] / plain["xla_gflops_per_image"]
  assert abs(ratio - 1) < 0.02, (scanned["xla_gflops_per_image"], plain["xla_gflops_per_image"])
  assert scanned["analytic_gflops_per_image"] == pytest.approx(plain["analytic_gflops_per_image"])


def test_oversize_batch_exits_nonzero_naming_the_shortfall(tmp_path):
  r, report = _aot(tmp_path, "big", "--topology=v5e-4", "--config.batch_size=262144")
  assert r.returncode == 1, r.stderr[-3000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, r.stderr[-3000:]
  assert "GiB per chip" in errors[0] and "v5e has 16" in errors[0], errors[0]
  assert "--config.model.remat=True" in errors[0]  # remat is off in this config: suggest it
  assert "Traceback" not in r.stderr and report is None


@pytest.mark.parametrize(
  "args, needle",
  [
    (["--topology=v5e-3"], "--topology=v5e-3: v5e slices come in powers of two"),
    (["--topology=tpu-8"], "expected a Cloud TPU accelerator type"),
    (["--topology=v5e-4", "--config.batch_size=30"], "config.batch_size=30 is not divisible"),
    ([], "--topology is required"),
  ],
)
def test_bad_input_is_one_line(tmp_path, args, needle):
  r, _ = _aot(tmp_path, "bad", *args, timeout=120)
  assert r.returncode == 2, r.stderr[-2000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and needle in errors[0], r.stderr[-2000:]


@pytest.mark.parametrize(
  "name, chips, shape",
  [
    ("v5e-1", 1, (1, 1)),
    ("v5e-4", 4, (2, 2)),
    ("v5e-8", 8, (2, 4)),
    ("v5e-256", 256, (16, 16)),
    ("v6e-64", 64, (8, 8)),
    ("v4-8", 4, (2, 2, 1)),
    ("v4-16", 8, (2, 2, 2)),
    ("v4-64", 32, (2, 4, 4)),
    ("v4-1024", 512, (8, 8, 8)),
    ("v5p-128", 64, (4, 4, 4)),
  ],
)
def test_accelerator_types_map_to_slices(name, chips, shape):
  t = aot.parse_topology(name)
  assert (t.chips, t.shape) == (chips, shape)


def test_v5e_256_has_the_processes_of_the_real_slice():
  devices = aot.target_devices(aot.parse_topology("v5e-256"))
  assert len(devices) == 256 and devices[0].device_kind == "TPU v5 lite"
  assert len({d.process_index for d in devices}) == 64  # 4 chips per host
  two = aot.target_devices(aot.parse_topology("v5e-4", num_slices=2))
  assert len(two) == 8 and {d.slice_index for d in two} == {0, 1}


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_every_paper_config_lowers_for_its_slice_from_shapes(name):
  """Stand-ins for every frozen input (teacher, tokenizer, token cache, perceptual network)
  and the batch from the config: the full-size step lowers for v5e-256 (v5e-16 for
  PeCo's VQ-VAE, whose paper batch is 128)."""
  c = config_lib.load_config(f"configs/{name}.py")
  with c.unlocked():
    notes = aot.use_standins(c)
  topology = "v5e-16" if name == "peco_vqvae" else "v5e-256"
  lowered, _, _ = aot.lower_step(c, aot.target_devices(aot.parse_topology(topology)))
  (_, frozen, batch), _ = lowered.args_info
  assert {a.shape[0] for a in jax.tree.leaves(batch)} == {c.batch_size}
  assert notes[0].startswith("data: not read")
  runs_a_network = any(
    n.split(":")[0] in ("tokenizer.path", "teacher", "perceptual.path") for n in notes
  )
  assert bool(jax.tree.leaves(frozen)) == runs_a_network, notes


def test_missing_libtpu_is_one_line(monkeypatch):
  import importlib.util  # pylint: disable=g-import-not-at-top

  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda n, *a: None if n == "libtpu" else real(n, *a)
  )
  with pytest.raises(runner.ConfigError, match=r"need libtpu: pip install -e \"\.\[tpu\]\""):
    aot.target_devices(aot.parse_topology("v5e-4"))


def test_cpu_runs_with_libtpu_installed_stay_on_cpu_and_quiet():
  """libtpu is installed for the tests above; an ordinary run must not probe for TPU chips
  or print libtpu's warnings (mim_jax/__init__.py)."""
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  code = "import mim_jax, jax; print(jax.devices()[0].platform)"
  r = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
  )
  assert r.returncode == 0 and r.stdout.strip() == "cpu", r.stderr[-2000:]
  assert "TPU" not in r.stderr and "libtpu" not in r.stderr, r.stderr[-2000:]
