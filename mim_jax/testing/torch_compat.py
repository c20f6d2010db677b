"""Makes timm / open_clip importable next to the CPU build of torch.

torchvision 0.28.0 from the package index is a CUDA build: against the CPU torch
its C++ operators do not load and `import torchvision` fails with
"operator torchvision::nms does not exist", which breaks timm and open_clip.
Declaring the two missing operator schemas before the first import is enough for
the model code we compare against (torchvision's own C++ ops stay unusable).
Tests, benchmarks and the check of `python -m mim_jax.export` import this module.
"""

_LIB = None


def install():
  """Defines the missing torchvision operator schemas (idempotent)."""
  global _LIB
  if _LIB is not None:
    return
  import torch  # pylint: disable=g-import-not-at-top

  if torch.version.cuda:  # a CUDA torch loads torchvision's operators itself; defining them
    _LIB = True  # first would abort torchvision's import (a duplicate registration)
    return
  try:
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
      lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  except RuntimeError:
    # Already defined (a working torchvision, or a second call).
    lib = None
  _LIB = lib or True
