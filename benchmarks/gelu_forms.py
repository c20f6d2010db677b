"""Exact GELU on XLA:CPU: jax.nn.gelu's erfc form against the erf form mim_jax uses
(`mim_jax/models/vit.gelu`, the form PyTorch's CPU kernel evaluates), forward and gradient.

  python benchmarks/gelu_forms.py --rows=6304 --width=768 --repeats=15

One process, the forms alternating; prints the median time of each and their largest
difference.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mim_jax.models import vit  # noqa: E402


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", type=int, default=6304, help="tokens: 32 images x 197")
  p.add_argument("--width", type=int, default=768, help="the MLP's hidden width (ViT-T)")
  p.add_argument("--repeats", type=int, default=15)
  args = p.parse_args()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(args.rows, args.width)), jnp.float32)
  forms = {"erfc (jax.nn.gelu)": lambda v: jax.nn.gelu(v, approximate=False), "erf": vit.gelu}
  fns = {}
  for name, f in forms.items():
    fns[f"{name} forward"] = jax.jit(f)
    fns[f"{name} gradient"] = jax.jit(jax.grad(lambda v, f=f: jnp.sum(f(v) * 1.5)))
  diff = float(jnp.max(jnp.abs(forms["erf"](x) - forms["erfc (jax.nn.gelu)"](x))))
  times = {name: [] for name in fns}
  for f in fns.values():
    f(x).block_until_ready()
  for _ in range(args.repeats):
    for name, f in fns.items():
      t0 = time.perf_counter()
      f(x).block_until_ready()
      times[name].append(time.perf_counter() - t0)
  print(
    f"({args.rows}, {args.width}) float32, median of {args.repeats}; max |erf - erfc| {diff:.2g}"
  )
  for name, t in times.items():
    print(f"  {name:28s} {np.median(t) * 1e3:7.1f} ms")
  return 0


if __name__ == "__main__":
  sys.exit(main())
