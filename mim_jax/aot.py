r"""Will it fit? Compiles a config's real train step for a Cloud TPU slice or NVIDIA GPUs,
without them.

  python -m mim_jax.aot --config=configs/ccvit_vitb.py --topology=v5e-256 --out=report.json
  python -m mim_jax.aot --config=configs/beitv2_vitl.py --topology=v4-64 --config.model.remat=True
  python -m mim_jax.aot --config=configs/caev2_vitb.py --topology=h100-8

Prints one line (chips, memory per chip against the chip's HBM, FLOPs per image, compile time)
and writes the same as JSON (--out). Exit 0 when the step fits; exit 1 with one line naming
the shortfall when it does not ("needs 19.3 GiB per chip, v5e has 16"); exit 2 for bad input.

What is compiled is what `python -m mim_jax.train` would run on that slice: the runner's
guarded step, the method's loss, the optimizer, the config's mesh and sharding rules, the
global batch of config.batch_size. Nothing is read: the batch's shapes come from one
synthetic example put through the config's transform and the method's `prepare`; the
frozen inputs named by files (teacher, tokenizer, token cache, perceptual network) are
replaced by untrained stand-ins of the same architecture ('random:' specs, listed in the
report), built as shapes only. So the command runs on a laptop where neither the data set
nor any checkpoint exists.

TPU targets are compile-only devices from libtpu (`pip install -e ".[tpu]"`, docs/aot.md):
accelerator types as Cloud TPU names them, v4-N and v5p-N (N TensorCores, N/2 chips),
v5e-N and v6e-N (N chips); --num_slices=K for multislice. FLOPs per image are XLA's count
of the compiled step (with config.model.scan_layers the layer loop is counted once, so the
count comes from an unscanned lowering of the same step) beside the analytic count of
mim_jax/flops.py.

GPU targets are compile-only devices from jax's CUDA plugin (`pip install -e ".[gpu-aot]"`;
no GPU, no NVIDIA library): <gpu>-<count> for a100 (80 GB SXM), h100 (80 GB SXM), h200
(141 GB SXM), 1 to 8 GPUs on one host or hosts of 8 (h100-16: 2 x 8). XLA:GPU is told the
device by mim_jax/gpu_targets/<gpu>.txtpb (from XLA's own specs); its device memory is the
HBM of the report. XLA:GPU has no cost analysis, so XLA's FLOPs are those of the step's HLO
lowered for one CPU device, before optimisation (`xla_flops_source` in the report). Without
a GPU `import mim_jax` hides the plugin from jax (mim_jax/__init__.py), so for a GPU target
the command starts itself again with MIM_JAX_CUDA_PLUGIN=1.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import sys
import time

# Before jax loads libtpu: no metadata-server queries, no worker-hostname warning.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
# Compile-only devices touch no chip, so several dry runs (or a dry run beside the test suite)
# may load libtpu at once; without this the second one fails on libtpu's lock file.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# ruff: noqa: E402
from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import aot_gpu
from mim_jax import flops as flops_lib
from mim_jax import methods
from mim_jax import runner
from mim_jax import sharding
from mim_jax import train
from mim_jax.data import pipeline as data_pipeline
from mim_jax.data import transforms

# The configs of the papers' headline results (configs/<name>.py): what the tests lower from
# shapes and benchmarks/aot_table.py tabulates.
PAPER_CONFIGS = (
  "beitv2_vitb",
  "beitv2_vitl",
  "peco_vitb",
  "peco_vitl",
  "peco_mae_vitb",
  "mapet_vitt",
  "mapet_vits",
  "mapet_vitb",
  "ccvit_vitb",
  "ccvit_vitl",
  "caev2_vitt",
  "caev2_vits",
  "caev2_vitb",
  "caev2_vitl",
  "vqkd_vitb",
  "peco_vqvae",
)

GIB = 1024**3


class DoesNotFit(RuntimeError):
  """The step needs more memory per chip than the target has (exit 1)."""


# --------------------------------------------------------------------------- targets
@dataclasses.dataclass(frozen=True)
class Generation:
  topology_prefix: str  # libtpu's spelling
  chip_config: str
  cores_per_chip: int  # in the accelerator-type number: v4-8 is 4 chips
  dims: int
  hbm_gib: float  # per chip, Cloud TPU system architecture pages


GENERATIONS = {
  "v4": Generation("v4", "megacore", 2, 3, 32),
  "v5p": Generation("v5", "megacore", 2, 3, 95),
  "v5e": Generation("v5e", "default", 1, 2, 16),
  "v6e": Generation("v6e", "default", 1, 2, 32),
}


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  generation: str  # v5e, ... or a GPU model: h100, ...
  chips: int  # per slice; GPUs in all
  num_slices: int
  shape: tuple[int, ...]  # GPUs: (1, hosts, GPUs per host)

  @property
  def platform(self) -> str:
    return "gpu" if self.generation in aot_gpu.GPUS else "tpu"

  @property
  def unit(self) -> str:
    return "GPU" if self.platform == "gpu" else "chip"

  @property
  def hbm_gib(self) -> float:
    if self.platform == "gpu":
      return aot_gpu.memory_gib(self.generation)
    return GENERATIONS[self.generation].hbm_gib

  @property
  def total_chips(self) -> int:
    return self.chips * self.num_slices


def _slice_shape(chips: int, dims: int) -> tuple[int, ...]:
  """The physical chip grid of a slice: 2-D for v5e/v6e (4 -> 2x2, 8 -> 2x4, 256 -> 16x16),
  3-D for v4/v5p (4 -> 2x2x1, 8 -> 2x2x2, 16 -> 2x2x4, 64 -> 4x4x4): the smallest side
  doubles, the last one first."""
  if chips == 1:
    return (1,) * dims
  shape = [1] * dims
  shape[0] = shape[1] = 2
  n = 4
  while n < chips:
    i = max(j for j in range(dims) if shape[j] == min(shape))
    shape[i] *= 2
    n *= 2
  if n != chips:
    raise ValueError
  return tuple(shape) if dims == 3 else tuple(sorted(shape))


def parse_topology(name: str, num_slices: int = 1) -> Target:
  g = re.fullmatch(r"([a-z]\d+)-(\d+)", name or "")
  if g and g.group(1) in aot_gpu.GPUS:
    shape = aot_gpu.hosts(name, g.group(1), int(g.group(2)), num_slices)
    return Target(name, g.group(1), int(g.group(2)), 1, shape)
  m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name or "")
  if not m:
    raise runner.ConfigError(
      f"--topology={name!r}: expected a Cloud TPU accelerator type, one of "
      f"{sorted(GENERATIONS)} followed by -N, e.g. v5e-256, v4-64, v5p-128, or a GPU "
      f"target, one of {sorted(aot_gpu.GPUS)} followed by -N GPUs, e.g. h100-8, h200-1, a100-16"
    )
  gen = GENERATIONS[m.group(1)]
  n = int(m.group(2))
  chips = n // gen.cores_per_chip
  try:
    if n % gen.cores_per_chip or chips < 1 or chips & (chips - 1) or (1 < chips < 4):
      raise ValueError
    shape = _slice_shape(chips, gen.dims)
  except ValueError:
    raise runner.ConfigError(
      f"--topology={name}: {m.group(1)} slices come in powers of two of at least 4 chips "
      f"({'v4-8, v4-16, ...' if gen.cores_per_chip == 2 else m.group(1) + '-4, -8, ..., -256'})"
    ) from None
  if num_slices < 1:
    raise runner.ConfigError(f"--num_slices={num_slices} must be at least 1")
  return Target(name, m.group(1), chips, num_slices, shape)


def target_devices(target: Target) -> list:
  """Compile-only devices of the target (libtpu; no TPU, no metadata server needed; or jax's
  CUDA plugin; no GPU, no NVIDIA library needed)."""
  if target.platform == "gpu":
    return aot_gpu.devices(target.name, target.generation, target.shape)
  # libtpu looks for the slice it runs on at load; naming the target quiets its warnings.
  kind = {"v5e": "v5litepod"}.get(target.generation, target.generation)
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{kind}-{target.name.split('-')[1]}")
  if importlib.util.find_spec("libtpu") is None:
    raise runner.ConfigError(
      f'--topology={target.name}: TPU targets need libtpu: pip install -e ".[tpu]" '
      "(an optional extra, ~700 MB; see docs/aot.md)"
    )
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  gen = GENERATIONS[target.generation]
  full = all(s % 4 == 0 for s in target.shape) if gen.dims == 3 else False
  wrap = (full,) * 3 if gen.dims == 3 else (target.shape[0] >= 16, target.shape[1] >= 16, False)
  topo = topologies.get_topology_desc(
    platform="tpu",
    topology_name=f"{gen.topology_prefix}:{'x'.join(map(str, target.shape))}",
    chip_config_name=gen.chip_config,
    chips_per_host_bounds=(2, 2, 1) if target.chips >= 4 else (1, 1, 1),
    num_slices=target.num_slices,
    wrap=wrap,
  )
  return list(topo.devices)


# --------------------------------------------------------------------------- stand-ins
# Methods whose paper setting reads targets from a token cache (python -m mim_jax.tokenize)
# rather than running the tokenizer in the step: MaPeT's k-CLIP RN50x64 at 448 px
# (configs/mapet_vitb.py). Where neither cache nor tokenizer is named, the stand-in follows it.
_CACHED_BY_DEFAULT = ("mapet",)


def use_standins(config) -> list[str]:
  """Replaces every file the config names (data, teacher, tokenizer, token cache, perceptual
  network) by a stand-in of the same shape; returns what was replaced, for the report."""
  notes = []
  d = config.data
  notes.append(f"data: not read ({d.source} {d.get('path', '') or ''}".rstrip() + ")")
  d.source, d.path, d.worker_count = "embedded", "", 0
  if "tokenizer" in config:
    t = config.tokenizer
    if t.get("cache", "") or (not t.get("path", "") and config.method.name in _CACHED_BY_DEFAULT):
      t.cache = f"random:{int(t.get('k', 0) or 8192)}"
      notes.append(f"tokenizer.cache: {t.cache} (ids drawn at random)")
    else:
      t.path = "random:"
      if "build_if_missing" in t:
        t.build_if_missing = False
      notes.append(f"tokenizer.path: random: (an untrained {t.kind} tokenizer)")
  if "teacher" in config and config.teacher.get("kind", "clip") == "clip":
    t = config.teacher
    if t.path or not t.get("random_init", ""):
      arch = t.get("arch", "") or "ViT-B/16"
      t.path, t.random_init = "", f"random:{arch},image_size={d.second_image_size}"
    notes.append(f"teacher: {t.random_init} (untrained)")
  if "perceptual" in config and not config.perceptual.path.startswith("random:"):
    config.perceptual.path = "random:B/16"
    notes.append("perceptual.path: random:B/16 (an untrained ViT-B/16)")
  return notes


def build_abstract_method(config):
  """(method, abstract frozen inputs): the method is built while tracing, so that the
  stand-ins' weights drawn with jax are never allocated."""
  built = {}

  def build():
    built["method"] = methods.build(config, workdir=None, source=None)
    return built["method"].consts()

  consts = jax.eval_shape(build)
  return built["method"], consts


def sample_batch(config, method) -> dict:
  """Per-example arrays of one synthetic example, made as the loader makes them."""
  size = max(int(config.data.image_size), int(config.data.get("second_image_size", 0) or 0))
  image = np.random.default_rng(0).integers(0, 256, (size, size, 3), np.uint8)
  example = {"image": image, "label": np.int32(0), "index": np.int64(0)}
  if "tokenizer" in config and str(config.tokenizer.get("cache", "")).startswith("random:"):
    example = method.wrap_source([example])[0]
  prepare = data_pipeline._TransformAndPrepare(  # pylint: disable=protected-access
    transforms.TwoViewTransform.from_config(config.data), method.prepare
  )
  return prepare(example, np.random.SeedSequence(0))


# --------------------------------------------------------------------------- compile
def _abstract(tree, shardings):
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, jax.dtypes.canonicalize_dtype(a.dtype), sharding=s),
    tree,
    shardings,
  )


def lower_step(config, devices):
  """(the runner's guarded step lowered for `devices`, the method, the abstract state): the
  train step of `config` (stand-ins in place) with the shardings the trainer would give it."""
  mesh = sharding.make_mesh(config.mesh, devices)
  dp = sharding.data_parallel_size(mesh)
  if config.batch_size % dp:
    raise runner.ConfigError(
      f"config.batch_size={config.batch_size} is not divisible by the data-parallel size "
      f"{dp} (config.mesh {dict(mesh.shape)})"
    )
  method, consts_abs = build_abstract_method(config)
  example = sample_batch(config, method)
  b = config.batch_size
  local = {k: np.asarray(v) for k, v in example.items()}
  sample = {
    k: jax.ShapeDtypeStruct((b,) + v.shape, jax.dtypes.canonicalize_dtype(v.dtype))
    for k, v in local.items()
    if not k.startswith("_")
  }
  trainer = train.Trainer(config, mesh, method)
  state_abs, state_sh = trainer.abstract_state(sample)
  frozen_sh = jax.tree.map(lambda _: sharding.replicated(mesh), consts_abs)
  job = runner.Job(
    config=config,
    workdir="",
    mesh=mesh,
    rules=trainer.rules,
    state_abs=state_abs,
    state_sh=state_sh,
    init_state=lambda: None,
    step=trainer.step_fn(),
    split_step=trainer.split_step(),
    loader=None,
    images_per_step=b,
    frozen_sh=frozen_sh,
  )
  jitted, guarded_sh = runner.guarded_jit(job)
  state = _abstract(dict(state_abs, guard=runner.guard_abstract()), guarded_sh)
  batch_sh = sharding.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh) for k, v in sample.items()}
  batch["_bad"] = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sh)
  frozen = _abstract(consts_abs, frozen_sh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
    lowered = jitted.lower(state, frozen, batch)
  return lowered, method, state_abs


_UNTILED_DOT = "Couldn't find output tile sizes"
_OOM = re.compile(r"([\d.]+)([KMGT])i?B?\)? exceeds available HBM \(([\d.]+)([KMGT])")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _shortfall(message: str, target: Target) -> str:
  m = _OOM.search(message)
  if m:
    need = float(m.group(1)) * _UNITS[m.group(2)] / GIB
    have = float(m.group(3)) * _UNITS[m.group(4)] / GIB
    return (
      f"needs {need:.1f} GiB per chip of HLO temporaries alone, {target.generation} has "
      f"{target.hbm_gib:g} ({have:.2f} usable)"
    )
  first = next((line for line in message.splitlines() if "RESOURCE_EXHAUSTED" in line), message)
  return first.strip()[:300]


def _remedy(config) -> str:
  remat = "" if config.model.get("remat") else "--config.model.remat=True, "
  return f"try {remat}a larger mesh.fsdp or a smaller config.batch_size"


def memory_per_device(compiled) -> dict[str, int]:
  """Bytes per device of a compiled step from XLA's memory analysis: arguments, outputs,
  aliased (outputs that reuse donated arguments), temp, code, and their total."""
  mem = compiled.memory_analysis()
  out = {
    "arguments": mem.argument_size_in_bytes,
    "outputs": mem.output_size_in_bytes,
    "aliased": mem.alias_size_in_bytes,
    "temp": mem.temp_size_in_bytes,
    "code": mem.generated_code_size_in_bytes,
  }
  out["total"] = sum(out[k] for k in ("arguments", "outputs", "temp", "code")) - out["aliased"]
  return out


def compile_for(lowered, target: Target):
  """(compiled, the compiler options it took): `lowered.compile()`; for a GPU target whose
  compile fails on an untileable dot, again with cuBLAS for the matmuls. Without a GPU to
  autotune on, XLA:GPU may pick a Triton tiling it cannot realise for some dots
  (caev2_vitb at 128 per GPU on h200-1; the real H200 compiled it, BENCHMARKS.md §13)."""
  try:
    return lowered.compile(), {}
  except Exception as e:  # pylint: disable=broad-except  # XLA raises JaxRuntimeError
    if target.platform != "gpu" or _UNTILED_DOT not in str(e):
      raise
  options = {"xla_gpu_enable_triton_gemm": False}
  logging.warning("XLA:GPU could not tile a dot; compiling again with %s", options)
  return lowered.compile(compiler_options=options), options


def analyse(config, target: Target, devices) -> dict:
  """Compiles the step; the report (raises DoesNotFit)."""
  t0 = time.time()
  lowered, method, state_abs = lower_step(config, devices)
  try:
    compiled, options = compile_for(lowered, target)
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" in str(e):
      raise DoesNotFit(
        f"{_describe(config)} on {target.name}: {_shortfall(str(e), target)}; {_remedy(config)}"
      ) from None
    raise
  compile_s = time.time() - t0
  per_chip = memory_per_device(compiled)
  total = per_chip.pop("total")
  # XLA:GPU compiles a step of any size (device memory is checked only when it runs): the
  # total against the device's memory decides, for every target alike.
  if total > target.hbm_gib * GIB:
    has = f"{target.hbm_gib:.1f} GiB" if target.platform == "gpu" else f"{target.hbm_gib:g}"
    raise DoesNotFit(
      f"{_describe(config)} on {target.name}: needs {total / GIB:.1f} GiB per {target.unit}, "
      f"{target.generation} has {has}; {_remedy(config)}"
    )
  b = config.batch_size
  if target.platform == "gpu":
    # XLA:GPU has no cost analysis, compiled or lowered: count the same step's HLO lowered for
    # one CPU device, before optimisation (all devices together).
    xla_flops = xla_step_flops(config)
    source = "lowered HLO before optimisation (one CPU device, layers unrolled)"
  else:
    xla_flops = _xla_flops(config, compiled, devices)
    xla_flops = xla_flops * target.total_chips if xla_flops else None
    source = "compiled step" + (" (layers unrolled)" if config.model.get("scan_layers") else "")
  analytic = flops_lib.step_flops(config)
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state_abs["params"]))
  report = {
    "config": _describe(config),
    "topology": target.name,
    "num_slices": target.num_slices,
    "platform": target.platform,
    "chips": target.total_chips,
    "device_kind": devices[0].device_kind,
    "processes": len({d.process_index for d in devices}),
    "hbm_per_chip_gib": target.hbm_gib,
    "memory_per_chip_gib": {k: v / GIB for k, v in per_chip.items()} | {"total": total / GIB},
    "fits": True,
    "global_batch": b,
    "batch_per_chip": b / target.total_chips,
    "dtype": config.dtype,
    "remat": bool(config.model.get("remat", False)),
    "scan_layers": bool(config.model.get("scan_layers", False)),
    "mesh": dict(sharding.make_mesh(config.mesh, devices).shape),
    "trainable_params": params,
    "xla_gflops_per_image": xla_flops / b / 1e9 if xla_flops else None,
    "xla_flops_source": source,
    "analytic_gflops_per_image": analytic["total"] / b / 1e9,
    "analytic_gflops_per_image_parts": {k: v / b / 1e9 for k, v in analytic.items()},
    "compile_s": compile_s,
    "compiler_options": options,
    "standins": [],
  }
  return report


def _xla_flops(config, compiled, devices) -> float | None:
  """FLOPs per device of one step from XLA's cost analysis of the compiled step. Under
  scan_layers XLA counts the layer loop's body once, so the same step with the layers
  unrolled is compiled for the same devices and counted instead."""
  if not config.model.get("scan_layers", False):
    return _flops_of(compiled)
  unscanned = config.copy_and_resolve_references()
  with unscanned.unlocked():
    unscanned.model.scan_layers = False
  lowered, _, _ = lower_step(unscanned, devices)
  return _flops_of(lowered.compile())


def xla_step_flops(config) -> float | None:
  """XLA's FLOPs of one whole step of `config` (stand-ins already in place) with the layers
  unrolled, lowered for one host CPU device and not compiled: the cost analysis of the HLO
  before optimisation, within a few % of a compiled count (elementwise fusion, the
  optimizer); cheap enough to check mim_jax/flops.py against every paper config."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.model.scan_layers = False
    for axis in c.mesh:
      c.mesh[axis] = 1
  lowered, _, _ = lower_step(c, jax.devices("cpu")[:1])
  return _flops_of(lowered)


def _flops_of(stage) -> float | None:
  try:
    analysis = stage.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend has one
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  value = (analysis or {}).get("flops")
  return float(value) if value and value > 0 else None


def _describe(config) -> str:
  return f"{config.method.name} {config.model.variant} batch {config.batch_size} {config.dtype}"


def summary_line(r: dict) -> str:
  m = r["memory_per_chip_gib"]
  xla = f"{r['xla_gflops_per_image']:.1f}" if r["xla_gflops_per_image"] else "n/a"
  gpu = r.get("platform") == "gpu"
  unit, hbm = (
    ("GPU", f"{r['hbm_per_chip_gib']:.1f}") if gpu else ("chip", f"{r['hbm_per_chip_gib']:g}")
  )
  return (
    f"{r['config']} on {r['topology']} ({r['chips']} {unit}{'s' * (r['chips'] != 1)}, "
    f"{r['batch_per_chip']:g} per {unit}): fits, {m['total']:.2f} of {hbm} GiB per {unit} "
    f"(arguments {m['arguments']:.2f}, temp {m['temp']:.2f}); {xla} GFLOP per image "
    f"(XLA{', lowered HLO' if gpu else ''}), {r['analytic_gflops_per_image']:.1f} analytic; "
    f"compiled in {r['compile_s']:.0f} s"
    + "".join(f", {k}={v}" for k, v in (r.get("compiler_options") or {}).items())
  )


def run(config, topology: str, num_slices: int = 1) -> dict:
  """The report of `config` on `topology` (raises ConfigError, DoesNotFit)."""
  target = parse_topology(topology, num_slices)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    notes = use_standins(config)
  train.validate_config(config)
  devices = target_devices(target)
  try:
    report = analyse(config, target, devices)
  except ValueError as e:
    raise runner.ConfigError(str(e).splitlines()[0]) from e
  report["standins"] = notes
  return report


def _define_flags():
  """The command's own flags, defined only when it runs: absl flags are global, and --out is
  also another module's (tests import both)."""
  flags.DEFINE_string(
    "topology",
    None,
    "Target: a Cloud TPU accelerator type (v5e-256, v4-64, v5p-128) or <gpu>-<count> for "
    "a100, h100, h200 (h100-8: one host of 8; h200-1; h100-16: 2 hosts of 8).",
  )
  flags.DEFINE_integer("num_slices", 1, "Slices of a TPU --topology (multislice).")
  flags.DEFINE_string("out", "", "Write the report as JSON here.")


def main(argv):
  f = flags.FLAGS
  if len(argv) > 1:
    print(f"error: unexpected arguments: {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  for name, value in (("--config", runner.CONFIG.value), ("--topology", f.topology)):
    if value is None:
      print(f"error: {name} is required", file=sys.stderr)
      sys.exit(2)
  aot_gpu.restart_with_plugin(f.topology)
  try:
    report = run(runner.CONFIG.value, f.topology, f.num_slices)
  except runner.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except DoesNotFit as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if f.out:
    with open(f.out, "w") as out:
      json.dump(report, out, indent=1)
  logging.info("report: %s", json.dumps(report))
  print(summary_line(report))


if __name__ == "__main__":
  _define_flags()
  flags.adopt_module_key_flags(runner)  # --config, --workdir in --help
  app.run(main, flags_parser=runner.parse_flags)
