r"""Where a compiled step's matmul FLOPs go: every dot and convolution of the optimised HLO,
summed by the JAX op name that made it, beside mim_jax/flops.py's analytic count.

  python benchmarks/hlo_matmuls.py --config=configs/ccvit_vitb.py:variant=T/16 \
      --topology=v5e-1 --batch=32 --depth=4

XLA's `cost_analysis()` adds elementwise work to the matmuls and counts a loop body once, so
its total alone cannot tell a step that does extra matmul work from one with many norms and
softmaxes. The matmul sum can: for a step without loops it should equal the analytic count
(BENCHMARKS.md §10, "What the step computes that the method does not need"). The step is
compiled as `python -m mim_jax.aot` compiles it (compile-only TPU devices need libtpu); with
--topology=cpu it is compiled for this machine's devices.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_DEF = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]")
_OPERANDS = re.compile(r" (?:convolution|dot)\(%([\w.\-]+), %([\w.\-]+)\)")


def _dims(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def _prod(xs) -> int:
  out = 1
  for x in xs:
    out *= x
  return out


def _window(line: str) -> dict[str, list[str]]:
  """A convolution's window attributes: {'size': ['32'], 'pad': ['31_31'], ...}."""
  m = re.search(r"window=\{([^}]*)\}", line)
  return (
    {k: v.split("x") for k, _, v in (f.partition("=") for f in m.group(1).split())} if m else {}
  )


def _taps_on_input(in_size: int, out_size: int, window: int, pad_lo: int) -> int:
  """(output position, window tap) pairs of one spatial dimension, stride 1, whose tap falls
  on the input rather than on its zero padding."""
  return sum(1 for o in range(out_size) for t in range(window) if 0 <= o + t - pad_lo < in_size)


def _padded_window_flops(line: str, result, lhs, rhs, labels: list[str]) -> int | None:
  """FLOPs of a stride-1 convolution over a zero-padded window, counting only the taps on the
  input: the TPU compiler writes some batched products as a window as wide as the batch over
  a padded input of size 1 (e.g. `window={size=32 pad=31_31 rhs_reversal=1}`), where one
  tap in 32 is real. None for other windows."""
  w = _window(line)
  if "pad" not in w or any(k in w for k in ("stride", "lhs_dilate", "rhs_dilate")):
    return None
  lhs_labels, rhs_labels, out_labels = labels
  spatial = [c for c in out_labels if c.isdigit()]
  per_output_plane = _prod(result) // _prod(result[out_labels.index(c)] for c in spatial)
  taps = 1
  for c in spatial:
    lo = int(w["pad"][int(c)].split("_")[0])
    taps *= _taps_on_input(
      lhs[lhs_labels.index(c)], result[out_labels.index(c)], int(w["size"][int(c)]), lo
    )
  return 2 * per_output_plane * rhs[rhs_labels.index("i")] * taps


def matmul_flops(hlo: str) -> list[tuple[str, int]]:
  """(op_name, FLOPs) of every dot and convolution in an optimised HLO module's text, a
  multiply-add counted as 2. Operand shapes come from their definitions in the same
  computation; batch dimensions that the TPU compiler writes as a dilated window
  (lhs_dilate) contribute no contraction, and taps on a window's zero padding count
  nothing."""
  out, shapes = [], {}
  for line in hlo.splitlines():
    if line and not line.startswith(" "):  # a new computation: names are local to it
      shapes = {}
      continue
    d = _DEF.match(line)
    if not d:
      continue
    shapes[d.group(1)] = _dims(d.group(3))
    ops = _OPERANDS.search(line)
    if not ops:
      continue
    result, lhs, rhs = shapes[d.group(1)], shapes[ops.group(1)], shapes[ops.group(2)]
    name = re.search(r'op_name="([^"]*)"', line)
    name = name.group(1) if name else "?"
    if " dot(" in line:
      contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
      k = _prod(lhs[int(i)] for i in _dims(contracting.group(1))) if contracting else 1
      out.append((name, 2 * _prod(result) * k))
      continue
    labels = list(re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", line).groups())
    padded = _padded_window_flops(line, result, lhs, rhs, labels)
    if padded is not None:
      out.append((name, padded))
      continue
    if "lhs_dilate" in line:
      k = rhs[labels[1].index("i")]
    else:  # input features x kernel window, per output element
      k = _prod(rhs) // rhs[labels[1].index("o")]
    out.append((name, 2 * _prod(result) * k))
  return out


def by_prefix(ops: list[tuple[str, int]], depth: int) -> collections.Counter:
  totals = collections.Counter()
  for name, flops in ops:
    totals["/".join(name.split("/")[:depth])] += flops
  return totals


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True, help="configs/<file>.py[:args]")
  p.add_argument("--topology", default="v5e-1", help="a TPU slice name, or cpu")
  p.add_argument("--batch", type=int, default=0, help="config.batch_size (global)")
  p.add_argument("--set", action="append", default=[], help="config override key=value")
  p.add_argument("--depth", type=int, default=4, help="op-name components to group by")
  p.add_argument("--top", type=int, default=30)
  args = p.parse_args()

  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.FLAGS.mark_as_parsed()
  import jax  # pylint: disable=g-import-not-at-top

  from mim_jax import aot  # pylint: disable=g-import-not-at-top
  from mim_jax import config_lib  # pylint: disable=g-import-not-at-top
  from mim_jax import flops  # pylint: disable=g-import-not-at-top
  from mim_jax import train  # pylint: disable=g-import-not-at-top

  import bench_util  # pylint: disable=g-import-not-at-top

  path, _, arg = args.config.partition(":")
  c = config_lib.load_config(path, arg)
  with c.unlocked():
    if args.batch:
      c.batch_size = args.batch
    c.dtype = "bfloat16"
    bench_util.set_overrides(c, args.set)
    aot.use_standins(c)
  train.validate_config(c)
  if args.topology == "cpu":
    devices = jax.devices("cpu")
  else:
    devices = aot.target_devices(aot.parse_topology(args.topology))
  lowered, _, _ = aot.lower_step(c, devices)
  compiled = lowered.compile()
  ops = matmul_flops(compiled.as_text())
  per_image = len(devices) / c.batch_size / 1e9  # the HLO is one device's program
  xla = aot._flops_of(compiled)  # pylint: disable=protected-access
  analytic = flops.step_flops(c)
  print(f"{args.config} on {args.topology}, batch {c.batch_size}: GFLOP per image")
  print(f"  matmuls in the compiled HLO  {sum(f for _, f in ops) * per_image:10.3f}")
  print(f"  analytic (mim_jax/flops.py)  {analytic['total'] / c.batch_size / 1e9:10.3f}")
  if xla:
    print(f"  XLA cost_analysis (all ops)  {xla * per_image:10.3f}")
  for name, f in by_prefix(ops, args.depth).most_common(args.top):
    print(f"  {f * per_image:10.4f}  {name}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
