r"""The one trainer for every method.

  python -m mim_jax.train --config=configs/ccvit_vitb.py --workdir=/tmp/ccvit
  python -m mim_jax.train --config=configs/ccvit_vitb.py:runlocal --workdir=/tmp/smoke

Sections: config checks -> mesh -> method + data -> sharded state -> restore -> jitted
step -> loop (metrics, checkpoints, SIGTERM). Re-running the same command resumes from
the newest checkpoint in --workdir, data-iterator position included.
"""
from __future__ import annotations

import json
import logging as logging_std
import os
import signal
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax

from mim_jax import checkpoint as ckpt_lib
from mim_jax import methods
from mim_jax import metrics as metrics_lib
from mim_jax import optim
from mim_jax import sharding
from mim_jax.data import pipeline as data_pipeline
from mim_jax.data import sources as data_sources
from mim_jax.data import transforms
from mim_jax.evaluation import monitor

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")


class ConfigError(ValueError):
  """Bad user input, reported in one line before any compilation."""


# --------------------------------------------------------------------------- config
_POSITIVE_INTS = ("total_steps", "log_every", "checkpoint_every", "batch_size",
                  "keep_checkpoints")


def validate_config(config) -> None:
  """Cheap checks with messages that name the field; no data is read, nothing compiled."""
  for f in _POSITIVE_INTS:
    v = config.get(f)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ConfigError(f"config.{f} must be a positive integer, got {v!r}")
  if config.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"config.dtype must be 'float32' or 'bfloat16', got {config.dtype!r}")
  o = config.optim
  for f in ("lr", "min_lr", "b1", "b2", "eps", "weight_decay", "clip_grad_norm"):
    if not isinstance(o.get(f), (int, float)) or isinstance(o.get(f), bool) or o.get(f) < 0:
      raise ConfigError(f"config.optim.{f} must be a non-negative number, got {o.get(f)!r}")
  if not isinstance(o.warmup_steps, int) or o.warmup_steps < 0:
    raise ConfigError(f"config.optim.warmup_steps must be an integer >= 0, "
                      f"got {o.warmup_steps!r}")
  if config.method.name not in methods.names():
    raise ConfigError(f"config.method.name: unknown method {config.method.name!r}; "
                      f"choose one of {methods.names()}")
  try:
    methods.check(config)     # e.g. MaPeT's token cache: says how to prepare data + tokens
    data_sources.validate_data_config(config.data)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(str(e)) from e


def check_batch(config, mesh) -> None:
  dp = sharding.data_parallel_size(mesh)
  if config.batch_size % dp:
    raise ConfigError(f"config.batch_size={config.batch_size} is not divisible by the "
                      f"data-parallel size {dp} (config.mesh {dict(mesh.shape)})")
  if config.batch_size % jax.process_count():
    raise ConfigError(f"config.batch_size={config.batch_size} is not divisible by the "
                      f"{jax.process_count()} processes")


# --------------------------------------------------------------------------- data
def make_loader(config, method, source):
  if hasattr(method, "wrap_source"):
    source = method.wrap_source(source)
  transform = transforms.TwoViewTransform.from_config(config.data)
  return data_pipeline.make_train_loader(
      source, transform, method.prepare, global_batch_size=config.batch_size,
      seed=config.seed, worker_count=config.data.worker_count)


# --------------------------------------------------------------------------- state
class Trainer:
  """Holds the method, optimizer, mesh and shardings; builds state and the step."""

  def __init__(self, config, mesh, method):
    self.config, self.mesh, self.method = config, mesh, method
    scanned = "blocks" if config.model.scan_layers else None
    self.tx, self.schedule = optim.make_optimizer(config.optim, config.total_steps,
                                                  scanned_prefix=scanned)
    self.rules = sharding.rules_tuple(config.sharding_rules)

  def _split(self, variables):
    params = variables["params"]
    extra = {k: v for k, v in variables.items() if k != "params"}
    return params, extra

  def abstract_state(self, sample_batch) -> tuple[Any, Any]:
    """(abstract state, its shardings) without allocating anything."""
    rng = jax.random.PRNGKey(0)
    boxed = jax.eval_shape(self.method.init, rng, sample_batch)
    shardings = sharding.logical_shardings(boxed, self.mesh, self.rules)
    params_abs, extra_abs = self._split(nn.unbox(boxed))
    params_sh, extra_sh = self._split(shardings)
    sharding.check_divisible(params_abs, params_sh)
    repl = sharding.replicated(self.mesh)
    opt_abs = jax.eval_shape(self.tx.init, params_abs)
    opt_sh = optax.tree_map_params(
        self.tx, lambda _, s: s, opt_abs, params_sh,
        transform_non_params=lambda _: repl,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    consts = self.method.consts()
    state_abs = dict(step=jax.ShapeDtypeStruct((), jnp.int32), params=params_abs,
                     opt_state=opt_abs, rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
                     extra=extra_abs,
                     consts=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), consts))
    state_sh = dict(step=repl, params=params_sh, opt_state=opt_sh, rng=repl, extra=extra_sh,
                    consts=jax.tree.map(lambda _: repl, consts))
    return state_abs, state_sh

  def init_state(self, sample_batch, state_sh) -> dict:
    consts = jax.device_put(self.method.consts(), state_sh["consts"])
    rng = jax.random.PRNGKey(self.config.seed)

    def init(rng, consts):
      params, extra = self._split(nn.unbox(self.method.init(jax.random.fold_in(rng, 1),
                                                            sample_batch)))
      return dict(step=jnp.zeros((), jnp.int32), params=params,
                  opt_state=self.tx.init(params), rng=jax.random.fold_in(rng, 2),
                  extra=extra, consts=consts)

    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return jax.jit(init, out_shardings=state_sh)(rng, consts)

  def make_step(self, state_sh):
    method, tx, schedule = self.method, self.tx, self.schedule

    def step_fn(state, batch):
      rng = jax.random.fold_in(state["rng"], state["step"])

      def loss_fn(params):
        loss, metrics, new_extra = method.loss(params, state["extra"], state["consts"], batch,
                                               rng, train=True)
        return loss, (metrics, new_extra)

      (_, (metrics, new_extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state["params"])
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      metrics = dict(metrics, grad_norm=optax.global_norm(grads), lr=schedule(state["step"]))
      new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state,
                       extra=dict(state["extra"], **new_extra))
      return new_state, metrics

    batch_sh = sharding.batch_sharding(self.mesh)
    jitted = jax.jit(step_fn, in_shardings=(state_sh, batch_sh),
                     out_shardings=(state_sh, sharding.replicated(self.mesh)),
                     donate_argnums=(0,))

    def run(state, batch):
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        return jitted(state, batch)

    def lower(state, batch):   # for benchmarks: XLA's cost analysis of the compiled step
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        return jitted.lower(state, batch)

    run.lower = lower
    return run


def _sample_batch(local: dict, mesh) -> dict:
  """Global-shaped abstract batch from one local batch."""
  n = jax.process_count()
  return {k: jax.ShapeDtypeStruct((v.shape[0] * n,) + v.shape[1:], v.dtype)
          for k, v in local.items()}


def build_step_for_benchmark(config, batch_inputs: dict | None = None):
  """(step_fn, state, batch) for benchmarks: the trainer's own jitted step on one batch.

  `batch_inputs` maps names to numpy arrays with a leading batch axis (e.g. 'image',
  'image2', 'mask', 'replaced'); without it a batch is drawn from config.data.
  """
  mesh = sharding.make_mesh(config.mesh)
  config = config.copy_and_resolve_references()
  if "tokenizer" in config and config.tokenizer.get("kind") == "centroids" \
      and not config.tokenizer.path:
    # Speed does not depend on the codebook's values: a random one avoids building it.
    from mim_jax.tokenizers import centroids as centroid_lib  # pylint: disable=g-import-not-at-top
    import tempfile  # pylint: disable=g-import-not-at-top
    patch = int(config.model.variant.split("/")[1])
    rand = np.random.default_rng(0).random((config.tokenizer.k, 3 * patch * patch), np.float32)
    path = os.path.join(tempfile.mkdtemp(), "random_centroids")
    centroid_lib.CentroidTokenizer(rand, patch_size=patch).save(path)
    with config.unlocked():
      config.tokenizer.path = path
  method = methods.build(config, workdir=None, source=None)
  if batch_inputs is None:
    source = data_sources.build_source(config.data)
    batch_inputs = next(iter(make_loader(config, method, source)))
  batch_inputs = {k: np.asarray(v) for k, v in batch_inputs.items()
                  if k in ("image", "image2", "mask", "replaced", "perm", "tokens", "label")}
  trainer = Trainer(config, mesh, method)
  sample = _sample_batch(batch_inputs, mesh)
  _, state_sh = trainer.abstract_state(sample)
  state = trainer.init_state(sample, state_sh)
  return trainer.make_step(state_sh), state, sharding.global_batch(batch_inputs, mesh)


# --------------------------------------------------------------------------- loop
def _write_png(path: str, image: np.ndarray) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  tmp = path + ".tmp.png"
  Image.fromarray(image).save(tmp)
  os.replace(tmp, path)


def _check_finite(step, scalars, ckpt, workdir):
  bad = {k: v for k, v in scalars.items() if k in ("loss", "grad_norm") and not np.isfinite(v)}
  if bad:
    last = ckpt.latest_step()
    where = (f"the last good checkpoint (step {last}) is kept in {ckpt.directory}"
             if last is not None else f"no checkpoint was written in {workdir}")
    raise FloatingPointError(f"non-finite {bad} at step {step}: stopping; {where}. "
                             "Lower config.optim.lr or check the data.")


def _setup(config, workdir):
  """Checks and builds everything that precedes compilation."""
  validate_config(config)
  if config.get("knn_monitor"):
    monitor.validate(config)
  if config.distributed:
    jax.distributed.initialize()
  mesh = sharding.make_mesh(config.mesh)
  check_batch(config, mesh)
  os.makedirs(workdir, exist_ok=True)
  source = data_sources.build_source(config.data)
  method = methods.build(config, workdir=workdir, source=source)
  ckpt_lib.check_config_compatible(workdir, method.fingerprint())
  loader = make_loader(config, method, source)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints,
                               async_save=config.async_checkpointing)
  ckpt_lib.write_config(workdir, config.to_json_best_effort(), method.fingerprint())
  logging.info("mesh %s, %d process(es), %d device(s)", dict(mesh.shape), jax.process_count(),
               jax.device_count())
  it = iter(loader)
  first = next(it)   # decodes real data before compiling: bad files fail fast
  return mesh, method, loader, ckpt, it, first


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs (or resumes) training; returns the last logged metrics."""
  # 1. Everything that can be wrong with the user's input, checked before heavy work:
  # a ValueError raised before the first batch is decoded is a (named) input problem.
  try:
    mesh, method, loader, ckpt, it, first = _setup(config, workdir)
  except ckpt_lib.IncompatibleCheckpointError:
    raise
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(str(e).splitlines()[0] if str(e) else repr(e)) from e
  latest = ckpt.latest_step()

  # 2. Model and optimizer state, created already sharded (or restored).
  trainer = Trainer(config, mesh, method)
  sample = _sample_batch(first, mesh)
  state_abs, state_sh = trainer.abstract_state(sample)
  if latest is not None:
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            state_abs, state_sh)
    state, data_state = ckpt.restore(latest, abstract)
    if data_state is not None:
      loader.set_state(data_state)
      it = iter(loader)
    first = None
    logging.info("resumed from %s/%d", ckpt.directory, latest)
  else:
    state = trainer.init_state(sample, state_sh)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    logging.info("initialised %.2fM parameters", n_params / 1e6)
  step_fn = trainer.make_step(state_sh)
  knn_monitor = (monitor.KnnMonitor(config, mesh, method)
                 if config.get("knn_monitor") and config.knn_monitor.every else None)

  # 3. The loop.
  stop = {"sig": None}

  def on_signal(signum, _):
    stop["sig"] = signum

  old_handler = signal.signal(signal.SIGTERM, on_signal)
  step = int(jax.device_get(state["step"]))
  writer = metrics_lib.MetricLogger(workdir, config.total_steps)
  last_row, batch = {}, None
  try:
    writer.mark(step)
    while step < config.total_steps:
      local = first if first is not None else next(it)
      first = None
      batch = sharding.global_batch(local, mesh)
      state, metrics = step_fn(state, batch)
      step += 1
      is_last = step == config.total_steps
      stopping = stop["sig"] is not None   # one snapshot: a signal can land at any line
      save_now = step % config.checkpoint_every == 0 or is_last or stopping
      log_now = step % config.log_every == 0 or is_last
      knn_now = knn_monitor is not None and (step % knn_monitor.every == 0 or is_last)
      if log_now or save_now or knn_now:
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(step, scalars, ckpt, workdir)   # never checkpoint a NaN state
        if knn_now:
          t0 = time.time()
          scalars.update(knn_monitor(state["params"]))
          writer.pause(time.time() - t0)
          log_now = True
        if log_now:
          last_row = writer.write(step, scalars, images_per_step=config.batch_size)
      if config.vis_every and step % config.vis_every == 0:
        _visualize(method, state, batch, workdir, step)
      if save_now:
        ckpt.save(step, state, loader_state(it), force=stopping)
      if stopping:
        ckpt.wait()   # the process is about to end: the write must be complete
        logging.warning("signal %d: saved step %d in %s, exiting", stop["sig"], step,
                        ckpt.directory)
        break
    if batch is not None and stop["sig"] is None and not config.vis_every:
      _visualize(method, state, batch, workdir, step)
  finally:
    ckpt.close()
    writer.close()
    signal.signal(signal.SIGTERM, old_handler)
  return last_row


def loader_state(it) -> str:
  state = it.get_state()
  return state.decode() if isinstance(state, bytes) else state


def _visualize(method, state, batch, workdir, step):
  if jax.process_index() != 0 or not hasattr(method, "visualize"):
    return
  if not all(x.is_fully_addressable for x in jax.tree.leaves(state["params"])):
    logging.info("visualisation skipped: parameters are spread over several hosts")
    return
  local = {k: np.asarray(v.addressable_data(0)) for k, v in batch.items()}
  image = method.visualize(jax.device_get(state["params"]), state["extra"], state["consts"],
                           local)
  if image is not None:
    path = os.path.join(workdir, "visualization.png")
    _write_png(path, image)
    logging.info("wrote %s (step %d)", path, step)


# --------------------------------------------------------------------------- CLI
def _one_line(e: BaseException) -> str:
  """First and last lines of a multi-line message (config_flags nests the cause)."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return " ".join(lines[:1] + lines[-1:]) if len(lines) > 1 else (lines or [repr(e)])[0]


def _parse_flags(argv):
  """absl flag parsing whose errors (bad config field/type) are one line, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
  except (AttributeError, KeyError) as e:
    # ml_collections raises these (not flags.Error) for an override of an unknown field.
    bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    print(f"error: unknown config field {str(e).strip(chr(34))} "
          f"(one of {', '.join(bad)})", file=sys.stderr)
  except (ValueError, TypeError) as e:
    print(f"error: config: {str(e).splitlines()[0]}", file=sys.stderr)
  sys.exit(2)


class _QuietOrbax(logging_std.Filter):
  """orbax logs every save/restore detail at INFO; keep its warnings and errors only."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or "orbax" not in record.pathname


def run_cli(argv, fn):
  """The shared body of `python -m mim_jax.train` / `mim_jax.evaluate`: reads --config and
  --workdir and returns fn(config, workdir); configuration problems end in a one-line error
  and exit 2, a non-finite loss in exit 3."""
  logging.get_absl_handler().addFilter(_QuietOrbax())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    config = _CONFIG.value
    if config is not None:
      config.keys()   # a config file that failed to load raises only when touched
  except (OSError, ValueError) as e:   # config_flags loads the file lazily
    print(f"error: --config: {_one_line(e)}", file=sys.stderr)
    sys.exit(2)
  for name, value in (("--workdir", _WORKDIR.value), ("--config", config)):
    if value is None:
      print(f"error: {name} is required", file=sys.stderr)
      sys.exit(2)
  try:
    return fn(config, _WORKDIR.value)
  except (ConfigError, ckpt_lib.IncompatibleCheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except FloatingPointError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)


def main(argv):
  row = run_cli(argv, train_and_evaluate)
  if row:
    logging.info("done: %s", json.dumps(row))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
