"""Helpers of the trainer tests: a seconds-long CPU run of configs/ccvit_vitb.py as the
command users type, and readers of what it leaves in the workdir. Not a test module."""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "ccvit_vitb.py")


def smooth_images(n, size, seed):
  """Real-looking (spatially smooth) random images: upsampled low-res noise."""
  rng = np.random.default_rng(seed)
  low = rng.integers(0, 256, size=(n, size // 4, size // 4, 3)).astype(np.float32)
  img = np.repeat(np.repeat(low, 4, axis=1), 4, axis=2)
  img += rng.normal(0, 12, size=img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


def tiny_flags(npz, **over):
  """Command-line overrides that make ccvit_vitb.py a seconds-long CPU run."""
  f = {
    "data.source": "npz",
    "data.path": npz,
    "data.image_size": 16,
    "data.second_image_size": 16,
    "data.worker_count": 0,
    "model.variant": "T/4",
    "model.width": 32,
    "model.depth": 2,
    "model.heads": 2,
    "method.num_masked": 6,
    "method.num_replaced": 2,
    "method.min_block": 2,
    "method.early_layers": 1,
    "tokenizer.k": 16,
    "tokenizer.build_if_missing": True,
    "tokenizer.iters": 2,
    "tokenizer.images_per_class": 8,
    "batch_size": 8,
    "total_steps": 12,
    "log_every": 1,
    "checkpoint_every": 4,
    "optim.warmup_steps": 2,
    "optim.lr": 1e-3,
    "vis_every": 0,
    # metrics.jsonl only: no TensorFlow import per run (test_train checks the events files)
    "tensorboard": False,
  }
  f.update(over)
  return [f"--config.{k}={v}" for k, v in f.items()]


# One compilation cache for the single-process trainer runs of a test session: most runs
# compile the same tiny step, so only the first pays for it (a restart skipping compilation
# is also what users get). Multi-process CPU runs do not use it (tests/multihost_util.py).
JIT_CACHE = tempfile.mkdtemp(prefix="mim_jax_test_jit_")
# Cheaper XLA:CPU compilation; runs compared with each other use the same flags.
QUICK_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def train_env(devices=1):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {QUICK_COMPILE}"
  env["JAX_COMPILATION_CACHE_DIR"] = JIT_CACHE
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  return env


def train_cmd(workdir, flags, config=CONFIG):
  return [
    sys.executable,
    "-m",
    "mim_jax.train",
    f"--config={config}",
    f"--workdir={workdir}",
  ] + flags


def run_train(workdir, flags, devices=1, timeout=300, config=CONFIG):
  return subprocess.run(
    train_cmd(workdir, flags, config),
    env=train_env(devices),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def logged_rows(workdir):
  """step -> the last logged record of that step (a resumed run re-logs some steps)."""
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      rows[r["step"]] = r
  return rows


def checkpoint_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def assert_one_line_error(result, *needles):
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, result.stderr[-2000:]
  for n in needles:
    assert n in errors[0], errors[0]
  assert "Traceback" not in result.stderr
  assert "Compiling" not in result.stderr


def guarded_step(trainer, sample, state_sh, frozen_sh):
  """The runner's own jitted step (non-finite guard, bad-example count) around a trainer's
  step, and a fresh state for it: step(state, frozen, batch) with batch['_bad'] set."""
  import types  # pylint: disable=g-import-not-at-top

  from mim_jax import runner  # pylint: disable=g-import-not-at-top

  job = types.SimpleNamespace(
    step=trainer.step_fn(),
    split_step=trainer.split_step(),
    mesh=trainer.mesh,
    rules=trainer.rules,
    state_sh=state_sh,
    frozen_sh=frozen_sh,
    init_state=lambda: trainer.init_state(sample, state_sh),
  )
  compile_step, guarded_sh = runner._guarded_step(job)  # pylint: disable=protected-access
  state = runner._fresh_state(job, guarded_sh)  # pylint: disable=protected-access
  return compile_step, state
