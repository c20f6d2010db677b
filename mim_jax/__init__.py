"""mim_jax: masked-image-modeling pre-training of Vision Transformers in JAX/Flax."""

import importlib.util as _util
import os as _os

from mim_jax import host_memory as _host_memory


def _skip_absent_tpu() -> None:
  """libtpu is an optional extra for compile-only TPU targets (`python -m mim_jax.aot`,
  docs/aot.md). Installed on a machine without TPU chips, jax would try a TPU backend at the
  first device query and print libtpu's warnings; keep such a machine on its CPU, as it was
  without libtpu. A TPU VM (chips on PCI), a GPU plugin or an explicit JAX_PLATFORMS is left
  alone."""
  if "JAX_PLATFORMS" in _os.environ or _util.find_spec("libtpu") is None:
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
_skip_absent_tpu()


def __getattr__(name):
  """`mim_jax.load_encoder` (mim_jax/encoders.py), imported on first use so that
  `import mim_jax` stays light."""
  if name in ("load_encoder", "Encoder"):
    from mim_jax import encoders  # pylint: disable=g-import-not-at-top

    return getattr(encoders, name)
  raise AttributeError(f"module 'mim_jax' has no attribute {name!r}")
