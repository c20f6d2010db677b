r"""Do the tokenizer trainers learn and keep their codebooks in use? Short VQ-KD and PeCo runs.

  python benchmarks/tokenizer_training.py --out=/tmp/tok_bench/result.md

Trains configs/vqkd_vitb.py:runlocal and configs/peco_vqvae.py:runlocal through the real
trainer on ../shared/data/imagenette2_32.npz (32 px, 8 x 8 codes, 1,024-code codebooks, small
randomly initialised teachers: a CLIP ViT for VQ-KD, a timm-layout ViT for PeCo's perceptual
loss), then runs `python -m mim_jax.tokenizer_report` on test images: codebook usage,
perplexity and token stability (CCViT Tables 4/11). `--ablate_restart` adds the faithful
VQ-KD setting (no dead-code restart) for comparison. Writes a markdown section with the
command, machine and date.
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

RUNS = {
  "vqkd": ("configs/vqkd_vitb.py:runlocal", []),
  "vqkd_no_restart": ("configs/vqkd_vitb.py:runlocal", ["--config.vqkd.restart_dead_codes=False"]),
  "peco": ("configs/peco_vqvae.py:runlocal", []),
}
LOSS_KEYS = (
  "loss",
  "rec_loss",
  "quant_loss",
  "loss_pixel",
  "loss_perceptual",
  "loss_commit",
  "psnr",
)


def _train(name: str, workdir: str, npz: str) -> dict:
  config, extra = RUNS[name]
  cmd = [
    sys.executable,
    "-m",
    "mim_jax.train",
    f"--config={config}",
    f"--workdir={workdir}",
    f"--config.data.path={npz}",
    *extra,
  ]
  t0 = time.time()
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if r.returncode:
    raise RuntimeError(f"{name} failed:\n{r.stderr[-3000:]}")
  logged = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  logged = [m for m in logged if "loss" in m]
  first, last = logged[0], logged[-1]
  return {
    "name": name,
    "config": config + (" " + " ".join(extra) if extra else ""),
    "seconds": time.time() - t0,
    "steps": int(last["step"]),
    "first": {k: first[k] for k in LOSS_KEYS if k in first},
    "last": {k: last[k] for k in LOSS_KEYS if k in last},
    "img_per_s": last.get("img_per_s", 0.0),
  }


def _report(specs: list[str], out: str, npz: str, num_images: int) -> str:
  cmd = [
    sys.executable,
    "-m",
    "mim_jax.tokenizer_report",
    *[f"--tokenizer={s}" for s in specs],
    "--source=npz",
    f"--path={npz}",
    "--split=test",
    f"--num_images={num_images}",
    f"--out={out}",
  ]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if r.returncode:
    raise RuntimeError(f"report failed:\n{r.stderr[-3000:]}")
  lines = [l for l in r.stdout.splitlines() if l.startswith("|") or l.startswith("Stability")]
  return "\n".join(lines)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    "--npz", default=os.path.join(os.path.dirname(ROOT), "shared", "data", "imagenette2_32.npz")
  )
  p.add_argument("--out", required=True, help="markdown file; workdirs go beside it")
  p.add_argument("--num_images", type=int, default=2000, help="test images in the report")
  p.add_argument(
    "--ablate_restart",
    action="store_true",
    help="also train VQ-KD without dead-code restarts (the reference setting)",
  )
  args = p.parse_args()
  if not os.path.exists(args.npz):
    print(
      f"error: --npz {args.npz} does not exist (../shared/data/imagenette2_32.npz)", file=sys.stderr
    )
    return 2
  base = os.path.dirname(os.path.abspath(args.out))
  os.makedirs(base, exist_ok=True)
  names = ["vqkd"] + (["vqkd_no_restart"] if args.ablate_restart else []) + ["peco"]
  results, specs = [], []
  for name in names:
    workdir = os.path.join(base, name)
    if os.path.exists(workdir):
      raise SystemExit(f"error: {workdir} exists; give a fresh --out directory")
    print(f"training {name} ...", flush=True)
    results.append(_train(name, workdir, args.npz))
    specs.append(f"{'peco' if name == 'peco' else 'vqkd'}:{workdir}")
  table = _report(specs, os.path.join(base, "report"), args.npz, args.num_images)

  cmd = " ".join(["python benchmarks/tokenizer_training.py", *sys.argv[1:]])
  import jax  # pylint: disable=g-import-not-at-top

  lines = [
    f"### Tokenizer training smoke runs ({datetime.date.today().isoformat()})",
    "",
    f"Command: `{cmd}`  ",
    f"Machine: {bench_util.machine()}; JAX {jax.__version__}, backend {jax.default_backend()}.",
    "",
    "| run | config | steps | wall time | first logged losses | last logged losses | img/s |",
    "|---|---|---|---|---|---|---|",
  ]
  fmt = lambda d: ", ".join(f"{k} {v:.4g}" for k, v in d.items())
  for r in results:
    lines.append(
      f"| {r['name']} | `{r['config']}` | {r['steps']} | {r['seconds'] / 60:.1f} min "
      f"| {fmt(r['first'])} | {fmt(r['last'])} | {r['img_per_s']:.0f} |"
    )
  lines += [
    "",
    f"Tokenizer report on {args.num_images} test images "
    "(`python -m mim_jax.tokenizer_report`; workdir names as above):",
    "",
    table,
    "",
  ]
  text = "\n".join(lines)
  with open(args.out, "w") as f:
    f.write(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
