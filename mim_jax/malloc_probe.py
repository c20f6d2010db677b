"""`python -m mim_jax.malloc_probe`: what malloc a mim_jax command line runs with on this
machine (mim_jax/host_memory.py), and the page faults per step it gives a jitted CPU step with
~0.5 GiB of temporaries. Prints one JSON line, e.g.

  {"state": "huge pages for malloc's mapped blocks (GLIBC_TUNABLES=glibc.malloc.hugetlb=1)",
   "faults_per_step": 1030, "steps": 9}

MIM_JAX_HUGE_PAGES=0 python -m mim_jax.malloc_probe shows the same step without huge pages
(~130,000 faults per step, 4 KiB each).
"""

import json
import resource

import jax
import jax.numpy as jnp

from mim_jax import host_memory


@jax.jit
def _step(x):
  # Eight (16384, 1024) fp32 temporaries (64 MiB each), far above glibc's mmap threshold.
  for _ in range(8):
    x = jnp.sin(x) @ jnp.eye(x.shape[1], dtype=x.dtype) + x[::-1]
  return jnp.sum(x)


def probe(steps: int = 9) -> dict:
  """Median page faults per step after three warm-up steps, and the malloc state."""
  x = jnp.ones((16384, 1024), jnp.float32)
  for _ in range(3):
    _step(x).block_until_ready()
  faults = []
  for _ in range(steps):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    _step(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  return {
    "state": host_memory.state(),
    "faults_per_step": sorted(faults)[len(faults) // 2],
    "steps": steps,
  }


if __name__ == "__main__":
  print(json.dumps(probe()))
