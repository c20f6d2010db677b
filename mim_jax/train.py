r"""The one trainer for every method.

  python -m mim_jax.train --config=configs/ccvit_vitb.py --workdir=/tmp/ccvit
  python -m mim_jax.train --config=configs/ccvit_vitb.py:runlocal --workdir=/tmp/smoke

What is particular to pre-training lives here (config checks, the method plug-in, its
state and step); the command line, checkpoints, the loop, preemption and the guards are
mim_jax/runner.py's, shared with `mim_jax.evaluate`. Re-running the same command resumes
from the newest intact checkpoint in --workdir, on any number of processes.
"""

from __future__ import annotations

from mim_jax import preemption

preemption.install_if_main(__name__)  # SIGTERM is handled from the first line on
# The handler must be in place before the slow imports below.
# ruff: noqa: E402

import json
import os
from typing import Any

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mim_jax import checkpoint as ckpt_lib
from mim_jax import methods
from mim_jax import optim
from mim_jax import runner
from mim_jax import sharding
from mim_jax.data import pipeline as data_pipeline
from mim_jax.data import sources as data_sources
from mim_jax.data import transforms
from mim_jax.evaluation import backbones
from mim_jax.evaluation import monitor
from mim_jax.models import convert
from mim_jax.models import exported

ConfigError = runner.ConfigError


# --------------------------------------------------------------------------- config
_POSITIVE_INTS = ("total_steps", "log_every", "checkpoint_every", "batch_size", "keep_checkpoints")


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
    raise ConfigError(f"config.optim.warmup_steps must be an integer >= 0, got {o.warmup_steps!r}")
  if config.method.name not in methods.names():
    raise ConfigError(
      f"config.method.name: unknown method {config.method.name!r}; choose one of {methods.names()}"
    )
  try:
    methods.check(config)  # e.g. MaPeT's token cache: says how to prepare data + tokens
    data_sources.validate_data_config(config.data)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(str(e)) from e


def check_batch(config, mesh) -> None:
  dp = sharding.data_parallel_size(mesh)
  if config.batch_size % dp:
    raise ConfigError(
      f"config.batch_size={config.batch_size} is not divisible by the "
      f"data-parallel size {dp} (config.mesh {dict(mesh.shape)})"
    )
  if config.batch_size % jax.process_count():
    raise ConfigError(
      f"config.batch_size={config.batch_size} is not divisible by the "
      f"{jax.process_count()} processes"
    )


# --------------------------------------------------------------------------- data
def make_loader(config, method, source, mesh=None):
  """This process's rows of every global batch (the rows its devices hold under `mesh`)."""
  if hasattr(method, "wrap_source"):
    source = method.wrap_source(source)
  transform = transforms.TwoViewTransform.from_config(config.data)
  return data_pipeline.make_train_loader(
    source,
    transform,
    method.prepare,
    global_batch_size=config.batch_size,
    seed=config.seed,
    worker_count=config.data.worker_count,
    rows=runner.process_rows(mesh, config.batch_size) if mesh is not None else None,
  )


# --------------------------------------------------------------------------- state
class Trainer:
  """Holds the method, optimizer, mesh and shardings; builds state and the step.

  The state is {step, params, opt_state, rng, extra} (extra: the method's mutable
  collections, e.g. EMA codebooks); the method's frozen inputs (`method.consts()`) travel
  beside it and are never checkpointed (mim_jax/runner.py).
  """

  def __init__(self, config, mesh, method):
    self.config, self.mesh, self.method = config, mesh, method
    scanned = "blocks" if config.model.scan_layers else None
    self.tx, self.schedule = optim.make_optimizer(
      config.optim, config.total_steps, scanned_prefix=scanned
    )
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
    return runner.state_shardings(
      self.tx, params_abs, params_sh, self.mesh, extra={"extra": (extra_abs, extra_sh)}
    )

  def frozen(self) -> tuple[Any, Any]:
    """(frozen inputs placed on the mesh, their shardings): replicated."""
    consts = self.method.consts()
    frozen_sh = jax.tree.map(lambda _: sharding.replicated(self.mesh), consts)
    return jax.device_put(consts, frozen_sh), frozen_sh

  def init_state(self, sample_batch, state_sh, state_abs=None) -> dict:
    state = self._init_state(sample_batch, state_sh)
    if self.config.get("init_from"):
      state = init_from_export(self.config.init_from, state, state_abs, state_sh)
    return state

  def _init_state(self, sample_batch, state_sh) -> dict:
    rng = jax.random.PRNGKey(self.config.seed)

    def init(rng):
      params, extra = self._split(
        nn.unbox(self.method.init(jax.random.fold_in(rng, 1), sample_batch))
      )
      return dict(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=self.tx.init(params),
        rng=jax.random.fold_in(rng, 2),
        extra=extra,
      )

    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return jax.jit(init, out_shardings=state_sh)(rng)

  def split_step(self):
    """The step in two pure halves, so that the runner can decide from the loss and the
    gradient norm whether to apply an update before computing it (mim_jax/runner.py):
      compute(state, frozen, batch) -> (grads, new_extra, metrics with loss, grad_norm, lr)
      apply(state, grads, new_extra) -> state with the update applied (step unchanged)."""
    method, tx, schedule = self.method, self.tx, self.schedule

    def compute(state, frozen, batch):
      rng = jax.random.fold_in(state["rng"], state["step"])

      def loss_fn(params):
        loss, metrics, new_extra = method.loss(
          params, state["extra"], frozen, batch, rng, train=True
        )
        return loss, (metrics, new_extra)

      (_, (metrics, new_extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
      metrics = dict(metrics, grad_norm=optax.global_norm(grads), lr=schedule(state["step"]))
      return grads, new_extra, metrics

    def apply(state, grads, new_extra):
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      return dict(
        state,
        params=optax.apply_updates(state["params"], updates),
        opt_state=opt_state,
        extra=dict(state["extra"], **new_extra),
      )

    return compute, apply

  def step_fn(self):
    """The pure step (state, frozen, batch) -> (state, metrics): both halves in turn."""
    compute, apply = self.split_step()

    def step_fn(state, frozen, batch):
      grads, new_extra, metrics = compute(state, frozen, batch)
      new_state = apply(state, grads, new_extra)
      return dict(new_state, step=state["step"] + 1), metrics

    return step_fn

  def make_step(self, state_sh, frozen_sh):
    """The jitted step alone (benchmarks): run(state, frozen, batch), run.lower(...)."""
    jitted = jax.jit(
      self.step_fn(),
      in_shardings=(state_sh, frozen_sh, sharding.batch_sharding(self.mesh)),
      out_shardings=(state_sh, sharding.replicated(self.mesh)),
      donate_argnums=(0,),
    )

    def run(state, frozen, batch):
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        return jitted(state, frozen, batch)

    def lower(state, frozen, batch):  # XLA's cost analysis of the compiled step
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        return jitted.lower(state, frozen, batch)

    run.lower = lower
    return run


_BATCH_KEYS = ("image", "image2", "mask", "replaced", "perm", "tokens", "label")


def build_step_for_benchmark(config, batch_inputs: dict | None = None):
  """(step, state, frozen, batch) for benchmarks: the trainer's own jitted step on one batch;
  call step(state, frozen, batch).

  `batch_inputs` maps names to numpy arrays with a leading batch axis (e.g. 'image',
  'image2', 'mask', 'replaced'); without it a batch is drawn from config.data.
  """
  mesh = sharding.make_mesh(config.mesh)
  config = config.copy_and_resolve_references()
  if (
    "tokenizer" in config
    and config.tokenizer.get("kind") == "centroids"
    and not config.tokenizer.path
  ):
    # Speed does not depend on the codebook's values: a random one avoids building it.
    import tempfile  # pylint: disable=g-import-not-at-top

    from mim_jax.tokenizers import centroids as centroid_lib  # pylint: disable=g-import-not-at-top

    patch = int(config.model.variant.split("/")[1])
    rand = np.random.default_rng(0).random((config.tokenizer.k, 3 * patch * patch), np.float32)
    path = os.path.join(tempfile.mkdtemp(), "random_centroids")
    centroid_lib.CentroidTokenizer(rand, patch_size=patch).save(path)
    with config.unlocked():
      config.tokenizer.path = path
  method = methods.build(config, workdir=None, source=None)
  if batch_inputs is None:
    source = data_sources.build_source(config.data)
    with make_loader(config, method, source) as loader:
      batch_inputs = next(iter(loader))
  batch_inputs = {k: np.asarray(v) for k, v in batch_inputs.items() if k in _BATCH_KEYS}
  trainer = Trainer(config, mesh, method)
  sample = runner.global_sample(batch_inputs)
  _, state_sh = trainer.abstract_state(sample)
  state = trainer.init_state(sample, state_sh)
  frozen, frozen_sh = trainer.frozen()
  return (
    trainer.make_step(state_sh, frozen_sh),
    state,
    frozen,
    sharding.global_batch(batch_inputs, mesh),
  )


# --------------------------------------------------------------------------- init_from
def check_init_from(path: str, method_name: str, fingerprint: dict) -> dict:
  """The manifest of a full export, checked against this run before anything is built."""
  if exported.kind(path) != "full":
    raise runner.ConfigError(
      f"config.init_from: {path} is not a `mim_jax.export --format=full` folder "
      f"(no {exported.FULL_MANIFEST}); to resume a workdir, pass it as --workdir"
    )
  try:
    with open(os.path.join(path, exported.FULL_MANIFEST)) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise runner.ConfigError(f"config.init_from: {path}: unreadable manifest ({e})") from None
  if manifest.get("method") != method_name:
    raise runner.ConfigError(
      f"config.init_from: {path} holds a {manifest.get('method')!r} model, this run is "
      f"{method_name!r}"
    )
  saved = manifest.get("fingerprint", {})
  for key in sorted(set(saved) | set(fingerprint)):
    if key != "model.scan_layers" and saved.get(key) != fingerprint.get(key):
      raise runner.ConfigError(
        f"config.init_from: {path} was trained with {key}={saved.get(key)!r}, this run has "
        f"{fingerprint.get(key)!r}"
      )
  return manifest


def _match_layout(loaded, abstract):
  """Stacks `X_0..X_n` into `X` or unstacks it, wherever the run's layout differs from the
  export's (model.scan_layers may change between the two)."""
  if not isinstance(abstract, dict) or not isinstance(loaded, dict):
    return loaded
  out = dict(loaded)
  for key in abstract:
    if key not in out and f"{key}_0" in out:
      out = convert.stack_layers(out, prefix=key)
  for key in list(out):
    if key not in abstract and f"{key}_0" in abstract:
      out = convert.unstack_layers(out, prefix=key)
  return {k: _match_layout(v, abstract.get(k)) for k, v in out.items()}


def init_from_export(path: str, state: dict, state_abs: dict, state_sh: dict) -> dict:
  """`state` with the export's parameters, mutable collections and step (every parameter
  must be there: a partial start is an error, never a silent one)."""
  loaded, manifest = exported.read_full(path)
  new = dict(state)
  for part in ("params", "extra"):
    tree = _match_layout(loaded[part], state_abs[part])
    try:
      merged, fresh = backbones.merge_into(state[part], tree, where=part, place=state_sh[part])
    except ValueError as e:
      raise runner.ConfigError(f"config.init_from: {path}: {e}") from None
    if fresh:
      raise runner.ConfigError(
        f"config.init_from: {path} lacks {len(fresh)} tensors of this model, e.g. {fresh[:3]}"
      )
    new[part] = merged
  new["step"] = jax.device_put(jnp.asarray(manifest["step"], jnp.int32), state_sh["step"])
  logging.info("started from %s (%s step %d)", path, manifest["method"], manifest["step"])
  return new


# --------------------------------------------------------------------------- the run
def _write_png(path: str, image: np.ndarray) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  tmp = path + ".tmp.png"
  Image.fromarray(image).save(tmp)
  os.replace(tmp, path)


def _visualize(method, workdir, state, frozen, batch, step):
  if jax.process_index() != 0 or not hasattr(method, "visualize"):
    return
  if not all(x.is_fully_addressable for x in jax.tree.leaves(state["params"])):
    logging.info("visualisation skipped: parameters are spread over several hosts")
    return
  local = {k: np.asarray(v.addressable_data(0)) for k, v in batch.items()}
  image = method.visualize(jax.device_get(state["params"]), state["extra"], frozen, local)
  if image is not None:
    path = os.path.join(workdir, "visualization.png")
    _write_png(path, image)
    logging.info("wrote %s (step %d)", path, step)


def _setup(config, workdir):
  """Checks and builds everything that precedes compilation."""
  validate_config(config)
  if config.get("knn_monitor"):
    monitor.validate(config)
  runner.setup_distributed(config)
  mesh = sharding.make_mesh(config.mesh)
  check_batch(config, mesh)
  os.makedirs(workdir, exist_ok=True)
  source = data_sources.build_source(config.data)
  method = methods.build(config, workdir=workdir, source=source)
  ckpt_lib.check_config_compatible(workdir, method.fingerprint())
  if config.get("init_from"):
    check_init_from(config.init_from, config.method.name, method.fingerprint())
  loader = make_loader(config, method, source, mesh)
  ckpt_lib.write_config(workdir, config.to_json_best_effort(), method.fingerprint())
  logging.info(
    "mesh %s, %d process(es), %d device(s)",
    dict(mesh.shape),
    jax.process_count(),
    jax.device_count(),
  )
  first = next(iter(loader))  # decodes real data before compiling
  return mesh, method, loader, first


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs (or resumes) training; returns the last logged metrics."""
  # 1. Everything that can be wrong with the user's input, checked before heavy work:
  # a ValueError raised before the first batch is decoded is a (named) input problem.
  try:
    mesh, method, loader, first = _setup(config, workdir)
    fingerprint = method.frozen_fingerprint() if hasattr(method, "frozen_fingerprint") else {}
  except (ckpt_lib.IncompatibleCheckpointError, runner.ConfigError):
    raise
  except (ValueError, FileNotFoundError) as e:
    raise runner.ConfigError(str(e).splitlines()[0] if str(e) else repr(e)) from e

  # 2. What differs from evaluation: the method's state, frozen inputs and step.
  trainer = Trainer(config, mesh, method)
  sample = runner.global_sample(first)
  state_abs, state_sh = trainer.abstract_state(sample)
  frozen, frozen_sh = trainer.frozen()
  knn_monitor = (
    monitor.KnnMonitor(config, mesh, method)
    if config.get("knn_monitor") and config.knn_monitor.every
    else None
  )
  vis = lambda state, frozen, batch, step: _visualize(method, workdir, state, frozen, batch, step)
  job = runner.Job(
    config=config,
    workdir=workdir,
    mesh=mesh,
    rules=trainer.rules,
    state_abs=state_abs,
    state_sh=state_sh,
    init_state=lambda: trainer.init_state(sample, state_sh, state_abs),
    step=trainer.step_fn(),
    split_step=trainer.split_step(),
    loader=loader,
    images_per_step=config.batch_size,
    frozen=frozen,
    frozen_sh=frozen_sh,
    frozen_fingerprint=fingerprint,
    on_log=(lambda step, state: knn_monitor(state["params"])) if knn_monitor else None,
    log_hook_every=knn_monitor.every if knn_monitor else 0,
    on_vis=vis,
    vis_every=config.vis_every,
    # The picture of the final state, unless the last periodic one already is.
    at_end=None if config.vis_every and config.total_steps % config.vis_every == 0 else vis,
  )
  try:
    return runner.run(job)
  finally:
    loader.close()


# --------------------------------------------------------------------------- CLI
def main(argv):
  row = runner.run_cli(argv, train_and_evaluate)
  if row:
    logging.info("done: %s", json.dumps(row))


if __name__ == "__main__":
  flags.adopt_module_key_flags(runner)  # --config, --workdir in --help
  app.run(main, flags_parser=runner.parse_flags)
