"""The persistent compilation cache, on by default: a restarted or resumed run loads its
compiled step instead of compiling it again (BENCHMARKS.md, "Compilation cache").

config.compilation_cache:
  'default'  $JAX_COMPILATION_CACHE_DIR when set, else $XDG_CACHE_HOME/mim_jax/jax
             (~/.cache/mim_jax/jax): one cache for every run of this user;
  'workdir'  DIR/jax_cache, beside the checkpoints (a cluster's shared filesystem);
  a path     that directory;
  ''         off.
JAX keys entries by the program, the compiler flags, the devices and the jax version, so a
changed config or machine compiles anew; only compilations that took more than
jax_persistent_cache_min_compile_time_secs (1 s by default) are kept.
"""

from __future__ import annotations

import contextlib
import os

from absl import logging
import jax


def cache_dir(config, workdir: str) -> str:
  spec = str(config.get("compilation_cache", "default") or "")
  if not spec:
    return ""
  if spec == "default":
    env = os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
    base = os.environ.get("XDG_CACHE_HOME", "") or os.path.join(os.path.expanduser("~"), ".cache")
    return env or os.path.join(base, "mim_jax", "jax")
  if spec == "workdir":
    return os.path.join(workdir, "jax_cache")
  return os.path.expanduser(spec)


def setup(config, workdir: str) -> str:
  """Points jax at the cache of config.compilation_cache (before anything is compiled)."""
  path = cache_dir(config, workdir)
  if not path:
    jax.config.update("jax_enable_compilation_cache", False)
    return ""
  if "://" not in path:
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      raise ValueError(
        f"config.compilation_cache: cannot create {path}: {e.strerror or e}; give a "
        "writable directory or '' (off)"
      ) from None
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  logging.info("compilation cache: %s", path)
  return path


@contextlib.contextmanager
def hits():
  """Counts the persistent-cache hits of the compilations inside the block: {'hits': n}.

  JAX reports a hit through jax.monitoring ('/jax/compilation_cache/cache_hits'); a count
  says whether a step was loaded, which its compile time on a busy machine cannot."""
  counter = {"hits": 0}

  def listen(event, **_):
    if event == "/jax/compilation_cache/cache_hits":
      counter["hits"] += 1

  jax.monitoring.register_event_listener(listen)
  try:
    yield counter
  finally:
    jax.monitoring.unregister_event_listener(listen)
