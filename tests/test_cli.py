"""What a new user sees on the command line: every entry point's --help exits 0 listing its
flags and an example command, without importing TensorFlow; a config error is one line
without TensorFlow; TensorFlow, when clu's writer imports it, prints nothing.

Start-up times are measured by benchmarks/cli_startup.py (BENCHMARKS.md), not here: the
bound below only catches a regression to the old ~10 s imports on a loaded CI machine."""

import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = (
  "mim_jax.train",
  "mim_jax.evaluate",
  "mim_jax.aot",
  "mim_jax.export",
  "mim_jax.plot",
  "mim_jax.tokenize",
  "mim_jax.tokenizer_report",
  "mim_jax.tokenizers.kclip",
  "mim_jax.tokenizers.build_centroids",
  "mim_jax.teachers.clip",  # mim_jax/teachers/clip_convert.py's command
  "mim_jax.teachers.perceptual",
  "mim_jax.evaluation.backbones",
)
TF_NOISE = ("oneDNN", "cpu_feature_guard", "TensorFlow binary", "absl::InitializeLog")


def _clean_env():
  env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_", "XLA_FLAGS"))}
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _run(args, importtime=True):
  cmd = [sys.executable] + (["-X", "importtime"] if importtime else []) + args
  t0 = time.perf_counter()
  r = subprocess.run(cmd, cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=120)
  return r, time.perf_counter() - t0


def _imported(stderr: str, package: str) -> bool:
  return any(line.rstrip().endswith(f"| {package}") for line in stderr.splitlines())


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_lists_flags_and_an_example_without_tensorflow(module):
  r, seconds = _run(["-m", module, "--help"])
  assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
  out = r.stdout
  examples = [
    line
    for line in out.splitlines()
    if f"python -m {module} " in line and "usage:" not in line and "[-h]" not in line
  ]
  assert examples, f"no example command in:\n{out[:2000]}"
  flag_lines = [line for line in out.splitlines() if line.lstrip().startswith("--")]
  assert flag_lines, out
  assert not _imported(r.stderr, "tensorflow"), "--help imported TensorFlow"
  noise = [
    line
    for line in (out + r.stderr).splitlines()
    if any(w in line for w in TF_NOISE) and not line.startswith("import time:")
  ]
  assert not noise, noise
  assert seconds < 15, f"{module} --help took {seconds:.1f} s"


def test_a_config_error_is_one_line_without_tensorflow(tmp_path):
  r, _ = _run(
    [
      "-m",
      "mim_jax.train",
      "--config=configs/ccvit_demo.py",
      "--config.no_such_field=1",
      f"--workdir={tmp_path}",
    ]
  )
  assert r.returncode == 2
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "no_such_field" in errors[0], r.stderr[-2000:]
  assert not _imported(r.stderr, "tensorflow")


def test_tensorflow_start_up_lines_are_silenced_where_it_is_imported():
  """clu's TensorBoard writer imports TensorFlow, whose C++ start-up notices (oneDNN, CPU
  feature guard) would land on the user's console without mim_jax.cli.quiet_tensorflow."""
  code = "from mim_jax import metrics; metrics._import_writers(); print('imported')"
  r, _ = _run(["-c", code], importtime=False)
  assert r.returncode == 0 and "imported" in r.stdout, r.stderr[-2000:]
  noise = [line for line in r.stderr.splitlines() if any(w in line for w in TF_NOISE)]
  assert not noise, noise
