"""Helpers shared by the benchmark scripts (run as `python benchmarks/<name>.py`)."""

from __future__ import annotations

import os
import platform


def machine() -> str:
  """'N cores, <CPU model>, <platform>' for the Machine: line of a BENCHMARKS.md entry."""
  cpu = "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  try:
    cores = len(os.sched_getaffinity(0))  # what this process may use (nproc), not the host's
  except AttributeError:
    cores = os.cpu_count()
  return f"{cores} cores, {cpu}, {platform.platform()}"
