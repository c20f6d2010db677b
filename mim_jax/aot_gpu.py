"""GPU targets of `python -m mim_jax.aot` (docs/aot.md): compile-only NVIDIA GPUs from jax's
CUDA plugin, with no GPU and no NVIDIA library (`pip install -e ".[gpu-aot]"`).

The plugin's topology API takes a GpuTargetConfigProto, the device as XLA:GPU sees it (compute
capability, SMs, shared memory, L2, clock, memory size and bandwidth), and a topology of
slices x hosts x GPUs per host. The descriptions are mim_jax/gpu_targets/<gpu>.txtpb, copied
from XLA's xla/backends/gpu/target_config/specs/ without its per-unit throughput tables and
driver strings (the compiler accepts them without). Their device memory is the report's HBM.
"""

from __future__ import annotations

import functools
from importlib import metadata
import os
import re
import sys

import mim_jax
from mim_jax import runner

GIB = 1024**3
GPUS = {
  "a100": "a100_sxm_80.txtpb",  # A100 80 GB SXM4
  "h100": "h100_sxm.txtpb",  # H100 80 GB SXM5
  "h200": "h200_sxm.txtpb",  # H200 141 GB SXM
}
GPUS_PER_HOST = 8  # an HGX board; larger targets are several such hosts
_TARGETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_targets")


@functools.cache
def target_config(gpu: str) -> str:
  """The GpuTargetConfigProto text of `gpu` (what the compiler is told the device is)."""
  with open(os.path.join(_TARGETS, GPUS[gpu]), encoding="utf-8") as f:
    return f.read()


def memory_gib(gpu: str) -> float:
  """Device memory as CUDA reports it, from the file the compiler reads, in GiB (2**30 B): H100
  84,942,979,072 B = 79.1 GiB, H200 151,397,597,184 B = 141.0 GiB. The 80 GB and 141 GB of
  the product names are round figures, not SI gigabytes."""
  return int(re.search(r"device_memory_size: (\d+)", target_config(gpu)).group(1)) / GIB


def hosts(name: str, gpu: str, n: int, num_slices: int) -> tuple[int, int, int]:
  """(1, hosts, GPUs per host) of `<gpu>-<n>`: 1 to 8 GPUs on one host, or hosts of 8."""
  if n < 1 or (n > GPUS_PER_HOST and n % GPUS_PER_HOST):
    raise runner.ConfigError(
      f"--topology={name}: {gpu} targets are 1 to {GPUS_PER_HOST} GPUs on one host or hosts "
      f"of {GPUS_PER_HOST} ({gpu}-16, {gpu}-32, ...)"
    )
  if num_slices != 1:
    raise runner.ConfigError(
      f"--num_slices={num_slices}: GPU targets have no slices; name the GPUs in all "
      f"({gpu}-{GPUS_PER_HOST * num_slices} is {num_slices} hosts of {GPUS_PER_HOST})"
    )
  per_host = min(n, GPUS_PER_HOST)
  return (1, n // per_host, per_host)


def plugin_installed() -> bool:
  """Both wheels of the `gpu-aot` extra, whether or not mim_jax hid them from jax here."""
  try:
    return all(metadata.version(d) for d in ("jax-cuda12-plugin", "jax-cuda12-pjrt"))
  except metadata.PackageNotFoundError:
    return False


def plugin_hidden() -> bool:
  """True where `import mim_jax` hid the installed plugin (no GPU; mim_jax/__init__.py)."""
  return getattr(sys.modules.get("jax_plugins.xla_cuda12"), "hidden_by_mim_jax", False)


def devices(name: str, gpu: str, shape: tuple[int, ...]) -> list:
  """Compile-only GPUs from jax's CUDA plugin, told the device by its target description."""
  if not plugin_installed():
    raise runner.ConfigError(
      f"--topology={name}: GPU targets need jax's CUDA plugin: pip install -e \".[gpu-aot]\" "
      "(an optional extra, ~180 MB, no NVIDIA libraries; see docs/aot.md)"
    )
  if plugin_hidden():
    raise runner.ConfigError(
      f"--topology={name}: jax's CUDA plugin is hidden in this process (no GPU); set "
      f"{mim_jax.CUDA_PLUGIN_ENV}=1 before importing mim_jax (python -m mim_jax.aot does)"
    )
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  try:
    topo = topologies.get_topology_desc(
      topology_name="",
      platform="cuda",
      target_config=target_config(gpu),
      topology="x".join(map(str, shape)),  # slices x hosts x GPUs per host
    )
  except NotImplementedError as e:  # the plugin did not register: its CUDA check failed
    raise runner.ConfigError(
      f"--topology={name}: jax's CUDA plugin is not loaded ({e}); without a GPU, run with "
      "JAX_PLATFORMS=cpu or unset"
    ) from None
  return list(topo.devices)


def restart_with_plugin(topology: str) -> None:
  """A GPU target where `import mim_jax` hid jax's CUDA plugin (no GPU here): the plugin must
  be there before jax starts, so the command starts again with it kept (os.execve: the same
  pid and arguments). Any other process returns at once."""
  if (topology or "").split("-")[0] not in GPUS or not plugin_hidden():
    return
  if os.environ.get(mim_jax.CUDA_PLUGIN_ENV) == "1":
    return  # restarted once already: never loop; devices() says what is wrong
  for stream in (sys.stdout, sys.stderr):
    stream.flush()
  env = dict(os.environ, **{mim_jax.CUDA_PLUGIN_ENV: "1"})
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
