"""Host memory of a CPU run: transparent huge pages for XLA:CPU's per-step temporaries.

XLA:CPU packs an executable's temporaries into one block that it allocates when the step runs
and frees when it ends (the CCViT ViT-T/16 step at batch 32: 2.18 GiB). glibc's malloc maps a
block that large from the kernel on every call and unmaps it on free, so every step faults its
working set in again, 4 KiB at a time: 620,000 page faults and 1.2 s of kernel time per step
on 2 cores. With glibc's tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35), malloc asks the
kernel for transparent huge pages on the blocks it maps (madvise MADV_HUGEPAGE; the kernel's
THP mode must be `madvise` or `always`). Nothing else in the allocator changes, so there is no
fragmentation and no extra resident memory across steps: the same step then takes 2,000-4,000
faults and 0.28 s of kernel time, and runs 20 % faster (BENCHMARKS.md §11, "The default
re-measured"). The cost: where another large process keeps fragmenting memory, the kernel
compacts it to find the ~1,000 huge pages each step maps (1.5-5 s of kernel time per step
in some rounds beside a PyTorch process, in that measurement), which can cost more than the
faults it saves.

glibc reads tunables only when a process starts. So `import mim_jax`, when the process is one
of this package's command lines (`python -m mim_jax.train`, `python -m mim_jax.evaluate`, ...),
starts the same command again, once, with the tunable added to GLIBC_TUNABLES (os.execve: the
same process id, arguments and open files), before jax is imported. A script that imports
mim_jax as a library gets the same by starting Python with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1. MIM_JAX_HUGE_PAGES=0 turns it off; a GLIBC_TUNABLES
that already sets a malloc tunable, or an allocator in LD_PRELOAD, is left as it is.
"""

from __future__ import annotations

import os
import sys

ENV = "MIM_JAX_HUGE_PAGES"
_RESTARTED = "MIM_JAX_HUGE_PAGES_RESTARTED"  # the pid that restarted: never twice (a loop guard)
TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")


def _glibc_version() -> tuple[int, int] | None:
  """glibc's (major, minor), or None for another C library."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else None
  except (AttributeError, OSError, ValueError):  # not Linux, or musl (no such name)
    return None


def _thp_mode() -> str:
  """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), '' if unknown."""
  try:
    with open(_THP_MODE, encoding="ascii") as f:
      modes = f.read().split()
  except OSError:
    return ""
  chosen = [m for m in modes if m.startswith("[")]
  return chosen[0].strip("[]") if chosen else ""


def huge_pages_env(environ=None) -> tuple[dict | None, str]:
  """(the environment to run with, why) when the process should add the tunable, else
  (None, why not)."""
  environ = os.environ if environ is None else environ
  tunables = environ.get("GLIBC_TUNABLES", "")
  if TUNABLE in tunables.split(":"):  # already on (a restarted process, or the user's setting)
    return None, f"huge pages for malloc's mapped blocks (GLIBC_TUNABLES={tunables})"
  if environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
    return None, f"malloc left as it is ({ENV}=0)"
  if "glibc.malloc." in tunables or any(a in environ.get("LD_PRELOAD", "") for a in _ALLOCATORS):
    return None, "malloc left as it is (the user's GLIBC_TUNABLES or LD_PRELOAD allocator)"
  version = _glibc_version()
  if version is None or version < (2, 35):
    return None, "malloc left as it is (no glibc >= 2.35: no glibc.malloc.hugetlb)"
  mode = _thp_mode()
  if mode not in ("madvise", "always"):
    return None, f"malloc left as it is (the kernel's transparent huge pages: {mode or 'none'})"
  env = dict(environ, GLIBC_TUNABLES=":".join(t for t in (tunables, TUNABLE) if t))
  return env, f"huge pages for malloc's mapped blocks (GLIBC_TUNABLES={env['GLIBC_TUNABLES']})"


def _command_line_module() -> str | None:
  """'mim_jax.X' when this process was started as `python [options] -m mim_jax.X ...`."""
  argv = list(getattr(sys, "orig_argv", ()))[1:]
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg == "--check-hash-based-pycs":
      i += 2
      continue
    if not arg.startswith("-") or arg in ("-", "--") or arg.startswith("--"):
      return None  # a script, stdin, or an option of no interest: not a module run
    for j, letter in enumerate(arg[1:], start=2):  # a cluster of short options, e.g. -um
      if letter in "cmWX":
        value = arg[j:] or (argv[i + 1] if i + 1 < len(argv) else "")
        i += 1 if arg[j:] else 2
        if letter == "c":
          return None
        if letter == "m":
          ours = value == "mim_jax" or value.startswith("mim_jax.")
          return value if ours else None
        break
    else:
      i += 1
  return None


def restart_with_huge_pages() -> None:
  """Starts this `python -m mim_jax.X` process again with the tunable set (see above); returns
  without doing anything for any other process, or when huge_pages_env says no."""
  if not sys.platform.startswith("linux") or not sys.executable:
    return
  if _command_line_module() is None or os.environ.get(_RESTARTED) == str(os.getpid()):
    return
  env, _ = huge_pages_env()
  if env is None:
    return
  env[_RESTARTED] = str(os.getpid())  # execve keeps the pid
  for stream in (sys.stdout, sys.stderr):
    if stream is not None:
      stream.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  except OSError as e:  # run on without huge pages rather than not at all
    print(f"mim_jax: could not restart with {TUNABLE} ({e}); running without", file=sys.stderr)


def state() -> str:
  """What this process runs with, for the run's log."""
  env, why = huge_pages_env()
  if env is None:
    return why
  return f"malloc on 4 KiB pages (start Python with GLIBC_TUNABLES={TUNABLE} for huge pages)"
