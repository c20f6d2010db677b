"""Reading PyTorch checkpoint files (official weights) on CPU; torch is imported only here.

`torch.load(weights_only=True)` first; training checkpoints that pickle other objects (DINO's
argparse Namespace, MoCo v3's optimizer) fall back to a full unpickle with a warning, which
is only safe for files the user trusts.
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Any


def load_file(path: str, *, what: str, convert_hint: str = "") -> Any:
  """torch.load(path) on CPU. `what` names the file in errors ("VQ-KD checkpoint");
  `convert_hint` says how to avoid torch (e.g. a conversion command)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} {path} does not exist")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      f"reading the {what} {path} needs torch (pip install torch)"
      + (f"; or {convert_hint}" if convert_hint else "")
    ) from e
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError):
    logging.warning(
      "%s holds non-tensor objects; loading it with weights_only=False "
      "(only do this for files you trust)",
      path,
    )
    return torch.load(path, map_location="cpu", weights_only=False)


def import_timm(what: str):
  """(torch, timm) for `what`; one line naming the missing package otherwise. Applies the
  torchvision operator shim first (mim_jax/testing/torch_compat.py: a CUDA torchvision
  next to the CPU torch breaks `import timm`)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"{what} needs torch and timm (pip install torch timm)") from e
  from mim_jax.testing import torch_compat  # pylint: disable=g-import-not-at-top

  torch_compat.install()
  try:
    import timm  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"{what} needs timm (pip install timm)") from e
  return torch, timm
