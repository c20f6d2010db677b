r"""One table that compares every available pre-training method on real images.

  python benchmarks/compare_methods.py --steps=400 --eval_at=100,200,400 --finetune \
      --out=/tmp/compare/result.md

Each method in METHODS is pre-trained through the real trainer (`python -m mim_jax.train`)
with its `:runlocal` config on ../shared/data/imagenette2_32.npz, all with the same budget
(steps, batch 32, ViT width 128 / depth 4 / 4 heads, patch 4, 32 px). At each step of
`--eval_at` its checkpoint is evaluated with `python -m mim_jax.evaluate`: kNN (k = 20,
cosine, T = 0.07) and a linear probe (BatchNorm without affine + linear head, features
precomputed, 30 epochs), both on all 9,469 train and 3,925 test images. The same
architecture at its random initialisation is the baseline. `--finetune` also fine-tunes the
last checkpoint and the random init (configs/eval/finetune.py:runlocal: 5 epochs, the BEiT
recipe's augmentation and layer decay). Writes the markdown table (with command, machine,
date) and a PNG of probe accuracy against pre-training steps. Every finished piece (a
pre-training run, an evaluation's results.json) is reused when the command is run again.

Methods plug in by adding a row to METHODS (name, config, tokenizer, extra overrides).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_util  # noqa: E402

# name -> (pre-training config, tokenizer description, extra --config overrides)
METHODS = {
  "ccvit": (
    "configs/ccvit_vitb.py:runlocal",
    "pixel centroids, K=256 (built from train)",
    ["--config.tokenizer.images_per_class=100"],
  ),
  "beitv2": (
    "configs/beitv2_vitb.py:runlocal",
    "pixel centroids, K=256 (stand-in for VQ-KD)",
    ["--config.tokenizer.images_per_class=100"],
  ),
  "mapet": (
    "configs/mapet_vitb.py:runlocal",
    "pixel centroids, K=256 (stand-in for k-CLIP)",
    ["--config.tokenizer.images_per_class=100"],
  ),
  "caev2": ("configs/caev2_vitb.py:runlocal", "random CLIP ViT (stand-in for CLIP ViT-B/16)", []),
  "peco_mim": (
    "configs/peco_vitb.py:runlocal",
    "pixel centroids, K=256 (stand-in for PeCo)",
    ["--config.tokenizer.images_per_class=100"],
  ),
  "peco_mae": (
    "configs/peco_mae_vitb.py:runlocal",
    "pixel centroids, K=256 (stand-in for PeCo)",
    ["--config.tokenizer.images_per_class=100"],
  ),
}
BATCH = 32
MODEL = ["--config.model.width=128", "--config.model.depth=4", "--config.model.heads=4"]


def _run(cmd: list[str], what: str) -> float:
  t0 = time.time()
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if r.returncode:
    raise RuntimeError(f"{what} failed (rc {r.returncode}):\n{' '.join(cmd)}\n{r.stderr[-3000:]}")
  return time.time() - t0


def pretrain(name: str, workdir: str, npz: str, steps: int, eval_at: list[int]) -> float:
  """Pre-trains (or, when its last checkpoint exists, reuses) a method; wall seconds."""
  done = os.path.join(workdir, "pretrain_seconds.json")
  if os.path.exists(done) and os.path.isdir(os.path.join(workdir, "checkpoints", str(steps))):
    with open(done) as f:
      return json.load(f)["seconds"]
  config, _, extra = METHODS[name]
  every = eval_at[0]
  for s in eval_at:  # checkpoints exactly at the evaluation steps
    while s % every:
      every -= 1
  cmd = [
    sys.executable,
    "-m",
    "mim_jax.train",
    f"--config={config}",
    f"--workdir={workdir}",
    f"--config.data.path={npz}",
    f"--config.total_steps={steps}",
    f"--config.checkpoint_every={every}",
    f"--config.keep_checkpoints={steps // every + 1}",
    "--config.vis_every=0",
    f"--config.batch_size={BATCH}",
    *MODEL,
    *extra,
  ]
  seconds = _run(cmd, f"pre-training {name}")
  with open(done, "w") as f:
    json.dump({"seconds": seconds, "command": cmd}, f)
  return seconds


def evaluate(protocol: str, init: str, step: int, workdir: str, npz: str) -> dict:
  """Runs one protocol's :runlocal config (or reuses its results.json: re-runs resume)."""
  results = os.path.join(workdir, "results.json")
  if os.path.exists(results):
    with open(results) as f:
      return json.load(f)
  cmd = [
    sys.executable,
    "-m",
    "mim_jax.evaluate",
    f"--config=configs/eval/{protocol}.py:runlocal",
    f"--config.init={init}",
    f"--workdir={workdir}",
    f"--config.data.path={npz}",
    *MODEL,
  ]
  if step:
    cmd.append(f"--config.init_step={step}")
  _run(cmd, f"{protocol} of {init}@{step}")
  with open(results) as f:
    return json.load(f)


def _done(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, "results.json"))


def _pct(x) -> str:
  return "-" if x is None else f"{x:.2f} %"


def _probe_top1(r: dict) -> float:
  for key in ("test_top1", "top1", "probe_top1"):
    if key in r:
      return float(r[key])
  raise KeyError(f"no top-1 in linear-probe results {sorted(r)}")


def plot(rows: dict, baseline: float, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for name, points in rows.items():
    steps = [0] + [p["step"] for p in points]
    acc = [baseline] + [p["probe"] for p in points]
    ax.plot(steps, acc, marker="o", label=name)
  ax.axhline(baseline, color="grey", ls="--", lw=1, label="random init")
  ax.set_xlabel(f"pre-training steps (batch {BATCH})")
  ax.set_ylabel("linear probe top-1 (%), 3,925 test images")
  ax.set_title("Imagenette 32 px, ViT 128-d x 4 blocks, patch 4")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    "--npz", default=os.path.join(os.path.dirname(ROOT), "shared", "data", "imagenette2_32.npz")
  )
  p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {sorted(METHODS)}")
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--eval_at", default="100,200,400", help="pre-training steps to evaluate")
  p.add_argument(
    "--finetune",
    action="store_true",
    help="also fine-tune the last checkpoint and the random init "
    "(configs/eval/finetune.py:runlocal, 5 epochs)",
  )
  p.add_argument("--out", required=True, help="markdown file; workdirs and the PNG go beside it")
  args = p.parse_args()
  if not os.path.exists(args.npz):
    print(f"error: --npz {args.npz} does not exist", file=sys.stderr)
    return 2
  names = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(names) - set(METHODS))
  if unknown:
    print(f"error: --methods: unknown {unknown}; known {sorted(METHODS)}", file=sys.stderr)
    return 2
  eval_at = sorted(int(s) for s in args.eval_at.split(","))
  if not eval_at or eval_at[-1] > args.steps or eval_at[0] <= 0:
    print(f"error: --eval_at must be steps in [1, --steps={args.steps}]", file=sys.stderr)
    return 2
  base = os.path.dirname(os.path.abspath(args.out))
  os.makedirs(base, exist_ok=True)

  print("random-init baseline ...", flush=True)
  rand_knn = evaluate("knn", "random", 0, os.path.join(base, "random_knn"), args.npz)
  rand_lin = evaluate("linear_probe", "random", 0, os.path.join(base, "random_probe"), args.npz)
  baseline = {"knn": 100 * rand_knn["knn_top1"], "probe": 100 * _probe_top1(rand_lin)}
  ft_dir = os.path.join(base, "random_finetune")
  if args.finetune or _done(ft_dir):
    print("random-init fine-tuning ...", flush=True)
    rand_ft = evaluate("finetune", "random", 0, ft_dir, args.npz)
    baseline["finetune"] = 100 * _probe_top1(rand_ft)

  rows, times = {}, {}
  for name in names:
    workdir = os.path.join(base, name)
    print(f"pre-training {name} ...", flush=True)
    times[name] = pretrain(name, workdir, args.npz, args.steps, eval_at)
    rows[name] = []
    for step in eval_at:
      print(f"  evaluating {name} @ {step} ...", flush=True)
      k = evaluate("knn", workdir, step, os.path.join(base, f"{name}_knn_{step}"), args.npz)
      lin = evaluate(
        "linear_probe", workdir, step, os.path.join(base, f"{name}_probe_{step}"), args.npz
      )
      rows[name].append({"step": step, "knn": 100 * k["knn_top1"], "probe": 100 * _probe_top1(lin)})
    ft_dir = os.path.join(base, f"{name}_finetune")
    if args.finetune or _done(ft_dir):
      print(f"  fine-tuning {name} @ {eval_at[-1]} ...", flush=True)
      ft = evaluate("finetune", workdir, eval_at[-1], ft_dir, args.npz)
      rows[name][-1]["finetune"] = 100 * _probe_top1(ft)

  png = os.path.join(base, "compare_methods.png")
  plot(rows, baseline["probe"], png)
  import jax  # pylint: disable=g-import-not-at-top

  cmd = " ".join(["python benchmarks/compare_methods.py", *sys.argv[1:]])
  lines = [
    f"### Method comparison ({datetime.date.today().isoformat()})",
    "",
    f"Command: `{cmd}`  ",
    f"Machine: {bench_util.machine()}; JAX {jax.__version__}, backend {jax.default_backend()}.  ",
    "Data: ../shared/data/imagenette2_32.npz, 9,469 train / 3,925 test images, 10 "
    "classes. Encoder: ViT width 128, depth 4, 4 heads, patch 4, 32 px; "
    f"pre-training batch {BATCH}.",
    "",
    "| method | tokenizer | budget (steps) | pre-training wall time | kNN top-1 | "
    "linear probe top-1 | fine-tune top-1 (5 epochs) |",
    "|---|---|---|---|---|---|---|",
    f"| random init | - | 0 | - | {baseline['knn']:.2f} % | {baseline['probe']:.2f} % | "
    f"{_pct(baseline.get('finetune'))} |",
  ]
  for name in names:
    for r in rows[name]:
      lines.append(
        f"| {name} | {METHODS[name][1]} | {r['step']} | "
        f"{times[name] / 60:.1f} min for {args.steps} | {r['knn']:.2f} % | "
        f"{r['probe']:.2f} % | {_pct(r.get('finetune'))} |"
      )
  lines += ["", f"Probe accuracy against pre-training steps: `{os.path.basename(png)}`.", ""]
  text = "\n".join(lines)
  with open(args.out, "w") as f:
    f.write(text)
  with open(os.path.join(base, "compare_methods.json"), "w") as f:
    json.dump({"baseline": baseline, "rows": rows, "pretrain_seconds": times}, f, indent=1)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
