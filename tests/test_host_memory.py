"""mim_jax/host_memory.py: with MIM_JAX_KEEP_FREED_MEMORY=1, a CPU process that imports mim_jax
reuses freed memory across steps."""

import json
import os
import subprocess
import sys

import pytest

# A jitted step whose temporaries (~8 x 64 MiB) are far above glibc's mmap threshold, run as a
# user's process runs it: mim_jax imported before the first computation.
_CHILD = r"""
import json, resource, sys
import mim_jax
import jax, jax.numpy as jnp
from mim_jax import host_memory

@jax.jit
def step(x):
  for _ in range(8):
    x = jnp.sin(x) @ jnp.eye(x.shape[1], dtype=x.dtype) + x[::-1]
  return jnp.sum(x)

x = jnp.ones((16384, 1024), jnp.float32)
for _ in range(3):
  step(x).block_until_ready()
faults = []
for _ in range(9):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The median: with the options a step faults only when fragmentation grows the heap.
print(json.dumps({"faults_per_step": sorted(faults)[4], "state": host_memory.STATE}))
"""


def _run(keep: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", MIM_JAX_KEEP_FREED_MEMORY=keep)
  out = subprocess.run(
    [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc options: Linux")
def test_steps_after_the_first_do_not_fault_their_memory_in_again():
  kept, default = _run("1"), _run("0")
  assert kept["state"].startswith("malloc keeps freed memory"), kept
  assert default["state"].startswith("malloc left as it is"), default
  # glibc's defaults: every step maps its temporaries afresh (64 MiB = 16,384 pages each).
  assert default["faults_per_step"] > 16_384, default
  assert kept["faults_per_step"] < 0.05 * default["faults_per_step"], (kept, default)
