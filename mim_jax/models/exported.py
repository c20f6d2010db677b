"""Reading the folders `python -m mim_jax.export` writes (docs/export.md).

  timm folder   model.safetensors (timm names) + config.json (`architecture`, `model_args`,
                `pretrained_cfg`, and a `mim_jax` record: method, step, source, image size)
  full folder   params.safetensors (every trained tensor under its mim_jax path, '/'-joined,
                'params/...' and 'extra/...') + manifest.json (format, method, step, the
                pre-training config, every tensor's shape and dtype)

Both are checked against what they declare before anything is built: a missing, renamed,
extra or reshaped tensor is one line naming the folder and the tensor, never a partial load.
"""

from __future__ import annotations

import json
import os
import types

import numpy as np

TIMM_WEIGHTS = "model.safetensors"
TIMM_CONFIG = "config.json"
FULL_WEIGHTS = "params.safetensors"
FULL_MANIFEST = "manifest.json"
FULL_FORMAT = "mim_jax.full/1"


class ExportError(ValueError):
  """An export folder that does not hold what it declares (or an export that failed its
  own check)."""


def kind(path: str) -> str | None:
  """'full', 'timm' or None (not an export folder, e.g. a workdir)."""
  if not os.path.isdir(path):
    return None
  if os.path.isfile(os.path.join(path, FULL_MANIFEST)):
    return "full"
  if os.path.isfile(os.path.join(path, TIMM_WEIGHTS)):
    return "timm"
  return None


def _read_json(path: str, what: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise ExportError(f"{path}: missing ({what})") from None
  except (OSError, json.JSONDecodeError) as e:
    raise ExportError(f"{path}: unreadable {what} ({type(e).__name__}: {e})") from None


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top

  try:
    return st_numpy.load_file(path)
  except FileNotFoundError:
    raise ExportError(f"{path}: missing") from None
  except (SafetensorError, OSError, ValueError) as e:
    raise ExportError(f"{path}: not a readable safetensors file ({e})") from None


def unflatten(flat: dict[str, np.ndarray]) -> dict:
  tree: dict = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    name = f"{prefix}/{k}" if prefix else str(k)
    out.update(flatten(v, name) if isinstance(v, dict) else {name: np.asarray(v)})
  return out


def read_timm(path: str) -> tuple[dict[str, np.ndarray], dict]:
  """(timm state dict, config.json) of a timm export, checked against each other."""
  from mim_jax.models import timm_layout  # pylint: disable=g-import-not-at-top

  cfg = _read_json(os.path.join(path, TIMM_CONFIG), "the export's config.json")
  if "architecture" not in cfg or "model_args" not in cfg:
    raise ExportError(f"{path}/{TIMM_CONFIG}: has no 'architecture' / 'model_args'")
  tensors = read_safetensors(os.path.join(path, TIMM_WEIGHTS))
  args = cfg["model_args"]
  spec = types.SimpleNamespace(**timm_layout.spec_fields_from_model_args(cfg["architecture"], args))
  expected = timm_layout.expected_shapes(
    spec, int(args["img_size"]), qkv_bias=bool(args.get("qkv_bias", True))
  )
  problem = timm_layout.contract_mismatch(tensors, expected)
  if problem:
    raise ExportError(f"{path}/{TIMM_WEIGHTS} does not match its {TIMM_CONFIG}: {problem}")
  return tensors, cfg


def read_full(path: str) -> tuple[dict, dict]:
  """({'params': ..., 'extra': ...} as nested numpy, manifest) of a full export, checked
  tensor by tensor against the manifest."""
  manifest = _read_json(os.path.join(path, FULL_MANIFEST), "the export's manifest")
  if manifest.get("format") != FULL_FORMAT:
    raise ExportError(
      f"{path}/{FULL_MANIFEST}: format {manifest.get('format')!r}, expected {FULL_FORMAT!r}"
    )
  flat = read_safetensors(os.path.join(path, FULL_WEIGHTS))
  declared = {k: (tuple(v["shape"]), v["dtype"]) for k, v in manifest.get("tensors", {}).items()}
  missing = sorted(set(declared) - set(flat))
  extra = sorted(set(flat) - set(declared))
  if missing or extra:
    raise ExportError(
      f"{path}/{FULL_WEIGHTS} does not match its manifest: "
      f"{len(missing)} missing ({', '.join(missing[:3])}), "
      f"{len(extra)} unexpected ({', '.join(extra[:3])})"
    )
  for name, (shape, dtype) in declared.items():
    if tuple(flat[name].shape) != shape or str(flat[name].dtype) != dtype:
      raise ExportError(
        f"{path}/{FULL_WEIGHTS}: {name} is {flat[name].dtype}{list(flat[name].shape)}, "
        f"the manifest says {dtype}{list(shape)}"
      )
  tree = unflatten(flat)
  return {"params": tree.get("params", {}), "extra": tree.get("extra", {})}, manifest
