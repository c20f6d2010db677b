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


def set_overrides(config, items) -> None:
  """Applies 'a.b=value' strings to an unlocked ConfigDict; a value is a Python literal
  (8, 1e-3, True, 'x') or else the string as given."""
  import ast  # pylint: disable=g-import-not-at-top

  for item in items:
    key, _, value = item.partition("=")
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    try:
      node[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[leaf] = value


def emit(lines: list[str], out: str = "") -> None:
  """Prints a markdown table's lines and, with `out`, writes them there too."""
  text = "\n".join(lines) + "\n"
  if out:
    with open(out, "w") as f:
      f.write(text)
  print(text)
