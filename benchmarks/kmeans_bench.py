r"""k-means side by side: mim_jax (JAX Lloyd) vs faiss-cpu vs scikit-learn, same points, same init.

Default points: real 16x16x3 pixel patches in [0, 1], flattened in (c, y, x)
order like CCViT's tokenizer input, cut from ../shared/data (the 224 px
Imagenette JPEGs first, then the 64 px subset at its native size); synthetic
patches, with a note, when that folder is absent.

  python benchmarks/kmeans_bench.py --num_points=200000 --k=1024 --iters=10 \
      --results=BENCHMARKS_kmeans.md

Wall times exclude JAX compilation, which is reported separately; every
method's final inertia is measured afterwards by one common float64 evaluator.
"""

import argparse
import datetime
import glob
import os
import shlex
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_util  # noqa: E402

DEFAULT_DATA_DIR = os.path.join(os.path.dirname(ROOT), "shared", "data")


def _patches(images_uint8: np.ndarray, patch_size: int) -> np.ndarray:
  from mim_jax.tokenizers import centroids

  size = (min(images_uint8.shape[1:3]) // patch_size) * patch_size
  images = images_uint8[:, :size, :size]
  return centroids.patchify(images, patch_size).reshape(-1, 3 * patch_size * patch_size)


def _load_224(path):
  from PIL import Image

  image = Image.open(path).convert("RGB")
  return image if image.size == (224, 224) else image.resize((224, 224), Image.BICUBIC)


def load_points(data_dir: str, num_points: int, patch_size: int, seed: int):
  """(points float32 [0, 1], description) with exactly `num_points` rows."""
  parts, sources = [], []
  jpegs = sorted(glob.glob(os.path.join(data_dir, "imagenette2_224_sample", "*", "*", "*.JPEG")))
  if jpegs:
    images = np.stack([np.asarray(_load_224(f)) for f in jpegs])
    parts.append(_patches(images, patch_size))
    sources.append(f"{len(jpegs)} Imagenette 224px JPEGs ({parts[-1].shape[0]} patches)")
  subset = os.path.join(data_dir, "imagenette2_64_subset.npz")
  if sum(p.shape[0] for p in parts) < num_points and os.path.isfile(subset):
    with np.load(subset, allow_pickle=False) as data:
      images = np.concatenate([data["x_train"], data["x_test"]])
    parts.append(_patches(images, patch_size))
    sources.append(f"{len(images)} Imagenette 64px images ({parts[-1].shape[0]} patches)")
  rng = np.random.default_rng(seed)
  have = sum(p.shape[0] for p in parts)
  if have < num_points:
    # Smooth random patches around a few thousand prototypes, plus noise.
    dim = 3 * patch_size * patch_size
    prototypes = rng.random((4096, dim), dtype=np.float32)
    extra = prototypes[rng.integers(0, 4096, num_points - have)]
    extra = np.clip(extra + rng.normal(0, 0.05, extra.shape).astype(np.float32), 0, 1) * 255
    parts.append(extra.astype(np.uint8))
    sources.append(f"{num_points - have} SYNTHETIC patches (real data missing under {data_dir})")
  points = np.concatenate(parts)
  points = points[np.sort(rng.choice(points.shape[0], num_points, replace=False))]
  return points.astype(np.float32) / 255.0, "; ".join(sources)


def final_inertia(points: np.ndarray, centroids: np.ndarray) -> tuple[float, int]:
  """Sum of squared distances to the nearest centroid (float64) and the number of empty clusters."""
  c = np.asarray(centroids, np.float64)
  c_sq = (c * c).sum(1)
  total, used = 0.0, np.zeros(len(c), bool)
  for start in range(0, points.shape[0], 8192):
    x = points[start : start + 8192].astype(np.float64)
    d = (x * x).sum(1)[:, None] - 2.0 * x @ c.T + c_sq[None]
    used[d.argmin(1)] = True
    total += float(np.maximum(d.min(1), 0.0).sum())
  return total, int((~used).sum())


def run_jax(points, init, iters, chunk_size, reseed_empty=False):
  import jax
  import jax.numpy as jnp

  from mim_jax.tokenizers import kmeans

  options = dict(init=init, chunk_size=chunk_size, reseed_empty=reseed_empty)
  # Compile time, measured ahead of time on the step `fit` will run.
  num_reseed = min(init.shape[0], len(points), kmeans.MAX_RESEED_PER_ITERATION)
  step = kmeans._build_step(None, None, chunk_size, False, False, num_reseed if reseed_empty else 0)
  start = time.perf_counter()
  step.lower(
    jax.ShapeDtypeStruct(points.shape, jnp.float32),
    jax.ShapeDtypeStruct(init.shape, jnp.float32),
    jax.ShapeDtypeStruct((), jnp.int32),
  ).compile()
  compile_seconds = time.perf_counter() - start
  kmeans.fit(points, init.shape[0], iters=0, **options)  # fills fit's own jit cache
  start = time.perf_counter()
  result = kmeans.fit(points, init.shape[0], iters=iters, **options)
  # fit makes iters + 1 passes (the last measures the returned centroids).
  return np.asarray(result.centroids), time.perf_counter() - start, compile_seconds


def run_faiss(points, init, iters):
  import faiss

  km = faiss.Kmeans(
    points.shape[1],
    init.shape[0],
    niter=iters,
    seed=1,
    verbose=False,
    max_points_per_centroid=10**9,
    min_points_per_centroid=1,
  )
  start = time.perf_counter()
  km.train(points, init_centroids=init)
  return np.asarray(km.centroids), time.perf_counter() - start, None


def run_sklearn(points, init, iters):
  from sklearn.cluster import KMeans

  km = KMeans(init.shape[0], init=init, n_init=1, algorithm="lloyd", max_iter=iters, tol=0.0)
  start = time.perf_counter()
  km.fit(points)
  return km.cluster_centers_.astype(np.float32), time.perf_counter() - start, None


def _versions() -> str:
  out = []
  for name in ("jax", "faiss", "sklearn", "numpy"):
    try:
      out.append(f"{name} {__import__(name).__version__}")
    except ImportError:
      pass
  return ", ".join(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_points", type=int, default=200_000)
  parser.add_argument("--k", type=int, default=1024)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--patch_size", type=int, default=16)
  parser.add_argument("--chunk_size", type=int, default=4096, help="JAX distance block rows")
  parser.add_argument("--seed", type=int, default=0, help="Seeds the point subset and the init.")
  parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR)
  parser.add_argument(
    "--methods",
    default="jax,faiss,sklearn",
    help="Comma list of jax, jax_reseed (empty clusters re-seeded), faiss, sklearn.",
  )
  parser.add_argument(
    "--rounds",
    type=int,
    default=1,
    help="Run the methods this many times, interleaved; report each one's "
    "fastest (compile time from its first run).",
  )
  parser.add_argument("--results", default=None, help="Append the table to this markdown file.")
  args = parser.parse_args(argv)

  points, description = load_points(args.data_dir, args.num_points, args.patch_size, args.seed)
  init = points[np.random.default_rng(args.seed + 1).choice(len(points), args.k, replace=False)]
  print(f"points: {points.shape} ({description}); k={args.k}, iters={args.iters}", flush=True)

  runners = {
    "jax": lambda: run_jax(points, init, args.iters, args.chunk_size),
    "jax_reseed": lambda: run_jax(points, init, args.iters, args.chunk_size, True),
    "faiss": lambda: run_faiss(points, init, args.iters),
    "sklearn": lambda: run_sklearn(points, init, args.iters),
  }
  labels = {
    "jax": "mim_jax `kmeans.fit` (jit, chunked, segment_sum)",
    "jax_reseed": "mim_jax `kmeans.fit(reseed_empty=True)`",
    "faiss": "faiss-cpu `Kmeans` (init_centroids)",
    "sklearn": "scikit-learn `KMeans(n_init=1, algorithm='lloyd')`",
  }
  best_runs = {}
  for round_index in range(args.rounds):
    for name in args.methods.split(","):
      try:
        centroids, seconds, compile_seconds = runners[name]()
      except ImportError as e:
        print(f"{name}: skipped ({e})", flush=True)
        continue
      print(f"round {round_index}: {name} {seconds:.2f}s", flush=True)
      if name not in best_runs:
        best_runs[name] = (centroids, seconds, compile_seconds)
      elif seconds < best_runs[name][1]:  # later rounds hit the compilation cache
        best_runs[name] = (centroids, seconds, best_runs[name][2])
  rows = []
  for name, (centroids, seconds, compile_seconds) in best_runs.items():
    inertia, empty = final_inertia(points, centroids)
    rows.append((name, seconds, compile_seconds, inertia, empty))
    print(f"{name}: {seconds:.2f}s, inertia {inertia:.8g}, {empty} empty clusters", flush=True)

  best = min(r[3] for r in rows)
  table = [
    "| method | wall (s) | s / iteration | compile (s) | final inertia | vs best "
    "| empty clusters |",
    "| --- | --- | --- | --- | --- | --- | --- |",
  ]
  for name, seconds, compile_seconds, inertia, empty in rows:
    table.append(
      f"| {labels[name]} | {seconds:.2f} | {seconds / args.iters:.2f} | "
      f"{'-' if compile_seconds is None else f'{compile_seconds:.2f}'} | "
      f"{inertia:.8g} | {100 * (inertia / best - 1):+.3f}% | {empty} |"
    )
  table = "\n".join(table)
  command = "python " + " ".join(
    shlex.quote(a)
    for a in [os.path.relpath(__file__, ROOT)] + (sys.argv[1:] if argv is None else list(argv))
  )
  report = "\n".join(
    [
      f"### k-means: {args.num_points} x {points.shape[1]} points, K={args.k}, {args.iters} "
      f"iterations ({datetime.date.today().isoformat()})",
      "",
      f"- command: `{command}`",
      f"- machine: {bench_util.machine()}",
      f"- versions: {_versions()}",
      f"- points: {description}",
      f"- fastest of {args.rounds} interleaved round(s); "
      "same points and same init for every method; wall time "
      "excludes JAX compilation; the JAX time includes one extra assignment pass (the final "
      "inertia); final inertia re-measured for all in float64",
      "",
      table,
      "",
    ]
  )
  print("\n" + report)
  if args.results:
    with open(args.results, "a") as f:
      f.write(report + "\n")
    print(f"appended to {args.results}")


if __name__ == "__main__":
  main()
