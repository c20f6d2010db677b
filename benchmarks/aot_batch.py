r"""Per-chip batch on one TPU chip, compiled without the chip: does batch B fit, and which is
the largest that does (with and without remat).

  python benchmarks/aot_batch.py --configs=ccvit_vitb,beitv2_vitb --batch=128 --remat=both
  python benchmarks/aot_batch.py --configs=ccvit_vitb,ccvit_vitl --search --remat=both

Every probe is one `python -m mim_jax.aot` process on --topology (v5e-1 by default: one 16 GiB
chip) with --config.batch_size set, bf16 compute (--set adds overrides). --search doubles the
batch from --start until the compiler refuses it, then bisects to a multiple of --step. The
table gives the total memory per chip of the largest batch that fits and the first that does
not, with the compiler's one-line shortfall.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

import bench_util  # (benchmarks/, first on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def probe(name: str, batch: int, remat: bool, args) -> tuple[bool, str]:
  """(fits, total GiB per chip or the shortfall line)."""
  out = os.path.join(tempfile.mkdtemp(), "r.json")
  cmd = [
    sys.executable,
    "-m",
    "mim_jax.aot",
    f"--config=configs/{name}.py",
    f"--topology={args.topology}",
    f"--out={out}",
    f"--config.batch_size={batch}",
    f"--config.model.remat={remat}",
    "--config.dtype=bfloat16",
    *[f"--config.{o}" for o in args.set],
  ]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if r.returncode == 0:
    with open(out) as f:
      report = json.load(f)
    total = report["memory_per_chip_gib"]["total"]
    print(f"{name} remat={remat} batch {batch}: fits, {total:.2f} GiB", file=sys.stderr)
    return True, f"{total:.2f}"
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  line = errors[-1] if errors else r.stderr[-300:]
  print(f"{name} remat={remat} batch {batch}: {line}", file=sys.stderr)
  if r.returncode != 1:
    raise SystemExit(f"{name}: {line}")
  return False, line.split(": ", 2)[-1]


def search(name: str, remat: bool, args):
  """(largest fitting batch, its GiB, smallest failing batch, its shortfall)."""
  good, good_info, bad, bad_info = 0, "", 0, ""
  batch = args.start
  while True:
    fits, info = probe(name, batch, remat, args)
    if not fits:
      bad, bad_info = batch, info
      break
    good, good_info = batch, info
    batch *= 2
  while bad - good > args.step:
    mid = (good + bad) // 2 // args.step * args.step
    if mid <= good:
      break
    fits, info = probe(name, mid, remat, args)
    if fits:
      good, good_info = mid, info
    else:
      bad, bad_info = mid, info
  return good, good_info, bad, bad_info


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs", default="ccvit_vitb")
  p.add_argument("--topology", default="v5e-1")
  p.add_argument("--batch", type=int, default=128, help="without --search: the batch to try")
  p.add_argument("--search", action="store_true")
  p.add_argument("--start", type=int, default=64)
  p.add_argument("--step", type=int, default=16)
  p.add_argument("--remat", default="both", choices=("on", "off", "both"))
  p.add_argument("--set", action="append", default=[])
  p.add_argument("--out", default="")
  args = p.parse_args()
  remats = {"on": [True], "off": [False], "both": [False, True]}[args.remat]
  cmd = " ".join(["python benchmarks/aot_batch.py", *sys.argv[1:]])
  lines = [
    f"### Per-chip batch on {args.topology}, compile-only ({datetime.date.today().isoformat()})",
    "",
    f"Command: `{cmd}`; machine: {platform.machine()}, {os.cpu_count()} CPU cores; bf16.",
    "",
  ]
  if args.search:
    lines += [
      "| config | remat | largest batch that fits | GiB per chip | first that does not | why |",
      "|---|---|---:|---:|---:|---|",
    ]
  else:
    lines += [
      f"| config | remat | batch {args.batch} | GiB per chip or shortfall |",
      "|---|---|---|---|",
    ]
  for name in args.configs.split(","):
    for remat in remats:
      if args.search:
        good, gi, bad, bi = search(name, remat, args)
        lines.append(f"| {name} | {remat} | {good} | {gi} | {bad} | {bi} |")
      else:
        fits, info = probe(name, args.batch, remat, args)
        lines.append(f"| {name} | {remat} | {'fits' if fits else 'does not fit'} | {info} |")
      print(lines[-1], flush=True)
  bench_util.emit(lines, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
