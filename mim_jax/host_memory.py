"""Host memory of a CPU run: freed memory stays in the process for the next step.

XLA:CPU allocates an executable's temporary buffers when it runs and frees them when it is done.
glibc's malloc serves a block over 32 MiB, and any block of a worker thread's arena whose heap
empties, with fresh pages from the kernel and gives them back on free. So every step faults its
whole working set in again, page by page: the CCViT ViT-T/16 step at batch 32 took 630,000 page
faults and 1.2 s of kernel time per step, about 15 % of its wall time on 2 cores
(BENCHMARKS.md §11). Eager PyTorch, whose tensors are mostly smaller, mostly reuses memory.

`keep_freed_memory()` sets three malloc options (mallopt(3)) so that the second and later steps
reuse the first step's memory: one arena for every thread (M_ARENA_MAX), no mmap for large
blocks (M_MMAP_MAX), and no trimming of the heap's top (M_TRIM_THRESHOLD). The process then
keeps its peak memory until it exits, as a caching allocator does on an accelerator, and
fragmentation can grow the heap past it once: that T/16 step's resident memory was 3.1 GiB on
glibc's defaults, and 3.0 or, in some runs, 5.1 GiB with these options. The
options only reach threads that have not allocated yet, so this runs when `mim_jax` is imported,
before jax starts its CPU client. Only on Linux with glibc, only when the process will compute
on the CPU, and not when MIM_JAX_KEEP_FREED_MEMORY=0. Other ways to the same end, for a user
who sets them before Python starts (then this module leaves malloc alone):
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
  if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
    STATE = f"malloc left as it is ({ENV}=0)"
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
