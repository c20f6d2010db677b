r"""Memory and FLOPs of every paper config on a TPU slice, compiled without the slice.

  python benchmarks/aot_table.py --topology=v5e-256 --set=dtype=bfloat16 \
      --reports_dir=/tmp/aot_reports --out=/tmp/aot_table.md

Runs `python -m mim_jax.aot` once per config (one process each, one at a time: the TPU
compiler of a ViT-L step takes minutes and GiBs on the compiling machine), keeps each JSON
report in --reports_dir (an existing report is reused with --reuse, so an interrupted table
resumes), and prints a markdown table: memory per chip (arguments, temp, total) against the
chip's HBM, FLOPs per image from XLA and from mim_jax/flops.py (its frozen teacher /
tokenizer part apart), and compile time. A config that does not fit gets its one-line
shortfall in the table. Configs whose paper batch the slice cannot split (PeCo's VQ-VAE at
128) go to --small_topology.

  python benchmarks/aot_table.py --paper_slices --set=dtype=bfloat16 \
      --reports_dir=/tmp/aot_paper_slices --out=/tmp/aot_paper_slices.md

compiles each config instead for a v5e slice with as many chips as its paper's run had GPUs
(PAPER_GPUS: the number and where it is stated), so the per-chip batch is the paper's per-GPU
batch times its gradient accumulation (mim_jax takes the whole batch in one step). A config
that does not fit is compiled again with model.remat=True; the table says which was needed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from mim_jax.aot import PAPER_CONFIGS  # noqa: E402  (ROOT is on sys.path now)

import bench_util  # noqa: E402  (benchmarks/, first on sys.path)

# GPUs of each paper's pre-training run: (count, where it is stated). The papers of BEiT v2,
# PeCo and CAE v2 give no count; their official scripts do where they exist.
PAPER_GPUS = {
  "beitv2_vitb": (16, "beit2/PRETRAINING.md: 16 x 128"),
  "beitv2_vitl": (16, "beit2/PRETRAINING.md: 16 x 128"),
  "peco_vitb": (16, "not stated; BEiT's 16 x 128 at the same batch"),
  "peco_vitl": (16, "not stated; BEiT's 16 x 128 at the same batch"),
  "peco_mae_vitb": (32, "not stated; 128 per GPU at batch 4096"),
  "mapet_vitt": (16, "MaPeT paper, computational requirements"),
  "mapet_vits": (32, "MaPeT paper, computational requirements"),
  "mapet_vitb": (64, "MaPeT paper, computational requirements"),
  "ccvit_vitb": (4, "CCViT paper §5.1: 4 RTX 3090, accumulation 4"),
  "ccvit_vitl": (4, "CCViT paper §5.1: 4 RTX 3090"),
  "caev2_vitt": (8, "CAE caev2_tiny_300e.sh: 8 x 256"),
  "caev2_vits": (8, "CAE caev2_small_300e.sh: 8 x 256"),
  "caev2_vitb": (8, "CAE caev2_base_300e.sh: 8 x 256"),
  "caev2_vitl": (8, "no script; as the base: 8 x 256"),
  "vqkd_vitb": (8, "beit2/TOKENIZER.md: 8 x 64"),
  "peco_vqvae": (8, "not stated; 8 x 16 assumed"),
}


def run_one(
  name: str, topology: str, overrides: list[str], reports_dir: str, reuse: bool, tag: str = ""
):
  path = os.path.join(reports_dir, f"{name}{tag}.json")
  err_path = os.path.join(reports_dir, f"{name}{tag}.err")
  if reuse and (os.path.exists(path) or os.path.exists(err_path)):
    pass
  else:
    cmd = [
      sys.executable,
      "-m",
      "mim_jax.aot",
      f"--config=configs/{name}.py",
      f"--topology={topology}",
      f"--out={path}",
      *[f"--config.{o}" for o in overrides],
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
      errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
      with open(err_path, "w") as f:
        f.write(errors[-1] if errors else r.stderr[-500:])
    print(f"{name}: exit {r.returncode}", file=sys.stderr, flush=True)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f), None
  with open(err_path) as f:
    return None, f.read().strip()


def analytic_count(name: str, overrides: list[str]) -> dict:
  """mim_jax/flops.py's count per image as it is now (reused reports may predate it)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.FLAGS.mark_as_parsed()
  from mim_jax import aot  # pylint: disable=g-import-not-at-top
  from mim_jax import config_lib  # pylint: disable=g-import-not-at-top
  from mim_jax import flops  # pylint: disable=g-import-not-at-top

  c = config_lib.load_config(os.path.join(ROOT, "configs", f"{name}.py"))
  with c.unlocked():
    bench_util.set_overrides(c, overrides)
    aot.use_standins(c)
  return {k: v / c.batch_size / 1e9 for k, v in flops.step_flops(c).items()}


def row(
  name: str, report: dict | None, error: str | None, overrides: list[str], lead: str = ""
) -> str:
  if report is None:
    return f"| {name} | {lead}| | | | | | | | | | {error} |"
  m = report["memory_per_chip_gib"]
  parts = analytic_count(name, overrides)
  xla = report.get("xla_gflops_per_image")
  analytic = parts["total"]
  ratio = f"{xla / analytic:.2f}" if xla and analytic else "n/a"
  return (
    f"| {name} | {lead}{report['config'].split(' ', 1)[1]} | {report['topology']} | "
    f"{report['batch_per_chip']:g} | {m['arguments']:.2f} | {m['temp']:.2f} | "
    f"{m['total']:.2f} / {report['hbm_per_chip_gib']:g} | "
    f"{xla:.1f} | {analytic:.1f} ({parts.get('frozen', 0.0):.1f}) | {ratio} | "
    f"{report['compile_s']:.0f} |"
  )


def _heading(title: str, legend: str = "") -> list[str]:
  """The table's title, its exact command and the compiling machine."""
  return [
    f"### {title}, compile-only ({datetime.date.today().isoformat()})",
    "",
    "Command: `" + " ".join(["python benchmarks/aot_table.py", *sys.argv[1:]]) + "`; machine: "
    f"{platform.machine()}, {os.cpu_count()} CPU cores (the compiler's host).{legend}",
    "",
  ]


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--topology", default="v5e-256")
  p.add_argument("--small_topology", default="v5e-16", help="for peco_vqvae (batch 128)")
  p.add_argument("--configs", default=",".join(PAPER_CONFIGS))
  p.add_argument("--set", action="append", default=[], help="config override, e.g. dtype=bfloat16")
  p.add_argument("--reports_dir", default="/tmp/aot_reports")
  p.add_argument("--reuse", action="store_true", help="keep reports already in --reports_dir")
  p.add_argument("--out", default="")
  p.add_argument(
    "--paper_slices",
    action="store_true",
    help="each config on a v5e slice with its paper's GPU count (PAPER_GPUS), remat if needed",
  )
  p.add_argument(
    "--remat_at_once",
    default="",
    help="with --paper_slices: configs compiled with remat without first trying it off, "
    "when a one-chip batch search (benchmarks/aot_batch.py) already shows that it cannot fit",
  )
  args = p.parse_args()
  os.makedirs(args.reports_dir, exist_ok=True)
  if args.paper_slices:
    return paper_slices(args)
  lines = [
    *_heading(
      f"Paper configs on {args.topology}",
      " Memory in GiB per chip; GFLOP per image (analytic: total, with the frozen "
      "teacher/tokenizer forward in brackets); compile: seconds on this machine.",
    ),
    "| config | step | target | per chip | arguments | temp | total / HBM | XLA GFLOP "
    "| analytic GFLOP (frozen) | XLA / analytic | compile s |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name in args.configs.split(","):
    topology = args.small_topology if name == "peco_vqvae" else args.topology
    report, error = run_one(name, topology, args.set, args.reports_dir, args.reuse)
    lines.append(row(name, report, error, args.set))
    print(lines[-1], flush=True)
  bench_util.emit(lines, args.out)
  return 0


def paper_slices(args) -> int:
  lines = [
    *_heading("Paper configs on their papers' GPU counts"),
    "| config | paper GPUs (source) | remat | step | target | per chip | arguments | temp "
    "| total / HBM | XLA GFLOP | analytic GFLOP (frozen) | XLA / analytic | compile s |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name in args.configs.split(","):
    gpus, source = PAPER_GPUS[name]
    topology = f"v5e-{gpus}"
    if name in args.remat_at_once.split(","):
      report, error = None, "needs (known from the one-chip batch search)"
    else:
      report, error = run_one(name, topology, args.set, args.reports_dir, args.reuse)
    remat = "off"
    if report is None and "needs" in (error or ""):  # the compiler's shortfall: try remat
      overrides = [*args.set, "model.remat=True"]
      need = re.search(r"needs ([\d.]+ GiB)", error)
      report, error = run_one(name, topology, overrides, args.reports_dir, args.reuse, ".remat")
      remat = f"on (off: needs {need.group(1)})" if need else "on (at once)"
    lines.append(row(name, report, error, args.set, lead=f"{gpus} ({source}) | {remat} | "))
    print(lines[-1], flush=True)
  bench_util.emit(lines, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
