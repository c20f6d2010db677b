r"""Checkpoint size with the frozen inputs inside the state (before) and beside it (after).

  cd /work/main && JAX_PLATFORMS=cpu .venv/bin/python benchmarks/checkpoint_size.py \
      --out=/tmp/plan/ckpt_size.md

For configs/caev2_vitb.py and configs/beitv2_vitb.py at full size (ViT-B/16, 224 px, batch 2:
the batch does not change a checkpoint) with full-size frozen inputs of random weights, so
nothing is downloaded:
  caev2   the CLIP ViT-B/16 teacher, `config.teacher.random_init='random:ViT-B/16'`;
  beitv2  the VQ-KD tokenizer of the released `vqkd_encoder_base_decoder_3x768x12_clip`
          architecture (`microsoft/unilm:beit2/modeling_vqkd.py`: ViT-B/16 encoder, 3-block
          768-wide decoder, 8192 x 32 codebook, 512-d target), written as a state dict in the
          official key layout to a temporary .pth and loaded by the tokenizer's own converter.
The train state is the trainer's own (`train.Trainer`: abstract_state / init_state /
frozen) plus the runner's `guard` counters, saved once with `checkpoint.Checkpointer`:
  after   {step, params, opt_state, rng, extra, guard}: what mim_jax/runner.py writes;
  before  the same plus `consts` (the frozen inputs): what the trainer before the runner
          wrote into every checkpoint.
Every float leaf with more than one element is replaced by random values first, so the state
looks trained: orbax compresses, and the zeros of a fresh state (Adam moments, biases, norm
offsets) would understate the size. Sizes are the bytes of the files in the step directory
(`du -sb` less the directory entries), in MB = 10^6 bytes; "x keep" multiplies by
config.keep_checkpoints.
Prints a BENCHMARKS.md section (heading, command, machine, table) and writes it to --out.

Cross-check against the committed code (state with `consts`, as that trainer builds it):
  git worktree add /tmp/ckpt_before HEAD
  PYTHONPATH=/tmp/ckpt_before JAX_PLATFORMS=cpu .venv/bin/python \
      benchmarks/checkpoint_size.py --legacy --configs=caev2_vitb
  git worktree remove --force /tmp/ckpt_before
prints the size of the checkpoint that code writes; it should match "before" within a few %.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if "--legacy" not in sys.argv:  # --legacy: mim_jax (and configs/) come from PYTHONPATH
  sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from absl import flags  # noqa: E402

import bench_util  # noqa: E402

flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mim_jax import checkpoint as ckpt_lib  # noqa: E402
from mim_jax import config_lib  # noqa: E402
from mim_jax import methods  # noqa: E402
from mim_jax import sharding  # noqa: E402
from mim_jax import train  # noqa: E402

CONFIGS = ("caev2_vitb", "beitv2_vitb")
BATCH = 2
MB = 1e6

# `vqkd_encoder_base_decoder_3x768x12_clip` (microsoft/unilm:beit2/modeling_vqkd.py).
VQKD_ARCH = dict(
  image_size=224,
  patch=16,
  width=768,
  depth=12,
  decoder_depth=3,
  code_dim=32,
  num_codes=8192,
  target_dim=512,
)


# --------------------------------------------------------------------------- frozen inputs
def _official_vit(
  rng, prefix: str, *, width: int, depth: int, patch: int, in_chans: int, grid: int
) -> dict:
  """Random weights in the key layout of the VQ-KD ViTs (modeling_finetune.VisionTransformer
  with use_mean_pooling: fc_norm, no final norm, no layer scale)."""

  def draw(*shape):
    return rng.standard_normal(shape, np.float32) * np.float32(0.02)

  sd = {
    f"{prefix}cls_token": draw(1, 1, width),
    f"{prefix}pos_embed": draw(1, grid * grid + 1, width),
    f"{prefix}patch_embed.proj.weight": draw(width, in_chans, patch, patch),
    f"{prefix}patch_embed.proj.bias": draw(width),
    f"{prefix}fc_norm.weight": draw(width),
    f"{prefix}fc_norm.bias": draw(width),
  }
  for i in range(depth):
    b = f"{prefix}blocks.{i}."
    sd.update(
      {
        b + "norm1.weight": draw(width),
        b + "norm1.bias": draw(width),
        b + "attn.qkv.weight": draw(3 * width, width),
        b + "attn.q_bias": draw(width),
        b + "attn.v_bias": draw(width),
        b + "attn.proj.weight": draw(width, width),
        b + "attn.proj.bias": draw(width),
        b + "norm2.weight": draw(width),
        b + "norm2.bias": draw(width),
        b + "mlp.fc1.weight": draw(4 * width, width),
        b + "mlp.fc1.bias": draw(4 * width),
        b + "mlp.fc2.weight": draw(width, 4 * width),
        b + "mlp.fc2.bias": draw(width),
      }
    )
  return sd


def write_random_vqkd(path: str, seed: int = 0) -> None:
  """A random-weight VQ-KD of the released base architecture as an official-layout .pth."""
  import torch  # pylint: disable=g-import-not-at-top

  a, rng = VQKD_ARCH, np.random.default_rng(seed)
  grid = a["image_size"] // a["patch"]
  sd = _official_vit(
    rng, "encoder.", width=a["width"], depth=a["depth"], patch=a["patch"], in_chans=3, grid=grid
  )
  sd.update(
    _official_vit(
      rng,
      "decoder.",
      width=a["width"],
      depth=a["decoder_depth"],
      patch=1,
      in_chans=a["code_dim"],
      grid=grid,
    )
  )
  for name, out in (("encode_task_layer", a["code_dim"]), ("decode_task_layer", a["target_dim"])):
    sd[f"{name}.0.weight"] = rng.standard_normal((a["width"], a["width"]), np.float32)
    sd[f"{name}.0.bias"] = rng.standard_normal((a["width"],), np.float32)
    sd[f"{name}.2.weight"] = rng.standard_normal((out, a["width"]), np.float32)
    sd[f"{name}.2.bias"] = rng.standard_normal((out,), np.float32)
  codebook = rng.standard_normal((a["num_codes"], a["code_dim"]), np.float32)
  sd["quantize.embedding.weight"] = codebook / np.linalg.norm(codebook, axis=1, keepdims=True)
  sd["quantize.embedding.initted"] = np.ones((1,), bool)
  sd["quantize.cluster_size"] = rng.random(a["num_codes"], np.float32)
  torch.save({"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}}, path)


def make_config(name: str, tmpdir: str):
  code_root = os.path.dirname(os.path.dirname(os.path.abspath(config_lib.__file__)))
  c = config_lib.load_config(os.path.join(code_root, "configs", f"{name}.py"))
  c.batch_size = BATCH
  c.mesh.data = 1
  if name.startswith("caev2"):
    c.teacher.path = ""
    c.teacher.random_init = "random:ViT-B/16"
  else:
    path = os.path.join(tmpdir, "vqkd_random_base.pth")
    if not os.path.exists(path):
      write_random_vqkd(path)
    c.tokenizer.kind, c.tokenizer.path = "vqkd", path
  return c


# --------------------------------------------------------------------------- states
def as_trained(tree, seed: int):
  """Every float leaf with more than one element replaced by N(0, 0.02^2) values of the same
  shape, dtype and sharding (a trained state's bytes compress like this, zeros do not)."""
  rng = np.random.default_rng(seed)

  def fill(x):
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.size <= 1:
      return x
    values = (rng.standard_normal(x.shape, np.float32) * np.float32(0.02)).astype(x.dtype)
    return jax.device_put(values, x.sharding)

  return jax.tree.map(fill, tree)


def sample_batch(config) -> dict:
  size, patch = config.data.image_size, int(config.model.variant.split("/")[1])
  n = (size // patch) ** 2
  return {
    "image": jax.ShapeDtypeStruct((BATCH, size, size, 3), jnp.float32),
    "image2": jax.ShapeDtypeStruct((BATCH, size, size, 3), jnp.uint8),
    "mask": jax.ShapeDtypeStruct((BATCH, n), jnp.bool_),
  }


def guard_counters(mesh) -> dict:
  """The runner's state['guard'] (mim_jax/runner.py _fresh_state)."""
  return jax.device_put(
    {
      "nonfinite_steps": np.int32(0),
      "last_nonfinite_step": np.int32(-1),
      "bad_examples": np.int32(0),
    },
    sharding.replicated(mesh),
  )


def nbytes(tree) -> int:
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def dir_bytes(path: str) -> int:
  """The sizes of every file under path (`du -sb` less the directory entries)."""
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def saved_bytes(workdir: str, state, keep: int, step: int = 1) -> int:
  """Saves `state` as step `step` with the project's Checkpointer; the step directory's bytes."""
  ckpt = ckpt_lib.Checkpointer(workdir, keep=keep)
  data_state = json.dumps({"next_step": step, "seed": 0, "global_batch_size": BATCH})
  ckpt.save(step, state, data_state)
  ckpt.wait()
  ckpt.close()
  return dir_bytes(os.path.join(ckpt.directory, str(step)))


# --------------------------------------------------------------------------- measurements
def measure(name: str, tmpdir: str) -> dict:
  """Params, frozen bytes and the step directory's bytes after / before, for one config."""
  t0 = time.time()
  config = make_config(name, tmpdir)
  mesh = sharding.make_mesh(config.mesh)
  method = methods.build(config, workdir=None, source=None)
  trainer = train.Trainer(config, mesh, method)
  sample = sample_batch(config)
  _, state_sh = trainer.abstract_state(sample)
  state = as_trained(trainer.init_state(sample, state_sh), seed=1)
  state = dict(state, guard=guard_counters(mesh))
  frozen, _ = trainer.frozen()
  frozen = as_trained(frozen, seed=2)
  row = dict(
    config=name,
    params=sum(int(x.size) for x in jax.tree.leaves(state["params"])),
    frozen_bytes=nbytes(frozen),
    keep=int(config.keep_checkpoints),
  )
  row["after"] = saved_bytes(os.path.join(tmpdir, f"{name}_after"), state, row["keep"])
  row["before"] = saved_bytes(
    os.path.join(tmpdir, f"{name}_before"), dict(state, consts=frozen), row["keep"]
  )
  for d in ("after", "before"):
    shutil.rmtree(os.path.join(tmpdir, f"{name}_{d}"), ignore_errors=True)
  print(f"{name}: {row} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
  return row


def measure_legacy(name: str, tmpdir: str) -> dict:
  """The committed trainer (state with 'consts', no guard) and checkpointer, from PYTHONPATH."""
  config = make_config(name, tmpdir)
  mesh = sharding.make_mesh(config.mesh)
  method = methods.build(config, workdir=None, source=None)
  trainer = train.Trainer(config, mesh, method)
  sample = sample_batch(config)
  _, state_sh = trainer.abstract_state(sample)
  state = trainer.init_state(sample, state_sh)
  if "consts" not in state:
    raise SystemExit(
      f"--legacy: {train.__file__} does not keep consts in the state; run it "
      "with PYTHONPATH at a checkout of the committed code"
    )
  state = dict(
    as_trained({k: v for k, v in state.items() if k != "consts"}, seed=1),
    consts=as_trained(state["consts"], seed=2),
  )
  workdir = os.path.join(tmpdir, f"{name}_legacy")
  size = saved_bytes(workdir, state, int(config.keep_checkpoints))
  shutil.rmtree(workdir, ignore_errors=True)
  return dict(config=name, legacy_before=size, code=os.path.dirname(train.__file__))


def markdown(rows: list[dict], command: str, date: str) -> str:
  lines = [
    f"### Checkpoint size: frozen inputs out of checkpoints ({date})",
    "",
    f"Command: `{command}`",
    "",
    f"Machine: {bench_util.machine()}",
    "",
    "| config | params | frozen inputs (MB) | before (MB) | after (MB) | "
    "before x keep (MB) | after x keep (MB) | saved |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    k = r["keep"]
    lines.append(
      f"| configs/{r['config']}.py | {r['params'] / 1e6:.1f} M | {r['frozen_bytes'] / MB:.0f} "
      f"| {r['before'] / MB:.0f} | {r['after'] / MB:.0f} | {k} x {r['before'] / MB:.0f} = "
      f"{k * r['before'] / MB:.0f} | {k} x {r['after'] / MB:.0f} = {k * r['after'] / MB:.0f} "
      f"| {1 - r['after'] / r['before']:.0%} |"
    )
  lines += [
    "",
    "Frozen inputs: CAE v2's CLIP ViT-B/16 teacher, BEiT v2's VQ-KD tokenizer "
    "(encoder, decoder, codebook), full size, random weights; params and Adam moments "
    "filled with random values as after training (orbax compresses, zeros would "
    "understate); sizes are the bytes of one step directory, keep = "
    "config.keep_checkpoints.",
    "",
    "Leaving the frozen inputs out (they are recorded by fingerprint in "
    "DIR/frozen.json) removes their fp32 copy from every kept checkpoint, "
    + ", ".join(
      f"{(r['before'] - r['after']) * r['keep'] / MB:.0f} MB per run for {r['config']}"
      for r in rows
    )
    + ".",
    "",
  ]
  return "\n".join(lines)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    "--configs", default=",".join(CONFIGS), help="comma-separated, of " + ", ".join(CONFIGS)
  )
  p.add_argument("--out", default="", help="also write the markdown section here")
  p.add_argument("--tmp", default=tempfile.gettempdir(), help="where the checkpoints go")
  p.add_argument("--date", default=datetime.date.today().isoformat())
  p.add_argument(
    "--legacy",
    action="store_true",
    help="measure the committed code's checkpoint (see the module docstring)",
  )
  a = p.parse_args()
  names = [n for n in a.configs.split(",") if n]
  unknown = sorted(set(names) - set(CONFIGS))
  if unknown:
    p.error(f"--configs: unknown {unknown}; known: {list(CONFIGS)}")
  tmpdir = tempfile.mkdtemp(prefix="ckpt_size_", dir=a.tmp)
  try:
    if a.legacy:
      for name in names:
        r = measure_legacy(name, tmpdir)
        print(
          f"{name}: committed code ({r['code']}): checkpoint {r['legacy_before'] / MB:.1f} MB "
          f"({r['legacy_before']} bytes)"
        )
      return 0
    rows = [measure(name, tmpdir) for name in names]
  finally:
    shutil.rmtree(tmpdir, ignore_errors=True)
  command = "JAX_PLATFORMS=cpu python " + " ".join(
    ["benchmarks/checkpoint_size.py"] + [x for x in sys.argv[1:] if not x.startswith("--out")]
  )
  text = markdown(rows, command, a.date)
  for r in rows:
    print(f"{r['config']}: before {r['before']} bytes, after {r['after']} bytes")
  print(text)
  if a.out:
    with open(a.out, "w") as f:
      f.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
