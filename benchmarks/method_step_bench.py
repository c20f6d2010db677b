r"""Training step throughput of the token methods against the plain-MIM step that bounds them.

  python benchmarks/method_step_bench.py --variant=B/16 --batch_size=8 --out=/tmp/steps.md

One process, the trainer's own jitted step (`train.build_step_for_benchmark`) for each of:
  mim     MaPeT's MIM baseline: one stream of 197 tokens, 75 masked, CE at them (the
          plain MIM step);
  beitv2  BEiT v2: the same backbone + the 2-block patch-aggregation head;
  mapet   MaPeT: the two-stream sequence [h (197), M (147), g (147)] = 491 tokens with the
          on-device masks built from the permutation;
  mapet_permuted  the same with every stream in permutation order and one static
          prefix/causal mask (`config.method.layout='permuted'`);
  pim     MaPeT's PIM baseline: [h, g] = 344 tokens.
Targets come from an 8192-centroid pixel tokenizer run online (cheap, the same for all), so
the numbers compare the methods' model work. Images: the embedded photos at 224 px.
Rounds alternate between methods; the table gives the median of `--rounds`. FLOPs per step
are XLA's cost analysis of the compiled step; "utilisation" divides achieved FLOP/s by the
FLOP/s of a large fp32 matmul measured in the same process (this CPU's practical peak).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from absl import flags  # noqa: E402

import bench_util  # noqa: E402

flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mim_jax import config_lib  # noqa: E402
from mim_jax import train  # noqa: E402

METHODS = {  # name -> (config, argument, field overrides)
  "mim": ("mapet_vitb", "mode=mim", {}),
  "beitv2": ("beitv2_vitb", "", {}),
  "mapet": ("mapet_vitb", "mode=mapet", {}),
  "mapet_permuted": ("mapet_vitb", "mode=mapet", {"layout": "permuted"}),
  "pim": ("mapet_vitb", "mode=pim", {}),
}


def _config(name, variant, batch, dtype):
  module, arg, method_fields = METHODS[name]
  c = config_lib.load_config(module, ",".join(filter(None, [arg, f"variant={variant}"])))
  c.method.update(method_fields)
  c.batch_size = batch
  c.dtype = dtype
  c.data.source, c.data.path, c.data.worker_count = "embedded", "", 0
  c.tokenizer.kind, c.tokenizer.path, c.tokenizer.k = "centroids", "", 8192
  if "cache" in c.tokenizer:
    c.tokenizer.cache = ""
  c.mesh.data = 1
  return c


def matmul_peak(n=2048, reps=5) -> float:
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(reps):
    f(a).block_until_ready()
  return 2 * n**3 * reps / (time.perf_counter() - t0)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variant", default="B/16")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--out", default="")
  args = p.parse_args()
  names = args.methods.split(",")
  steps, flops, compile_s = {}, {}, {}
  for name in names:
    cfg = _config(name, args.variant, args.batch_size, args.dtype)
    t0 = time.perf_counter()
    step_fn, state, frozen, batch = train.build_step_for_benchmark(cfg)
    compiled = step_fn.lower(state, frozen, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops[name] = float(cost.get("flops", float("nan")))
    state, _ = compiled(state, frozen, batch)
    jax.block_until_ready(state)
    compile_s[name] = time.perf_counter() - t0
    steps[name] = (compiled, state, frozen, batch)
    print(
      f"{name}: compiled in {compile_s[name]:.0f}s, {flops[name] / 1e9:.1f} GFLOP/step", flush=True
    )
  times = {n: [] for n in names}
  for _ in range(args.rounds):
    for name in names:
      fn, state, frozen, batch = steps[name]
      t0 = time.perf_counter()
      for _ in range(args.steps):
        state, metrics = fn(state, frozen, batch)
      jax.block_until_ready((state, metrics))
      times[name].append((time.perf_counter() - t0) / args.steps)
      steps[name] = (fn, state, frozen, batch)
  peak = matmul_peak()
  base = statistics.median(times[names[0]])
  cmd = " ".join(["python benchmarks/method_step_bench.py", *sys.argv[1:]])
  lines = [
    f"### Training step: token methods vs plain MIM ({datetime.date.today().isoformat()})",
    "",
    f"Command: `{cmd}`  ",
    f"Machine: {bench_util.machine()}; JAX {jax.__version__}, backend "
    f"{jax.default_backend()}; fp32 matmul peak measured {peak / 1e9:.1f} GFLOP/s.  ",
    f"ViT-{args.variant} at 224 px, batch {args.batch_size}, {args.dtype}; median of "
    f"{args.rounds} rounds x {args.steps} steps.",
    "",
    "| method | step time | images/s | vs first row | GFLOP/step (XLA) | achieved GFLOP/s "
    "| utilisation of the matmul peak |",
    "|---|---|---|---|---|---|---|",
  ]
  for name in names:
    t = statistics.median(times[name])
    lines.append(
      f"| {name} | {t:.2f} s | {args.batch_size / t:.1f} | {base / t:.2f}x | "
      f"{flops[name] / 1e9:.0f} | {flops[name] / t / 1e9:.1f} | "
      f"{100 * flops[name] / t / peak:.0f} % |"
    )
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
