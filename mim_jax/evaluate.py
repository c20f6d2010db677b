r"""Evaluation of pre-trained encoders: kNN, linear probe, fine-tuning.

  python -m mim_jax.evaluate --config=configs/eval/knn.py --config.init=WORKDIR --workdir=OUT
  python -m mim_jax.evaluate --config=configs/eval/linear_probe.py --config.init=X.pth ...
  python -m mim_jax.evaluate --config=configs/eval/finetune.py:runlocal --config.init=... ...

`config.init` is a mim_jax pre-training workdir, an official BEiT v2 / CAE v2 PyTorch
checkpoint, a converted .npz, or 'random' (the random-init baseline); see
mim_jax/evaluation/backbones.py. The linear probe and fine-tuning loop on the same runner as
pre-training (mim_jax/runner.py): one-line errors naming the config field before anything
is compiled, the ('data', 'fsdp') mesh and sharding rules, checkpoints with the data
position (re-run the same command to resume exactly, on any process count), SIGTERM saves
and exits, DIR/metrics.jsonl + TensorBoard. Test-split evaluation runs every
`config.eval_every` steps and at the end (rows carry `top1`, `top5`, `test_loss`); the
final numbers are written to DIR/results.json.
"""

from __future__ import annotations

from mim_jax import preemption

preemption.install_if_main(__name__)  # SIGTERM is handled from the first line on
# The handler must be in place before the slow imports below.
# ruff: noqa: E402

import json
import os

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import checkpoint as ckpt_lib
from mim_jax import runner
from mim_jax import sharding
from mim_jax.data import pipeline
from mim_jax.data import sources as data_sources
from mim_jax.evaluation import augment
from mim_jax.evaluation import backbones
from mim_jax.evaluation import extract
from mim_jax.evaluation import finetune
from mim_jax.evaluation import knn
from mim_jax.evaluation import linear_probe as lp
from mim_jax.evaluation import lr_decay
from mim_jax.models import vit

PROTOCOLS = ("knn", "linear_probe", "finetune")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ConfigError = runner.ConfigError


# --------------------------------------------------------------------------- config
def validate_config(c) -> None:
  """Cheap checks whose messages name the field; nothing is read or compiled."""
  if c.protocol not in PROTOCOLS:
    raise ConfigError(f"config.protocol must be one of {PROTOCOLS}, got {c.protocol!r}")
  if not c.init:
    raise ConfigError(
      "config.init is empty: pass a pre-training workdir, a .pth/.npz "
      "checkpoint, or 'random' for the random-init baseline"
    )
  if c.init != "random" and not os.path.exists(c.init):
    raise ConfigError(f"config.init: {c.init} does not exist")
  ints = ["eval_batch_size", "data.num_classes", "data.image_size"]
  if c.protocol != "knn":
    ints += ["batch_size", "total_steps", "log_every", "checkpoint_every", "keep_checkpoints"]
  for name in ints:
    v = c[name.split(".")[0]][name.split(".")[1]] if "." in name else c[name]
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ConfigError(f"config.{name} must be a positive integer, got {v!r}")
  if c.dtype not in _DTYPES:
    raise ConfigError(f"config.dtype must be 'float32' or 'bfloat16', got {c.dtype!r}")
  if c.pool not in lp.POOLS:
    raise ConfigError(f"config.pool must be one of {lp.POOLS}, got {c.pool!r}")
  if c.model.scan_layers:
    raise ConfigError(
      "config.model.scan_layers must be False for evaluation (layer-wise lr "
      "decay and the checkpoint converters work on unrolled blocks)"
    )
  if c.protocol == "knn":
    if not (isinstance(c.knn.k, int) and c.knn.k > 0):
      raise ConfigError(f"config.knn.k must be a positive integer, got {c.knn.k!r}")
    if not c.knn.temperature > 0:
      raise ConfigError(f"config.knn.temperature must be positive, got {c.knn.temperature!r}")
  else:
    if c.protocol == "linear_probe" and c.optim.name not in ("adamw", "lars"):
      raise ConfigError(f"config.optim.name must be 'adamw' or 'lars', got {c.optim.name!r}")
    for f in ("lr", "min_lr", "weight_decay"):
      if not isinstance(c.optim[f], (int, float)) or c.optim[f] < 0:
        raise ConfigError(f"config.optim.{f} must be a non-negative number, got {c.optim[f]!r}")
    if c.protocol == "linear_probe" and not (c.optim.lr or c.optim.base_lr):
      raise ConfigError("config.optim.lr and config.optim.base_lr are both 0")
    if c.protocol == "finetune":
      if not 0 < c.optim.layer_decay <= 1:
        raise ConfigError(
          f"config.optim.layer_decay must be in (0, 1], got {c.optim.layer_decay!r}"
        )
      if (c.aug.mixup > 0 or c.aug.cutmix > 0) and c.batch_size % 2:
        raise ConfigError(
          f"config.batch_size={c.batch_size} must be even with mixup/cutmix "
          f"(images are mixed with their mirror in the batch)"
        )
      if not 0 <= c.ema_decay < 1:
        raise ConfigError(f"config.ema_decay must be in [0, 1), got {c.ema_decay!r}")
  for split in (c.data.train_split, c.data.test_split):
    try:
      data_sources.validate_data_config(c.data, split)
    except (ValueError, FileNotFoundError) as e:
      raise ConfigError(str(e).splitlines()[0]) from e


def _check_batches(c, mesh) -> None:
  dp = sharding.data_parallel_size(mesh)
  sizes = [("eval_batch_size", c.eval_batch_size)]
  if c.protocol != "knn":
    sizes.append(("batch_size", c.batch_size))
  for name, size in sizes:
    if size % dp or size % jax.process_count():
      raise ConfigError(
        f"config.{name}={size} is not divisible by the data-parallel size "
        f"{dp} (config.mesh {dict(mesh.shape)}) and the "
        f"{jax.process_count()} processes"
      )


def _fingerprint(c, spec) -> dict:
  fp = {
    "protocol": c.protocol,
    "init": os.path.abspath(c.init) if c.init != "random" else "random",
    "init_step": c.get("init_step", 0),
    "spec": spec.to_json(),
    "num_classes": c.data.num_classes,
    "pool": c.pool,
    "image_size": c.data.image_size,
  }
  if c.protocol == "linear_probe":
    fp["precompute_features"] = c.probe.precompute_features
  return fp


class _Context:
  """What every protocol needs: config, mesh, rules, encoder (spec, host params), data."""

  def __init__(self, c, workdir):
    self.c, self.workdir = c, workdir
    self.mesh = sharding.make_mesh(c.mesh)
    _check_batches(c, self.mesh)
    self.rules = sharding.rules_tuple(c.sharding_rules)
    self.params, self.spec = backbones.load(c.init, c.model, step=c.get("init_step") or None)
    if c.data.image_size % self.spec.patch_size:
      raise ConfigError(
        f"config.data.image_size={c.data.image_size} is not a multiple of the "
        f"encoder's patch size {self.spec.patch_size}"
      )
    self.grid = (c.data.image_size // self.spec.patch_size,) * 2
    if (
      self.params is not None
      and self.spec.grid
      and self.spec.grid != self.grid
      and c.protocol != "finetune"
    ):
      raise ConfigError(
        f"config.data.image_size={c.data.image_size} gives a {self.grid} patch "
        f"grid but the encoder was pre-trained on {self.spec.grid}; only "
        f"fine-tuning resizes position tables"
      )
    self.dtype = _DTYPES[c.dtype]
    self.train_source = data_sources.build_source(c.data, c.data.train_split)
    self.test_source = data_sources.build_source(c.data, c.data.test_split)
    os.makedirs(workdir, exist_ok=True)
    ckpt_lib.check_config_compatible(workdir, _fingerprint(c, self.spec))
    ckpt_lib.write_config(workdir, c.to_json_best_effort(), _fingerprint(c, self.spec))
    logging.info("encoder %s from %s; mesh %s", self.spec, c.init, dict(self.mesh.shape))

  def resize(self) -> int:
    d = self.c.data
    return d.eval_resize or int(d.image_size / d.crop_pct)

  def encoder_params(self, vit_kw: dict):
    """Frozen encoder params on the mesh (sharded by the logical rules), or a random init."""
    model = vit.VisionTransformer(**vit_kw)
    sample = jnp.zeros((1, self.c.data.image_size, self.c.data.image_size, 3), self.dtype)
    params_abs, params_sh = runner.logical_params(model, sample, self.mesh, self.rules)
    if self.params is None:
      init = jax.jit(lambda r: nn.unbox(model.init(r, sample))["params"], out_shardings=params_sh)
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        return init(jax.random.PRNGKey(self.c.seed))
    placed, fresh = backbones.merge_into(params_abs, self.params, place=params_sh)
    if fresh:
      raise ConfigError(f"config.init: the checkpoint lacks {fresh[:3]}")
    return placed

  def features(self, params, vit_kw: dict, source):
    fn = extract.encoder_fn(vit_kw, self.c.pool)
    return extract.extract_features(
      fn,
      params,
      source,
      self.mesh,
      batch_size=self.c.eval_batch_size,
      image_size=self.c.data.image_size,
      resize_size=self.resize(),
      interpolation=self.c.data.interpolation,
      worker_count=self.c.data.worker_count,
    )

  def check_labels(self, labels) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= self.c.data.num_classes):
      raise ConfigError(
        f"config.data.num_classes={self.c.data.num_classes} but the labels "
        f"span [{labels.min()}, {labels.max()}]"
      )


def _write_results(workdir: str, c, spec, row: dict) -> dict:
  result = {"protocol": c.protocol, "init": c.init, "encoder": json.loads(spec.to_json()), **row}
  if jax.process_index() == 0:
    path = os.path.join(workdir, "results.json")
    with open(path + ".tmp", "w") as f:
      json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
  logging.info("results: %s", json.dumps(row))
  return result


# --------------------------------------------------------------------------- kNN
def run_knn(ctx: _Context) -> dict:
  c = ctx.c
  vit_kw = ctx.spec.vit_kwargs(dtype=ctx.dtype)
  params = ctx.encoder_params(vit_kw)
  train_x, train_y = ctx.features(params, vit_kw, ctx.train_source)
  test_x, test_y = ctx.features(params, vit_kw, ctx.test_source)
  ctx.check_labels(np.concatenate([train_y, test_y]))
  acc = knn.knn_accuracy(
    train_x,
    train_y,
    test_x,
    test_y,
    num_classes=c.data.num_classes,
    k=c.knn.k,
    temperature=c.knn.temperature,
  )
  row = {
    "knn_top1": acc["top1"],
    "knn_top5": acc.get("top5"),
    "k": c.knn.k,
    "temperature": c.knn.temperature,
    "train_examples": len(train_y),
    "test_examples": len(test_y),
  }
  with open(os.path.join(ctx.workdir, "metrics.jsonl"), "a") as f:
    f.write(json.dumps(dict(step=0, **row)) + "\n")
  return row


# --------------------------------------------------------------------------- linear probe
class FeatureSource:
  """Precomputed features as a grain random-access source."""

  def __init__(self, features: np.ndarray, labels: np.ndarray, name: str):
    self.features, self.labels, self.name = features, labels, name

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return {"feature": self.features[i], "label": self.labels[i]}

  def __repr__(self):
    return f"FeatureSource({self.name}, n={len(self)}, dim={self.features.shape[1]})"


def _cached_features(ctx, params, vit_kw, split_name, source):
  """Features of a split, computed once per workdir (a resumed run reuses them)."""
  path = os.path.join(ctx.workdir, f"features_{split_name}.npz")
  if os.path.exists(path):
    with np.load(path) as f:
      return f["x"], f["y"]
  x, y = ctx.features(params, vit_kw, source)
  if jax.process_index() == 0:
    np.savez(path + ".tmp.npz", x=x, y=y)
    os.replace(path + ".tmp.npz", path)
  return x, y


def run_linear_probe(ctx: _Context) -> dict:
  c = ctx.c
  vit_kw = ctx.spec.vit_kwargs(dtype=ctx.dtype)
  backbone = ctx.encoder_params(vit_kw)
  head = lp.ProbeHead(c.data.num_classes, batch_norm=c.probe.batch_norm)
  tx, schedule = lp.make_probe_optimizer(c.optim, c.total_steps, c.batch_size)
  repl = sharding.replicated(ctx.mesh)
  dim = ctx.spec.embed_dim
  variables = jax.eval_shape(
    lambda: head.init(jax.random.PRNGKey(0), jnp.zeros((2, dim)), train=False)
  )
  stats_abs = variables.get("batch_stats", {})
  state_abs, state_sh = runner.state_shardings(
    tx,
    variables["params"],
    jax.tree.map(lambda _: repl, variables["params"]),
    ctx.mesh,
    extra={"batch_stats": (stats_abs, jax.tree.map(lambda _: repl, stats_abs))},
  )

  if c.probe.precompute_features:
    train_x, train_y = _cached_features(ctx, backbone, vit_kw, "train", ctx.train_source)
    test_x, test_y = _cached_features(ctx, backbone, vit_kw, "test", ctx.test_source)
    ctx.check_labels(np.concatenate([train_y, test_y]))
    loader = pipeline.make_train_loader(
      FeatureSource(train_x, train_y, "train"),
      None,
      global_batch_size=c.batch_size,
      seed=c.seed,
      rows=runner.process_rows(ctx.mesh, c.batch_size),
    )
    encode = lambda frozen, batch: batch["feature"]
  else:
    transform = augment.FinetuneTrainTransform(
      c.data.image_size,
      crop_scale=c.data.crop_scale,
      interpolation=c.data.interpolation,
      hflip=c.data.hflip,
      rand_augment="",
      reprob=0.0,
    )
    loader = pipeline.make_train_loader(
      ctx.train_source,
      transform,
      global_batch_size=c.batch_size,
      seed=c.seed,
      worker_count=c.data.worker_count,
      rows=runner.process_rows(ctx.mesh, c.batch_size),
    )
    fn = extract.encoder_fn(vit_kw, c.pool)
    encode = lambda frozen, batch: jax.lax.stop_gradient(fn(frozen, batch["image"]))

  def step_fn(state, frozen, batch):  # frozen: the encoder, passed beside the probe state
    params, stats, opt_state, metrics = lp.head_step(
      head,
      tx,
      state["params"],
      state["batch_stats"],
      state["opt_state"],
      encode(frozen, batch),
      batch["label"],
    )
    metrics["lr"] = schedule(state["step"])
    return dict(
      state, step=state["step"] + 1, params=params, batch_stats=stats, opt_state=opt_state
    ), metrics

  def init_fn():
    v = head.init(jax.random.PRNGKey(c.seed), jnp.zeros((2, dim)), train=False)
    state = dict(
      step=jnp.zeros((), jnp.int32),
      params=v["params"],
      opt_state=tx.init(v["params"]),
      rng=jax.random.PRNGKey(c.seed),
      batch_stats=v.get("batch_stats", {}),
    )
    return jax.device_put(state, state_sh)

  logits_fn = jax.jit(lambda s, x: lp.head_logits(head, s["params"], s["batch_stats"], x))
  if not c.probe.precompute_features:
    image_eval = _image_evaluator(
      ctx,
      lambda p, x: lp.head_logits(
        head, p["state"]["params"], p["state"]["batch_stats"], fn(p["backbone"], x)
      ),
    )

  def evaluate_fn(state):
    if c.probe.precompute_features:
      sums = None
      for i in range(0, len(test_y), c.eval_batch_size):
        x, y = test_x[i : i + c.eval_batch_size], test_y[i : i + c.eval_batch_size]
        sums = _add_sums(
          sums,
          finetune.classification_sums(logits_fn(state, x), jnp.asarray(y), jnp.ones(len(y), bool)),
        )
      return _summarize(sums)
    return image_eval({"backbone": backbone, "state": state})

  return _run_job(
    ctx,
    state_abs,
    state_sh,
    init_fn,
    step_fn,
    loader,
    evaluate_fn,
    frozen=backbone if not c.probe.precompute_features else None,
  )


def _run_job(ctx, state_abs, state_sh, init_fn, step_fn, loader, evaluate_fn, frozen=None):
  frozen_sh = None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)
  job = runner.Job(
    config=ctx.c,
    workdir=ctx.workdir,
    mesh=ctx.mesh,
    rules=ctx.rules,
    state_abs=state_abs,
    state_sh=state_sh,
    init_state=init_fn,
    step=step_fn,
    loader=loader,
    images_per_step=ctx.c.batch_size,
    frozen=frozen,
    frozen_sh=frozen_sh,
    evaluate=evaluate_fn,
    eval_every=ctx.c.eval_every,
  )
  try:
    return runner.run(job)
  finally:
    loader.close()


def _summarize(sums: dict) -> dict:
  n = max(float(sums["count"]), 1.0)
  return {
    "top1": float(sums["correct"]) / n,
    "top5": float(sums["correct5"]) / n,
    "test_loss": float(sums["loss_sum"]) / n,
    "test_examples": int(sums["count"]),
  }


def _add_sums(total: dict | None, sums: dict) -> dict:
  sums = {k: float(v) for k, v in jax.device_get(sums).items()}
  return sums if total is None else {k: total[k] + sums[k] for k in total}


def _image_evaluator(ctx, logits_fn):
  """evaluate(params) -> top-1/5 of logits_fn(params, images_uint8) over the test split
  (padding rows excluded); compiled once, reused at every evaluation."""
  fn = jax.jit(
    lambda p, b: finetune.classification_sums(logits_fn(p, b["image"]), b["label"], b["valid"])
  )

  def evaluate_params(params) -> dict:
    loader = pipeline.make_eval_loader(
      ctx.test_source,
      extract.eval_transform(ctx.c.data.image_size, ctx.resize(), ctx.c.data.interpolation),
      global_batch_size=ctx.c.eval_batch_size,
      worker_count=ctx.c.data.worker_count,
    )
    sums = None
    with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules):
      for local in loader:
        batch = sharding.global_batch({k: local[k] for k in ("image", "label", "valid")}, ctx.mesh)
        sums = _add_sums(sums, fn(params, batch))
    loader.close()
    return _summarize(sums)

  return evaluate_params


# --------------------------------------------------------------------------- fine-tuning
def run_finetune(ctx: _Context) -> dict:
  c = ctx.c
  vit_kw = ctx.spec.vit_kwargs(
    dtype=ctx.dtype, drop_path_rate=c.model.drop_path_rate, remat=c.model.remat
  )
  if c.model.get("add_rel_pos", False) and vit_kw.get("rel_pos", "none") == "none":
    # CAE v2's fine-tuning (--rel_pos_bias): zero-initialised per-layer tables on top of
    # the encoder's fixed sin-cos positions; they are fresh parameters.
    vit_kw["rel_pos"] = "per_layer"
  model = finetune.ClassifierViT(
    vit_kw, c.data.num_classes, pool=c.pool, head_init_scale=c.head_init_scale
  )
  sample = jnp.zeros((1, c.data.image_size, c.data.image_size, 3), ctx.dtype)
  params_abs, params_sh = runner.logical_params(model, sample, ctx.mesh, ctx.rules)
  tx, schedule = lr_decay.make_finetune_optimizer(c.optim, c.total_steps, ctx.spec.depth)
  extra = {"ema": (params_abs, params_sh)} if c.ema_decay else None
  state_abs, state_sh = runner.state_shardings(tx, params_abs, params_sh, ctx.mesh, extra)
  transform = augment.FinetuneTrainTransform(
    c.data.image_size,
    crop_scale=c.data.crop_scale,
    interpolation=c.data.interpolation,
    hflip=c.data.hflip,
    rand_augment=c.data.rand_augment,
    reprob=c.data.reprob,
  )
  loader = pipeline.make_train_loader(
    ctx.train_source,
    transform,
    global_batch_size=c.batch_size,
    seed=c.seed,
    worker_count=c.data.worker_count,
    rows=runner.process_rows(ctx.mesh, c.batch_size),
  )

  def init_fn():
    init = jax.jit(lambda r: nn.unbox(model.init(r, sample))["params"], out_shardings=params_sh)
    with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules):
      params = init(jax.random.PRNGKey(c.seed))
    if ctx.params is not None:
      loaded = backbones.finetune_params(
        ctx.params, ctx.spec, ctx.grid, method=c.rel_pos_interpolation, keep_norm=c.pool == "cls"
      )
      params, fresh = backbones.merge_into(params, {"backbone": loaded}, where="", place=params_sh)
      logging.info("fresh (not pre-trained) parameters: %s", fresh)
    state = dict(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=jax.jit(tx.init, out_shardings=state_sh["opt_state"])(params),
      rng=jax.random.PRNGKey(c.seed),
    )
    if c.ema_decay:
      state["ema"] = jax.jit(finetune.ema_init, out_shardings=params_sh)(params)
    return state

  train_step = finetune.make_train_step(
    model,
    tx,
    schedule,
    c.aug,
    num_classes=c.data.num_classes,
    ema_decay=c.ema_decay,
    dtype=ctx.dtype,
  )
  logits = lambda p, x: model.apply(
    {"params": p}, finetune.normalize_images(x).astype(ctx.dtype), train=False
  )

  image_eval = _image_evaluator(ctx, logits)

  def evaluate_fn(state):
    row = image_eval(state["params"])
    if c.ema_decay:
      row.update(
        {f"ema_{k}": v for k, v in image_eval(state["ema"]).items() if k in ("top1", "top5")}
      )
    return row

  return _run_job(
    ctx,
    state_abs,
    state_sh,
    init_fn,
    lambda state, _, batch: train_step(state, batch),
    loader,
    evaluate_fn,
  )


# --------------------------------------------------------------------------- entry points
def evaluate(config, workdir: str) -> dict:
  """Runs (or resumes) one protocol; returns the final results (also in results.json)."""
  try:
    validate_config(config)
    runner.setup_distributed(config)
    ctx = _Context(config, workdir)
  except (ckpt_lib.IncompatibleCheckpointError, ConfigError):
    raise
  except (ValueError, FileNotFoundError, KeyError) as e:
    raise ConfigError(str(e).splitlines()[0] if str(e) else repr(e)) from e
  protocols = {"knn": run_knn, "linear_probe": run_linear_probe, "finetune": run_finetune}
  row = protocols[config.protocol](ctx)
  if "stopped_at" in row:
    return row
  return _write_results(workdir, config, ctx.spec, row)


def main(argv):
  result = runner.run_cli(argv, evaluate)
  logging.info("done: %s", json.dumps({k: v for k, v in result.items() if k != "encoder"}))


if __name__ == "__main__":
  flags.adopt_module_key_flags(runner)  # --config, --workdir in --help
  app.run(main, flags_parser=runner.parse_flags)
