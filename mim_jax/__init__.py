"""mim_jax: masked-image-modeling pre-training of Vision Transformers in JAX/Flax."""

import importlib.util as _util
import os as _os
import sys as _sys
import types as _types

from mim_jax import host_memory as _host_memory

# jax's CUDA plugin stays loaded without a GPU when this is 1: `python -m mim_jax.aot` for a GPU
# target restarts with it (compile-only GPU devices need the plugin; nothing else does).
CUDA_PLUGIN_ENV = "MIM_JAX_CUDA_PLUGIN"
# What jax's hardware_utils.has_visible_nvidia_gpu looks at, read without importing jax.
_NVIDIA_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")


def _hide_absent_cuda_plugin() -> bool:
  """jax-cuda12-plugin is an optional extra for compile-only GPU targets (`gpu-aot`,
  docs/aot.md). Installed on a machine without an NVIDIA GPU, `import jax` loads three of its
  kernel libraries, each printing "Could not find cuda drivers" (absl, before any log setting
  applies), and the first device query logs a traceback from its failed CUDA check. Unless
  MIM_JAX_CUDA_PLUGIN=1, hide it from jax there, as if it were not installed. True when the
  plugin stays loaded without a GPU (a compile-only process)."""
  if _util.find_spec("jax_cuda12_plugin") is None or any(map(_os.path.exists, _NVIDIA_DEVICES)):
    return False
  if _os.environ.get(CUDA_PLUGIN_ENV) == "1":
    return True
  # None in sys.modules makes jaxlib's optional kernel imports find nothing, silently.
  _sys.modules.setdefault("jax_cuda12_plugin", None)
  # jax imports every module under jax_plugins and calls its initialize(); a missing one is
  # logged as a configuration error, so the PJRT plugin is replaced by one that does nothing.
  stub = _types.ModuleType("jax_plugins.xla_cuda12")
  stub.initialize = lambda: None
  stub.hidden_by_mim_jax = True  # mim_jax.aot asks
  _sys.modules.setdefault("jax_plugins.xla_cuda12", stub)
  return False


def _skip_absent_tpu(cuda_compile_only: bool) -> None:
  """libtpu is an optional extra for compile-only TPU targets (`python -m mim_jax.aot`,
  docs/aot.md). Installed on a machine without TPU chips, jax would try a TPU backend at the
  first device query and print libtpu's warnings; keep such a machine on its CPU, as it was
  without libtpu. The same for a CUDA plugin kept for compile-only GPU targets: on the CPU
  platform it skips its CUDA check. A TPU VM (chips on PCI), a GPU or an explicit
  JAX_PLATFORMS is left alone."""
  if "JAX_PLATFORMS" in _os.environ:
    return
  if _util.find_spec("libtpu") is None and not cuda_compile_only:
    return
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top

  chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
  if chips or hardware_utils.has_visible_nvidia_gpu():
    return
  import jax  # pylint: disable=g-import-not-at-top

  _os.environ["JAX_PLATFORMS"] = "cpu"  # child processes too
  jax.config.update("jax_platforms", "cpu")


# `python -m mim_jax.X` starts again with huge pages for malloc (mim_jax/host_memory.py): first,
# before jax is imported. Any other process returns from this at once.
_host_memory.restart_with_huge_pages()
_skip_absent_tpu(_hide_absent_cuda_plugin())


def __getattr__(name):
  """`mim_jax.load_encoder` (mim_jax/encoders.py), imported on first use so that
  `import mim_jax` stays light."""
  if name in ("load_encoder", "Encoder"):
    from mim_jax import encoders  # pylint: disable=g-import-not-at-top

    return getattr(encoders, name)
  raise AttributeError(f"module 'mim_jax' has no attribute {name!r}")
