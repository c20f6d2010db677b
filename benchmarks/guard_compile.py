r"""Compile time of the runner's guarded step: one `lax.cond` (mim_jax/runner.py) against the
select-per-leaf guard it replaced, side by side in one process on the same trainer step.

  cd /work/main && JAX_PLATFORMS=cpu .venv/bin/python benchmarks/guard_compile.py

The guard never applies an update whose loss, gradient or new state is non-finite. The
replaced form chose old vs new with `jnp.where(ok, new, old)` on every leaf; XLA then fused
the chain of per-leaf finiteness flags into each leaf's select, which grows with the square
of the number of leaves. Both variants wrap the trainer's own step (train.Trainer.step_fn)
of configs/ccvit_vitb.py with the shapes below, random centroids, one CPU device, default
XLA flags. Prints a BENCHMARKS.md section: compile seconds (`jit(...).lower().compile()`)
and the size of the optimised HLO text.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import config_lib
from mim_jax import methods
from mim_jax import runner
from mim_jax import sharding
from mim_jax import train
from mim_jax.tokenizers import centroids as centroid_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {  # name -> config overrides (16 px / 32 px images keep the runs short on a CPU)
  "2-layer width-32 (the tests' tiny step)": dict(
    variant="T/4", width=32, depth=2, heads=2, image=16, masked=6, replaced=2, block=2
  ),
  "12-layer width-192 (ViT-Ti depth)": dict(
    variant="T/4", width=192, depth=12, heads=3, image=32, masked=24, replaced=6, block=4
  ),
}


def _config(s, tmp):
  c = config_lib.load_config(os.path.join(ROOT, "configs", "ccvit_vitb.py"))
  c.data.image_size = c.data.second_image_size = s["image"]
  c.model.variant, c.model.width = s["variant"], s["width"]
  c.model.depth, c.model.heads = s["depth"], s["heads"]
  c.method.num_masked, c.method.num_replaced = s["masked"], s["replaced"]
  c.method.min_block, c.method.early_layers = s["block"], 1
  c.tokenizer.k, c.batch_size, c.mesh.data = 16, 4, 1
  # Compile time does not depend on the codebook's values: random centroids, no data.
  patch = int(s["variant"].split("/")[1])
  rand = np.random.default_rng(0).random((16, 3 * patch * patch), np.float32)
  c.tokenizer.path = os.path.join(tmp, "centroids")
  centroid_lib.CentroidTokenizer(rand, patch_size=patch).save(c.tokenizer.path)
  return c


def _select_per_leaf_guard(job):
  """The replaced form: the runner's guard with jnp.where on every leaf."""

  def step_fn(state, frozen, batch):
    bad = batch.pop("_bad")
    guard = state["guard"]
    inner = {k: v for k, v in state.items() if k != "guard"}
    new, metrics = job.step(inner, frozen, batch)
    ok = runner._all_finite(new) & runner._all_finite(  # pylint: disable=protected-access
      {k: v for k, v in metrics.items() if k in ("loss", "grad_norm")}
    )
    new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, inner)
    new["step"] = inner["step"] + 1
    new["guard"] = {
      "nonfinite_steps": guard["nonfinite_steps"] + (~ok).astype(jnp.int32),
      "last_nonfinite_step": jnp.where(ok, guard["last_nonfinite_step"], inner["step"]),
      "bad_examples": guard["bad_examples"] + jnp.sum(bad).astype(jnp.int32),
    }
    return new, metrics

  return step_fn


def _measure(name, s):
  config = _config(s, tempfile.mkdtemp())
  method = methods.build(config, workdir=None, source=None)
  rng = np.random.default_rng(0)
  n, size = config.batch_size, s["image"]
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  examples = [
    method.prepare({"image": images[i], "image2": images[i]}, np.random.default_rng(i))
    for i in range(n)
  ]
  local = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  local = {k: v for k, v in local.items() if k in ("image", "image2", "mask", "replaced")}
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  trainer = train.Trainer(config, mesh, method)
  sample = runner.global_sample(local)
  state_abs, state_sh = trainer.abstract_state(sample)
  frozen, frozen_sh = trainer.frozen()
  job = types.SimpleNamespace(
    step=trainer.step_fn(),
    mesh=mesh,
    rules=trainer.rules,
    state_sh=state_sh,
    state_abs=state_abs,
    frozen_sh=frozen_sh,
    init_state=lambda: trainer.init_state(sample, state_sh),
  )
  compile_cond, guarded_sh = runner._guarded_step(job)  # pylint: disable=protected-access
  state = runner._fresh_state(job, guarded_sh)  # pylint: disable=protected-access
  batch = sharding.global_batch(dict(local, _bad=np.zeros((n,), np.int32)), mesh)
  leaves = len(jax.tree.leaves(state))
  # The replaced form, jitted as the runner jits its step.
  select = jax.jit(
    _select_per_leaf_guard(job),
    in_shardings=(guarded_sh, frozen_sh, sharding.batch_sharding(mesh)),
    out_shardings=(guarded_sh, sharding.replicated(mesh)),
  )
  t0 = time.time()
  with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
    compiled = select.lower(state, frozen, batch).compile()
  rows = [(name, leaves, "select per leaf (replaced)", time.time() - t0, compiled)]
  run_step, seconds, _ = compile_cond(state, frozen, batch)
  rows.append((name, leaves, "one lax.cond (runner)", seconds, run_step.compiled))
  return rows


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  out = [
    f"### Guarded step compile time ({datetime.date.today()})",
    "",
    "Command: `JAX_PLATFORMS=cpu python benchmarks/guard_compile.py`",
    "",
    f"Machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
    f"{platform.platform()}; jax {jax.__version__}, default XLA flags, one CPU device",
    "",
    "| step (CCViT, batch 4) | state leaves | guard | compile (s) | optimised HLO (MB) |",
    "|---|---:|---|---:|---:|",
  ]
  for name, s in SHAPES.items():
    for row_name, leaves, guard, seconds, compiled in _measure(name, s):
      size = f"{len(compiled.as_text()) / 1e6:.1f}"
      out.append(f"| {row_name} | {leaves} | {guard} | {seconds:.1f} | {size} |")
      print(out[-1], flush=True)
  text = "\n".join(out) + "\n"
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
