"""Device mesh, logical-axis sharding rules, and global batches from per-process data."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """Builds the ('data', 'fsdp') mesh; one axis may be -1 (all remaining devices)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
  unknown = set(mesh_cfg) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.mesh: unknown axes {sorted(unknown)}; known: {MESH_AXES}")
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError("config.mesh: at most one axis may be -1")
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ValueError(f"config.mesh: sizes must be positive or -1, got {dict(sizes)}")
  if free:
    if len(devices) % fixed:
      raise ValueError(f"config.mesh: {len(devices)} devices are not divisible by {fixed}")
    sizes[free[0]] = len(devices) // fixed
  total = int(np.prod(list(sizes.values())))
  if total != len(devices):
    raise ValueError(
      f"config.mesh: {dict(sizes)} needs {total} devices, but {len(devices)} are available"
    )
  grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
  # Auto axes: jit + logical sharding constraints (Explicit axes reject them).
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def rules_tuple(rules) -> tuple:
  """Config rules (tuples or lists, from a ConfigDict) as flax logical axis rules."""
  out = []
  for name, axes in rules:
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
    out.append((str(name), axes))
  return tuple(out)


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of (possibly) nn.LogicallyPartitioned abstract values."""
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, rules_tuple(rules))


def check_divisible(abstract: Any, shardings: Any) -> None:
  """Fails with the parameter's name when a sharded axis does not divide evenly."""
  flat_a = jax.tree_util.tree_flatten_with_path(abstract)[0]
  flat_s = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, leaf), sharding in zip(flat_a, flat_s):
    spec = sharding.spec
    for dim, axes in zip(leaf.shape, spec):
      if axes is None:
        continue
      n = int(
        np.prod([sharding.mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))])
      )
      if dim % n:
        name = jax.tree_util.keystr(path)
        raise ValueError(
          f"parameter {name} of shape {leaf.shape} cannot be split {n} ways "
          f"along {axes} (config.mesh / config.sharding_rules)"
        )


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """Assembles the global batch from this process's rows (multi-host safe)."""
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
  }
