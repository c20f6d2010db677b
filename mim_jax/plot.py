r"""Training curves of one or more runs, overlaid, from their metrics.jsonl.

  python -m mim_jax.plot runs/ccvit --out=curves.png
  python -m mim_jax.plot runs/ccvit docs/reference_runs/ccvit_vitb --out=vs_reference.png

Each RUN is a workdir (or a metrics.jsonl file). One panel per kind of number the runs
logged: losses, accuracy (token accuracy, kNN top-1), learning rate, throughput (images/s
per chip), codebook usage (VQ-KD / PeCo VQ-VAE), reconstruction quality (PSNR), against the
step; runs have one colour each, the numbers of a panel one line style each. The repository
ships the curves of each method's `:runlocal` run and of the demo in docs/reference_runs/
(README there), so a run of the same config can be laid over its reference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

# Panels in order: (title, y label, test on a metric name).
PANELS = (
  ("losses", "loss", lambda k: k == "loss" or k.startswith("loss_") or k.endswith("_loss")),
  ("accuracy", "fraction", lambda k: "acc" in k or k.endswith("top1")),
  ("learning rate", "lr", lambda k: k == "lr"),
  ("throughput", "images/s per chip", lambda k: k == "img_per_s_per_chip"),
  ("codebook usage", "codes", lambda k: k.startswith("codebook_")),
  ("reconstruction", "dB", lambda k: k == "psnr"),
)


def read_run(path: str) -> tuple[str, dict[str, list[tuple[int, float]]]]:
  """(label, metric -> [(step, value)]) of a workdir or metrics.jsonl; a resumed run's
  re-logged step keeps its last value."""
  file = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{path}: no metrics.jsonl (not a mim_jax run directory)")
  rows: dict[int, dict] = {}
  with open(file) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        raise ValueError(f"{file}:{n}: not a JSON line") from None
      if "step" in row:
        rows.setdefault(int(row["step"]), {}).update(row)
  series: dict[str, list[tuple[int, float]]] = {}
  for step in sorted(rows):
    for key, value in rows[step].items():
      if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
        series.setdefault(key, []).append((step, float(value)))
  label = os.path.basename(os.path.normpath(path if os.path.isdir(path) else os.path.dirname(file)))
  return label or path, series


def plot(runs: list[str], out: str, labels: list[str] | None = None, title: str = "") -> list[str]:
  """Draws the panels the runs have data for into `out` (PNG); returns the panel titles."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  read = [read_run(r) for r in runs]
  if labels:
    if len(labels) != len(runs):
      raise ValueError(f"--labels has {len(labels)} names for {len(runs)} runs")
    read = [(name, series) for name, (_, series) in zip(labels, read)]
  panels = []
  for name, ylabel, match in PANELS:
    keys = sorted({k for _, series in read for k in series if match(k)})
    if keys:
      panels.append((name, ylabel, keys))
  if not panels:
    raise ValueError(f"no plottable metrics in {', '.join(runs)}")
  cols = min(3, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  styles = ("-", "--", ":", "-.")
  for ax, (name, ylabel, keys) in zip(axes.flat, panels):
    for r, (run_name, series) in enumerate(read):
      for i, key in enumerate(keys):
        if key not in series:
          continue
        steps, values = zip(*series[key])
        label = run_name if len(keys) == 1 else f"{run_name}: {key}"
        ax.plot(
          steps,
          values,
          styles[i % len(styles)],
          color=colours[r % len(colours)],
          marker="o" if len(steps) < 3 else None,
          label=label,
          linewidth=1.3,
        )
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(panels) :]:
    ax.axis("off")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = re.sub(r"(\.png)?$", ".tmp.png", out, count=1)
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, out)
  return [p[0] for p in panels]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m mim_jax.plot",
    description="Overlay the training curves of mim_jax runs (their metrics.jsonl).",
    epilog="example: python -m mim_jax.plot runs/demo docs/reference_runs/ccvit_demo "
    "--out=curves.png",
  )
  parser.add_argument("runs", nargs="+", help="workdirs or metrics.jsonl files")
  parser.add_argument("--out", required=True, help="the PNG to write")
  parser.add_argument("--labels", default="", help="comma-separated names, one per run")
  parser.add_argument("--title", default="", help="a title over the panels")
  args = parser.parse_args(argv)
  labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
  try:
    panels = plot(args.runs, args.out, labels, args.title)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  print(f"wrote {args.out}: {', '.join(panels)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
