"""Helpers shared by the files in `configs/`: argument parsing, defaults, `runlocal`.

A config file is `configs/<experiment>.py` with `get_config(arg: str = '')`. The
argument after ':' on the command line (`--config=configs/ccvit_vitb.py:runlocal`) is a
comma-separated list of flags and key=value pairs, parsed by `parse_arg` (big_vision's
convention).
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections as mlc

# Where the small real images live in the developers' and CI checkouts.
SHARED_DATA_DIR = os.environ.get(
  "MIM_JAX_SHARED_DATA",
  os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data"),
)
IMAGENET_TRAIN_SIZE = 1_281_167


CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_module(name_or_path: str):
  """Imports a config file ('ccvit_vitb' or a path); configs/ is not a Python package."""
  path = (
    name_or_path
    if name_or_path.endswith(".py")
    else os.path.join(CONFIGS_DIR, name_or_path + ".py")
  )
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(name_or_path: str, arg: str = "") -> mlc.ConfigDict:
  """`get_config(arg)` of a config file, as `--config=<file>:<arg>` would give it."""
  return load_module(name_or_path).get_config(arg)


def parse_arg(arg: str, **spec) -> mlc.ConfigDict:
  """Parses 'runlocal,variant=B/16' into a ConfigDict typed by the defaults in `spec`."""
  out = mlc.ConfigDict(dict(spec))
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in spec:
      raise ValueError(f"config argument '{key}' is unknown; known: {sorted(spec)}")
    default = spec[key]
    if not _:
      if not isinstance(default, bool):
        raise ValueError(f"config argument '{key}' needs a value ({key}=...)")
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = type(default)(value)
  return out


def steps_for_epochs(epochs: float, batch_size: int, num_examples: int = IMAGENET_TRAIN_SIZE):
  """Optimizer steps for `epochs` passes, counted like BEiT (len(dataset) // batch)."""
  return int(epochs * (num_examples // batch_size))


def shared_npz(name: str = "imagenette2_32.npz") -> str | None:
  path = os.path.normpath(os.path.join(SHARED_DATA_DIR, name))
  return path if os.path.exists(path) else None


def add_runner_fields(c: mlc.ConfigDict) -> None:
  """Fields of mim_jax/runner.py that every config (pre-training, evaluation) has."""
  # Multi-process: jax.distributed from these fields, else from JAX_COORDINATOR_ADDRESS /
  # JAX_NUM_PROCESSES / JAX_PROCESS_ID, else from an auto-detected cluster (SLURM, Cloud
  # TPU, ...); see README "Running on a pod / cluster".
  c.distributed = False
  c.coordinator_address = ""  # host:port of process 0
  c.num_processes = 0  # 0: from the environment / cluster
  c.process_id = -1  # -1: from the environment / cluster
  c.distributed_timeout_s = 300  # give up joining the job after this long
  c.local_device_ids = ""  # "0,1,...": devices of this process (default: all)
  # A step whose loss, gradient or updated parameters are non-finite is never applied; the
  # run stops after more than this many such steps (large runs allow a few).
  c.max_nonfinite_skips = 0
  # TensorBoard event files beside metrics.jsonl (through clu, which imports TensorFlow:
  # ~3.5 s of CPU at start-up); False keeps metrics.jsonl and the console only.
  c.tensorboard = True
  # A jax.profiler trace of steps start_step .. start_step+num_steps-1 in DIR/profile
  # (0: none); mim_jax/profiler.py.
  c.profile = mlc.ConfigDict(dict(start_step=0, num_steps=3))
  # Persistent compilation cache: 'default' (~/.cache/mim_jax/jax or
  # $JAX_COMPILATION_CACHE_DIR), 'workdir' (DIR/jax_cache), a path, or '' (off);
  # mim_jax/compile_cache.py.
  c.compilation_cache = "default"


def base_config() -> mlc.ConfigDict:
  """Fields every pre-training config has (methods add their own)."""
  c = mlc.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.batch_size = 2048  # global, over all processes and devices
  c.dtype = "float32"  # compute dtype: 'float32' | 'bfloat16'
  c.vis_every = 0  # a PNG of the method's view every N steps (0: at the end)
  # A `python -m mim_jax.export --format=full` folder: a new run starts from its parameters
  # and mutable state at its step (the optimizer's moments start at zero); a workdir that
  # already has a checkpoint resumes from that instead (docs/export.md).
  c.init_from = ""
  add_runner_fields(c)

  # Device mesh: axis sizes (-1: all remaining devices). The batch is split over
  # ('data', 'fsdp'); parameters are split over 'fsdp' by `sharding_rules`.
  c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1))
  # Logical axis name -> mesh axes. Parameters carry 'embed', 'mlp', 'qkv', ...;
  # activations 'act_batch', 'act_len', 'act_embed'. With fsdp=1 everything but the
  # batch is replicated (data parallel); with fsdp>1 the width axis is sharded (FSDP).
  c.sharding_rules = (
    ("act_batch", ("data", "fsdp")),
    ("embed", "fsdp"),
  )

  c.model = mlc.ConfigDict()
  c.model.variant = "B/16"  # T/S/B/L + '/' + patch size
  c.model.width = 0  # 0: from the variant
  c.model.depth = 0
  c.model.heads = 0
  c.model.layer_scale_init = 0.1
  c.model.drop_path_rate = 0.0
  c.model.scan_layers = False
  c.model.remat = False

  c.optim = mlc.ConfigDict()
  c.optim.lr = 1.5e-3
  c.optim.min_lr = 1e-5
  c.optim.warmup_steps = 100
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.05
  c.optim.clip_grad_norm = 3.0
  c.optim.no_decay_names = ("cls_token", "pos_embed")

  c.data = mlc.ConfigDict()
  c.data.source = "tfds"  # 'tfds' | 'imagefolder' | 'npz' | 'embedded'
  c.data.name = "imagenet2012"  # tfds name
  c.data.path = ""  # imagefolder root or npz file
  c.data.data_dir = ""  # tfds data_dir ('' -> TFDS default)
  c.data.split = "train"
  c.data.image_size = 224
  c.data.second_image_size = 224  # the tokenizer's view
  c.data.crop_scale = (0.2, 1.0)
  c.data.crop_ratio = (3 / 4, 4 / 3)
  c.data.hflip = True
  c.data.color_jitter = 0.4
  c.data.interpolation = "bicubic"
  c.data.second_interpolation = "bicubic"
  c.data.worker_count = 8
  c.data.length = 1024  # virtual length of the embedded photo source
  # Unreadable examples are replaced by the next readable one (the same on every resume and
  # process count) and counted; the run stops when they exceed this fraction of those seen.
  c.data.max_bad_fraction = 0.01

  # kNN top-1 of the encoder every `every` steps (0: off), mim_jax/evaluation/monitor.py.
  c.knn_monitor = mlc.ConfigDict(
    dict(
      every=0,
      num_train=10_000,
      num_test=2_000,
      k=20,
      temperature=0.07,
      pool="mean",
      train_split="train",
      test_split="validation",
      crop_pct=0.875,
      batch_size=256,
    )
  )
  return c


def runlocal(c: mlc.ConfigDict, *, depth: int = 4, width: int = 128, heads: int = 4) -> None:
  """Shrinks `c` in place to a 2-core CPU smoke run on small real images.

  Uses ../shared/data/imagenette2_32.npz when present (32 px, patch 4), else the photos
  embedded in installed packages (64 px, patch 8). Method fields that depend on the
  patch grid are rescaled by the method's own `runlocal` hook.
  """
  npz = shared_npz()
  if npz:
    c.data.source, c.data.path, c.data.split = "npz", npz, "train"
    size, patch = 32, 4
  else:
    c.data.source, c.data.path = "embedded", ""
    size, patch = 64, 8
  c.data.image_size = c.data.second_image_size = size
  c.data.worker_count = 0
  c.knn_monitor.update(
    test_split="test" if npz else "train",
    crop_pct=1.0,
    batch_size=200,
    num_train=4000 if npz else 0,
    num_test=1000 if npz else 0,
  )
  c.model.variant = f"T/{patch}"
  c.model.width, c.model.depth, c.model.heads = width, depth, heads
  c.batch_size = 32
  c.total_steps = 60
  c.log_every = 10
  c.checkpoint_every = 30
  c.optim.warmup_steps = 10
  c.optim.lr = 1e-3
