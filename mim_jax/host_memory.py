"""Host memory of a CPU run, opt-in (MIM_JAX_KEEP_FREED_MEMORY=1): freed memory stays in the
process for the next step.

XLA:CPU allocates an executable's temporary buffers when it runs and frees them when it is done.
glibc's malloc serves a block over 32 MiB, and any block of a worker thread's arena whose heap
empties, with fresh pages from the kernel and gives them back on free. So every step faults its
whole working set in again, page by page: the CCViT ViT-T/16 step at batch 32 took 630,000 page
faults and 1.2 s of kernel time per step; avoiding them made that step about 10 % faster on
2 cores (BENCHMARKS.md §11).

`keep_freed_memory()` sets three malloc options (mallopt(3)) so that later steps reuse earlier
steps' memory: one arena for every thread (M_ARENA_MAX), no mmap for large blocks
(M_MMAP_MAX), and no trimming of the heap's top (M_TRIM_THRESHOLD). It is opt-in because of
what it costs: the process keeps its peak memory, and fragmentation grows the heap whenever a
step's temporaries no longer fit in the freed space. A toy step with ~0.5 GiB of temporaries
grew from 0.8 to 3.3 GiB resident over 15 steps (tests/test_host_memory.py's step), the CCViT
T/16 step from 3.0 to 5.1 GiB in some runs. The options only reach threads that have not
allocated yet, so `mim_jax/__init__.py` applies them at import, before jax starts its CPU
client, when MIM_JAX_KEEP_FREED_MEMORY=1 and the process will compute on the CPU (Linux, glibc).
Other ways to fewer faults, set before Python starts (then this module leaves malloc alone):
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (transparent huge pages: 512x fewer faults), or a caching
malloc such as tcmalloc or jemalloc in LD_PRELOAD.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV = "MIM_JAX_KEEP_FREED_MEMORY"

# glibc's malloc.h parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# What keep_freed_memory() did, for the run's log ("" until it is called).
STATE = ""


def _glibc():
  """glibc as a ctypes library, or None (another libc, or not Linux)."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    libc.gnu_get_libc_version()
  except (OSError, AttributeError):  # musl and others have no gnu_get_libc_version
    return None
  return libc


def keep_freed_memory() -> bool:
  """Sets the malloc options above; True when they took effect. Idempotent."""
  global STATE
  if os.environ.get(ENV, "0").strip().lower() not in ("1", "true", "yes", "on"):
    STATE = f"malloc left as it is ({ENV}=1 keeps freed memory)"
    return False
  preload = os.environ.get("LD_PRELOAD", "")
  if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(
    name in preload for name in ("tcmalloc", "jemalloc", "mimalloc")
  ):
    STATE = "malloc left as it is (the user's GLIBC_TUNABLES or LD_PRELOAD allocator)"
    return False
  libc = _glibc()
  if libc is None:
    STATE = "malloc left as it is (not glibc)"
    return False
  # mallopt returns 1 on success. Trim threshold -1: never give the heap's top back.
  done = [
    libc.mallopt(p, v) for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
  ]
  ok = all(done)
  STATE = (
    "malloc keeps freed memory (one arena, no mmap, no trim: mim_jax/host_memory.py)"
    if ok
    else f"malloc options not all set (mallopt returned {done})"
  )
  return ok
