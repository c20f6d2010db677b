r"""Every method's training step on one accelerator chip: images/s per chip, MFU, memory.

  python benchmarks/accelerator_step_bench.py --out_dir=/tmp/accel        # on a GPU/TPU host
  python benchmarks/accelerator_step_bench.py --arg=runlocal --batch_size=2 --out_dir=/tmp/a

For each paper config (ViT-B/16 by default: beitv2_vitb, peco_vitb, mapet_vitb, ccvit_vitb,
caev2_vitb) the trainer's own jitted step (`train.build_step_for_benchmark`) runs at
--batch_size per chip in --dtype, with the files the config names (tokenizer, teacher, token
cache, perceptual network) replaced by untrained stand-ins of the same architecture, exactly
as `python -m mim_jax.aot` replaces them (`aot.use_standins`): speed does not depend on the
weights' values. Each config runs in its own process, so that one method's failure or memory
does not touch the next and the allocator's peak is that method's alone.

Per method: median step time over --rounds rounds of --steps steps (after --warmup), images/s
per chip, FLOPs per step from XLA's cost analysis of the compiled step and from the analytic
count (mim_jax/flops.py; 'model' FLOPs = the trainable network's + the frozen teacher's or
tokenizer's forward), TFLOP/s and MFU against the chip's dense bf16 peak (mim_jax/perf.py) and
against a large bf16 matmul measured in the same run; XLA's memory analysis of the compiled
step (what `python -m mim_jax.aot` reports for a compile-only target) beside the allocator's
measured peak. Results: one JSON per method and a markdown table under --out_dir.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = ("ccvit_vitb", "beitv2_vitb", "caev2_vitb", "mapet_vitb", "peco_vitb")
GIB = 1024**3


def matmul_tflops(n: int, dtype: str = "bfloat16", reps: int = 20) -> float:
  """TFLOP/s of an n x n x n matmul on the default device: the chip's practical ceiling."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = f(a)
    out.block_until_ready()
    best = min(best, (time.perf_counter() - t0) / reps)
  return 2 * n**3 / best / 1e12


def _config(name: str, arg: str, batch: int, dtype: str, overrides: list[str]):
  """The paper config with stand-ins for every file it names, on one chip."""
  sys.path[:0] = [p for p in (ROOT, HERE) if p not in sys.path]
  from mim_jax import aot  # pylint: disable=g-import-not-at-top
  from mim_jax import config_lib  # pylint: disable=g-import-not-at-top
  from mim_jax import train  # pylint: disable=g-import-not-at-top

  import bench_util  # pylint: disable=g-import-not-at-top

  c = config_lib.load_config(name, arg)
  with c.unlocked():
    c.batch_size, c.dtype = batch, dtype
    for axis in c.mesh:
      c.mesh[axis] = 1
    notes = aot.use_standins(c)
    bench_util.set_overrides(c, overrides)
  train.validate_config(c)
  return c, notes


def run_one(args) -> dict:
  """One config, in this process: the row of the table."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from mim_jax import aot  # pylint: disable=g-import-not-at-top
  from mim_jax import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from mim_jax import perf  # pylint: disable=g-import-not-at-top
  from mim_jax import train  # pylint: disable=g-import-not-at-top

  config, notes = _config(args.config, args.arg, args.batch_size, args.dtype, args.set)
  device = jax.devices()[0]
  t0 = time.perf_counter()
  step_fn, state, frozen, batch = train.build_step_for_benchmark(config)
  build_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, frozen, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = aot.memory_per_device(compiled)  # what `python -m mim_jax.aot` reports
  xla_flops = perf.cost(compiled).get("flops")
  for _ in range(max(args.warmup, 1)):
    state, metrics = compiled(state, frozen, batch)
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(args.rounds):
    t0 = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready((state, metrics))
    times.append((time.perf_counter() - t0) / args.steps)
  step_s = statistics.median(times)
  analytic = flops_lib.step_flops(config)
  stats = device.memory_stats() or {}
  peak = perf.peak_tflops(device.device_kind)
  b = config.batch_size
  row = {
    "config": args.config,
    "arg": args.arg,
    "method": config.method.name,
    "variant": config.model.variant,
    "device_kind": device.device_kind,
    "platform": device.platform,
    "batch_per_chip": b,
    "dtype": config.dtype,
    "remat": bool(config.model.get("remat", False)),
    "build_s": build_s,
    "compile_s": compile_s,
    "step_s": step_s,
    "step_s_rounds": times,
    "images_per_s_per_chip": b / step_s,
    "xla_gflops_per_image": xla_flops / b / 1e9 if xla_flops else None,
    "analytic_gflops_per_image": {k: v / b / 1e9 for k, v in analytic.items()},
    "xla_tflops": xla_flops / step_s / 1e12 if xla_flops else None,
    "model_tflops": analytic["total"] / step_s / 1e12,
    "peak_bf16_tflops": peak,
    "mfu": analytic["total"] / step_s / 1e12 / peak if peak else None,
    "memory_gib": {
      **{("xla_total" if k == "total" else k): v / GIB for k, v in mem.items()},
      "allocator_peak": stats.get("peak_bytes_in_use", 0) / GIB or None,
      "chip": stats.get("bytes_limit", 0) / GIB or None,
    },
    "loss": float(np.asarray(metrics.get("loss", np.nan))),
    "standins": notes,
  }
  return row


def _child(args) -> int:
  out = os.path.join(args.out_dir, f"{args.config}.json")
  try:
    row = run_one(args)
  except Exception:  # pylint: disable=broad-except  # the table says which method failed, why
    row = {"config": args.config, "error": traceback.format_exc()[-3000:]}
  with open(out, "w") as f:
    json.dump(row, f, indent=1)
  print(json.dumps({k: v for k, v in row.items() if k not in ("standins",)}), flush=True)
  return 0 if "error" not in row else 1


def _fmt(x, spec):
  return "–" if x is None else format(x, spec)


def table(rows: list[dict], args, machine: str, ceiling: float | None) -> list[str]:
  cmd = " ".join(["python benchmarks/accelerator_step_bench.py", *sys.argv[1:]])
  ok = [r for r in rows if "error" not in r]
  kind = ok[0]["device_kind"] if ok else "?"
  peak = ok[0]["peak_bf16_tflops"] if ok else None
  lines = [
    f"Command: `{cmd}`  ",
    f"Machine: {machine}; {kind}; date {datetime.date.today().isoformat()}.  ",
    f"Peak: {_fmt(peak, 'g')} TFLOP/s dense bf16 (datasheet, mim_jax/perf.py); an 8192^3 bf16 "
    f"matmul measured {_fmt(ceiling, '.0f')} TFLOP/s in this run.  ",
    f"Batch {args.batch_size} per chip, {args.dtype}; median of {args.rounds} rounds x "
    f"{args.steps} steps after {args.warmup} warm-up steps.",
    "",
    "| config | method | img/s per chip | step ms | GFLOP/img analytic (frozen) | GFLOP/img "
    "XLA | model TFLOP/s | MFU | MFU of measured matmul | XLA memory GiB (args + temp) "
    "| allocator peak GiB | compile s |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    if "error" in r:
      last = r["error"].strip().splitlines()[-1][:160]
      lines.append(f"| {r['config']} | failed: {last} |" + " |" * 10)
      continue
    a, m = r["analytic_gflops_per_image"], r["memory_gib"]
    lines.append(
      f"| {r['config']} | {r['method']} | {r['images_per_s_per_chip']:.0f} | "
      f"{r['step_s'] * 1e3:.1f} | {a['total']:.1f} ({a['frozen']:.1f}) | "
      f"{_fmt(r['xla_gflops_per_image'], '.1f')} | {r['model_tflops']:.0f} | "
      f"{_fmt(r['mfu'] and 100 * r['mfu'], '.1f')} % | "
      f"{_fmt(ceiling and 100 * r['model_tflops'] / ceiling, '.1f')} % | "
      f"{m['xla_total']:.2f} ({m['arguments']:.2f} + {m['temp']:.2f}) | "
      f"{_fmt(m['allocator_peak'], '.2f')} | {r['compile_s']:.0f} |"
    )
  return lines


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs", default=",".join(CONFIGS))
  p.add_argument("--arg", default="", help="the configs' argument, e.g. runlocal")
  p.add_argument("--batch_size", type=int, default=128, help="per chip")
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--set", action="append", default=[], help="config override a.b=value")
  p.add_argument("--out_dir", default="/tmp/accelerator_step_bench")
  p.add_argument("--deadline_s", type=float, default=0, help="start no config after this")
  p.add_argument("--timeout_s", type=float, default=900, help="per config")
  p.add_argument("--config", default="", help=argparse.SUPPRESS)  # the child's one config
  args = p.parse_args()
  os.makedirs(args.out_dir, exist_ok=True)
  sys.path[:0] = [p for p in (ROOT, HERE) if p not in sys.path]
  if args.config:
    return _child(args)

  import bench_util  # pylint: disable=g-import-not-at-top

  t_start = time.time()
  # In a process of its own: the parent holding the chip would starve the configs' processes.
  probe = (
    "import jax, sys; sys.path.insert(0, %r); import accelerator_step_bench as b; "
    "print(b.matmul_tflops(8192) if jax.default_backend() != 'cpu' else '')" % HERE
  )
  out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
  try:
    ceiling = float(out.stdout.split()[-1])
  except (IndexError, ValueError):  # a CPU host, or the probe failed (its stderr says why)
    ceiling = None
    print(out.stderr[-2000:], file=sys.stderr)
  print(f"bf16 8192^3 matmul: {ceiling} TFLOP/s", flush=True)
  rows = []
  for name in args.configs.split(","):
    if args.deadline_s and time.time() - t_start > args.deadline_s:
      rows.append({"config": name, "error": "not run: the run's --deadline_s had passed"})
      continue
    cmd = [sys.executable, __file__, f"--config={name}", *sys.argv[1:]]
    t0 = time.time()
    try:
      subprocess.run(cmd, timeout=args.timeout_s, check=False)
    except subprocess.TimeoutExpired:
      pass
    path = os.path.join(args.out_dir, f"{name}.json")
    try:
      with open(path) as f:
        rows.append(json.load(f))
    except (OSError, ValueError):
      rows.append({"config": name, "error": f"no result after {time.time() - t0:.0f} s"})
    print(f"{name}: {time.time() - t0:.0f} s", flush=True)
  lines = table(rows, args, bench_util.machine(), ceiling)
  bench_util.emit(lines, os.path.join(args.out_dir, "table.md"))
  return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
