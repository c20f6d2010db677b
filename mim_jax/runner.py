r"""The one runner behind `python -m mim_jax.train` and `python -m mim_jax.evaluate`.

Read top to bottom: command line and config loading (one-line errors) -> distributed set-up
(SIGTERM is watched from the first line on) -> the caller builds a `Job` (what differs
between pre-training, linear probing and fine-tuning: state, step, data) -> `run(job)`:
workdir lock -> frozen-input fingerprints -> newest intact checkpoint or a fresh state ->
one jitted, guarded step -> the loop (metrics, checkpoints, preemption agreed by every
process, non-finite and bad-data guards) -> final evaluation.

The train-state contract. `state` is everything that changes and is checkpointed: a dict
with at least `step` (int32) and `params`, usually `opt_state`, `rng` and method
collections. Frozen inputs (teachers, tokenizers, codebooks built once) are `frozen`,
passed beside the state to every step and never written to a checkpoint; their
fingerprints (path + content hash, or the config that built them) are recorded in
DIR/frozen.json and a resume with a different one is refused. The runner adds
`state["guard"]`: counters of skipped non-finite steps and of substituted bad examples.

What a checkpoint holds: the state, one global data record (batches depend only on the
seed and the global step, so the record is the same for every process and a checkpoint
resumes on any process count; see mim_jax/data/pipeline.py) and per-leaf checksums.
"""

from __future__ import annotations

import dataclasses
import json
import logging as logging_std
import os
import sys
import time
import traceback
from typing import Any, Callable

from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
from ml_collections import config_flags
import numpy as np
import optax

from mim_jax import checkpoint as ckpt_lib
from mim_jax import cli
from mim_jax import compile_cache
from mim_jax import distributed
from mim_jax import flops as flops_lib
from mim_jax import host_memory
from mim_jax import metrics as metrics_lib
from mim_jax import perf
from mim_jax import preemption
from mim_jax import profiler
from mim_jax import sharding
from mim_jax import workdir_lock

CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Experiment config file (path[:args], e.g. configs/ccvit_vitb.py:runlocal).",
  lock_config=True,
)
WORKDIR = flags.DEFINE_string(
  "workdir",
  None,
  "Where checkpoints and metrics go; re-running "
  "the same command resumes from the newest checkpoint there.",
)

FROZEN_FILE = "frozen.json"


class ConfigError(ValueError):
  """Bad user input, reported in one line (exit 2) before anything is compiled."""


class NonFiniteError(FloatingPointError):
  """A non-finite step beyond config.max_nonfinite_skips (exit 3)."""


class BadDataError(RuntimeError):
  """More undecodable examples than config.data.max_bad_fraction allows (exit 5)."""


# --------------------------------------------------------------------------- command line
def _one_line(e: BaseException) -> str:
  """First and last lines of a multi-line message (config_flags nests the cause)."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return " ".join(lines[:1] + lines[-1:]) if len(lines) > 1 else (lines or [repr(e)])[0]


def _config_arg(argv) -> str | None:
  for i, a in enumerate(argv[1:], 1):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def check_config_file(spec: str) -> None:
  """Imports `path[:arg]` and calls get_config(arg) once, so that a broken config file is one
  line naming file:line, not config_flags' nested traceback."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"--config: {path} does not exist")
  from mim_jax import config_lib  # pylint: disable=g-import-not-at-top

  try:
    module = config_lib.load_module(path)
  except SyntaxError as e:
    raise ConfigError(
      f"--config: {e.filename}:{e.lineno}: {e.__class__.__name__}: {e.msg}"
    ) from None
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(
      f"--config: {_where(e, path)}: cannot import: {type(e).__name__}: {_one_line(e)}"
    ) from None
  if not hasattr(module, "get_config"):
    raise ConfigError(f"--config: {path} has no get_config(arg) function")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(
      f"--config: {_where(e, path)}: get_config({arg!r}) raised {type(e).__name__}: {_one_line(e)}"
    ) from None
  if not isinstance(config, mlc.ConfigDict):
    raise ConfigError(
      f"--config: {path}: get_config returned {type(config).__name__}, "
      "not an ml_collections.ConfigDict"
    )


def _where(e: BaseException, path: str) -> str:
  """file:line of the deepest frame of `e` inside the config file (else the file)."""
  frames = [
    f
    for f in traceback.extract_tb(e.__traceback__)
    if os.path.abspath(f.filename) == os.path.abspath(path)
  ]
  return f"{path}:{frames[-1].lineno}" if frames else path


def parse_flags(argv):
  """absl flag parsing whose errors (bad config file/field/type) are one line."""
  spec = _config_arg(argv)
  try:
    if spec is not None and not any(a in cli.HELP_ARGS for a in argv[1:]):
      check_config_file(spec)
    return cli.parse(argv)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
  except flags.Error as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
  except (AttributeError, KeyError) as e:
    # ml_collections raises these (not flags.Error) for an override of an unknown field.
    bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    print(
      f"error: unknown config field {str(e).strip(chr(34))} (one of {', '.join(bad)})",
      file=sys.stderr,
    )
  except (ValueError, TypeError) as e:
    print(f"error: config: {str(e).splitlines()[0]}", file=sys.stderr)
  sys.exit(2)


class _QuietOrbax(logging_std.Filter):
  """orbax logs every save/restore detail at INFO; keep its warnings and errors only."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or "orbax" not in record.pathname


def run_cli(argv, fn: Callable[[Any, str], Any]):
  """The shared body of the entry points: returns fn(config, workdir). Input problems end in
  one line and exit 2, a non-finite stop in exit 3, a failed write in exit 4, too much
  undecodable data in exit 5. A SIGTERM at any point ends in a clean exit 0."""
  PREEMPTION.install()
  logging.get_absl_handler().addFilter(_QuietOrbax())
  if len(argv) > 1:
    print(f"error: unexpected arguments: {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  config = CONFIG.value
  for name, value in (("--workdir", WORKDIR.value), ("--config", config)):
    if value is None:
      print(f"error: {name} is required", file=sys.stderr)
      sys.exit(2)
  codes = (
    (ConfigError, 2),
    (ckpt_lib.IncompatibleCheckpointError, 2),
    (workdir_lock.WorkdirLockedError, 2),
    (distributed.DistributedSetupError, 2),
    (NonFiniteError, 3),
    (ckpt_lib.CheckpointWriteError, 4),
    (ckpt_lib.CheckpointError, 4),
    (BadDataError, 5),
  )
  try:
    check_workdir(WORKDIR.value)
    try:
      profiler.check(config)
      compile_cache.setup(config, WORKDIR.value)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    return fn(config, WORKDIR.value)
  except tuple(c for c, _ in codes) as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    sys.exit(next(code for c, code in codes if isinstance(e, c)))
  except OSError as e:  # a full disk or unwritable workdir outside the checkpointer
    print(f"error: cannot write {e.filename or WORKDIR.value}: {e.strerror or e}", file=sys.stderr)
    sys.exit(4)


PREEMPTION = preemption.PREEMPTION


def setup_distributed(config) -> None:
  """jax.distributed from the config / env / an auto-detected cluster (mim_jax.distributed)."""
  distributed.initialize(config)
  PREEMPTION.after_distributed_init()
  if jax.default_backend() == "cpu":  # XLA:CPU's temporaries are host memory
    logging.info("host memory: %s", host_memory.state())
  if jax.process_count() > 1:
    logging.info("%s", distributed.describe())


# --------------------------------------------------------------------------- state helpers
def opt_state_shardings(tx, params_abs, params_sh, mesh):
  """(abstract optimizer state, shardings): sharded like the parameters it tracks."""
  repl = sharding.replicated(mesh)
  opt_abs = jax.eval_shape(tx.init, params_abs)
  opt_sh = optax.tree_map_params(
    tx,
    lambda _, s: s,
    opt_abs,
    params_sh,
    transform_non_params=lambda _: repl,
    is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
  )
  return opt_abs, opt_sh


def state_shardings(tx, params_abs, params_sh, mesh, extra: dict | None = None):
  """(abstract state, shardings) of {step, params, opt_state, rng, **extra}; `extra` maps
  names to (abstract, sharding) pairs (method collections, batch statistics, EMA weights)."""
  repl = sharding.replicated(mesh)
  opt_abs, opt_sh = opt_state_shardings(tx, params_abs, params_sh, mesh)
  state_abs = dict(
    step=jax.ShapeDtypeStruct((), jnp.int32),
    params=params_abs,
    opt_state=opt_abs,
    rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
  )
  state_sh = dict(step=repl, params=params_sh, opt_state=opt_sh, rng=repl)
  for name, (abstract, shard) in (extra or {}).items():
    state_abs[name], state_sh[name] = abstract, shard
  return state_abs, state_sh


def logical_params(model: nn.Module, sample, mesh, rules, **kwargs):
  """(abstract params, their NamedShardings) of a Flax model from its logical axis names."""
  boxed = jax.eval_shape(lambda r: model.init(r, sample, **kwargs), jax.random.PRNGKey(0))
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  params_abs = nn.unbox(boxed)["params"]
  sharding.check_divisible(params_abs, shardings["params"])
  return params_abs, shardings["params"]


def global_sample(local: dict) -> dict:
  """Global-shaped abstract batch from one local batch (runner-only keys dropped)."""
  n = jax.process_count()
  return {
    k: jax.ShapeDtypeStruct((v.shape[0] * n,) + v.shape[1:], v.dtype)
    for k, v in local.items()
    if not k.startswith("_")
  }


def process_rows(mesh, global_batch_size: int) -> np.ndarray:
  """The global batch rows this process's devices hold (what its loader must read)."""
  index_map = sharding.batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
  rows = {r for idx in index_map.values() for r in range(*idx[0].indices(global_batch_size))}
  return np.array(sorted(rows), np.int64)


def guard_abstract():
  i32 = jax.ShapeDtypeStruct((), jnp.int32)
  return {"nonfinite_steps": i32, "last_nonfinite_step": i32, "bad_examples": i32}


def _all_finite(tree) -> jax.Array:
  leaves = [
    jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


# --------------------------------------------------------------------------- the job
@dataclasses.dataclass
class Job:
  """What a caller (train.py, evaluate.py) supplies; the runner does the rest.

  step(state, frozen, batch) -> (state, metrics) is pure: the runner jits it with the
  shardings below, adds the guards, donates the state. `make_loader()` returns a
  mim_jax.data Loader at step 0; the runner moves it to the resumed step.
  """

  config: Any
  workdir: str
  mesh: Any
  rules: tuple
  state_abs: Any
  state_sh: Any
  init_state: Callable[[], Any]
  step: Callable[[Any, Any, dict], tuple[Any, dict]]
  loader: Any
  images_per_step: int
  frozen: Any = None
  frozen_sh: Any = None
  frozen_fingerprint: dict = dataclasses.field(default_factory=dict)
  on_log: Callable[[int, Any], dict] | None = None  # extra scalars (a kNN monitor)
  log_hook_every: int = 0
  evaluate: Callable[[Any], dict] | None = None  # test-split numbers
  eval_every: int = 0
  at_end: Callable[[Any, Any, dict, int], None] | None = None  # (state, frozen, batch, step)
  on_vis: Callable[[Any, Any, dict, int], None] | None = None
  vis_every: int = 0
  # (compute, apply): the step in halves (train.Trainer.split_step). With it the guard decides
  # from the loss and gradient norm before the update is computed, which then overwrites the
  # donated state in place; without it the whole new state is built beside the old one
  # (0.73 GiB more per v5e chip for a CCViT ViT-B step, BENCHMARKS.md §10).
  split_step: tuple | None = None


def check_workdir(workdir: str) -> None:
  """The runner writes with POSIX file calls: a URL would silently become a local folder."""
  if "://" in workdir:
    raise ConfigError(
      f"--workdir={workdir}: object-store workdirs are not supported yet; use "
      "a path on a filesystem every host mounts (NFS, Filestore, Lustre)"
    )


def check_frozen(workdir: str, fingerprint: dict, resuming: bool) -> None:
  """Refuses a resume whose frozen inputs (teacher, tokenizer, ...) differ; records them."""
  path = os.path.join(workdir, FROZEN_FILE)
  if resuming and os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    for field in sorted(set(saved) | set(fingerprint)):
      if saved.get(field) != fingerprint.get(field):
        raise ConfigError(
          f"config.{field}: the checkpoints in {workdir} were trained with "
          f"{saved.get(field)!r}, the config now gives {fingerprint.get(field)!r}; restore "
          "the original or use a new --workdir"
        )
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(fingerprint, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


# The loader's names for the fields that decide the data order, and the config's.
_DATA_FIELDS = {
  "seed": "config.seed",
  "global_batch_size": "config.batch_size",
  "num_examples": "the dataset size (config.data)",
  "shuffle": "config.data",
}


def _move_loader(loader, data_state: str | None, step: int) -> None:
  """Puts the loader at `step` (its record from the checkpoint, checked field by field)."""
  if data_state is None:
    record = json.loads(loader.get_state())
    record["next_step"] = step
    data_state = json.dumps(record)
  try:
    loader.set_state(data_state)
  except ValueError as e:
    msg = str(e).splitlines()[0]
    names = [v for k, v in _DATA_FIELDS.items() if k in msg]
    raise ConfigError(
      f"resume: {msg} ({names[0] if names else 'data order'} changed; use the "
      "original value or a new --workdir)"
    ) from None


def _bad_data_check(config, step: int, guard: dict, bad_paths: list[str]) -> None:
  bad = int(guard["bad_examples"])
  limit = float(config.data.get("max_bad_fraction", 0.01))
  seen = step * config.batch_size
  if bad > max(1.0, limit * seen):
    shown = ", ".join(bad_paths[:10]) + (" ..." if len(bad_paths) > 10 else "")
    raise BadDataError(
      f"{bad} of {seen} examples could not be read (more than "
      f"config.data.max_bad_fraction={limit}); this process skipped: "
      f"{shown or 'none (see the other processes logs)'}"
    )


def _nonfinite_check(config, step, guard, ckpt) -> None:
  n = int(guard["nonfinite_steps"])
  allowed = int(config.get("max_nonfinite_skips", 0))
  if n > allowed:
    last = ckpt.latest_step()
    where = (
      f"the last good checkpoint (step {last}) is kept in {ckpt.directory}"
      if last is not None
      else "no checkpoint was written"
    )
    raise NonFiniteError(
      f"non-finite loss, gradient or updated parameters at step "
      f"{int(guard['last_nonfinite_step']) + 1} (update not applied; {n} such step(s), "
      f"config.max_nonfinite_skips={allowed}): stopping at step {step}; {where}. Lower "
      "config.optim.lr or check the data."
    )


def guarded_jit(job: Job):
  """(jit(step) that never applies a non-finite update and counts substituted examples, the
  shardings of its state); `mim_jax.aot` lowers it for compile-only targets."""

  split = getattr(job, "split_step", None)

  def step_fn(state, frozen, batch):
    bad = batch.pop("_bad")
    guard = state["guard"]
    inner = {k: v for k, v in state.items() if k != "guard"}
    if split is not None:
      # Decided before the update: with finite gradients (their norm) AdamW's update and the
      # new parameters are finite, and the taken branch updates the donated state in place.
      compute, apply = split
      grads, new_extra, metrics = compute(inner, frozen, batch)
      ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
      new = jax.lax.cond(ok, lambda: apply(inner, grads, new_extra), lambda: dict(inner))
    else:
      new, metrics = job.step(inner, frozen, batch)
      ok = _all_finite(new) & _all_finite(
        {k: v for k, v in metrics.items() if k in ("loss", "grad_norm")}
      )
      # One conditional, not a select per leaf: XLA fuses the chain of per-leaf finiteness
      # flags into every leaf's select (leaves x leaves scalar ops), 7x the optimised HLO and
      # 2.7 s -> 18 s to compile a 2-layer ViT step on CPU.
      new = jax.lax.cond(ok, lambda: new, lambda: inner)
    new["step"] = inner["step"] + 1
    new["guard"] = {
      "nonfinite_steps": guard["nonfinite_steps"] + (~ok).astype(jnp.int32),
      "last_nonfinite_step": jnp.where(ok, guard["last_nonfinite_step"], inner["step"]),
      "bad_examples": guard["bad_examples"] + jnp.sum(bad).astype(jnp.int32),
    }
    return new, metrics

  repl = sharding.replicated(job.mesh)
  state_sh = dict(job.state_sh, guard=jax.tree.map(lambda _: repl, guard_abstract()))
  batch_sh = sharding.batch_sharding(job.mesh)
  jitted = jax.jit(
    step_fn,
    in_shardings=(state_sh, job.frozen_sh, batch_sh),
    out_shardings=(state_sh, repl),
    donate_argnums=(0,),
  )
  return jitted, state_sh


def _guarded_step(job: Job):
  """(compile_step, state shardings): the guarded step, compiled ahead of the first step."""
  jitted, state_sh = guarded_jit(job)

  def compile_step(state, frozen, batch):
    """Compiles ahead of the first step, so that compilation is timed apart from training
    and XLA's cost analysis of the compiled step is at hand; returns (step, seconds, cost)."""
    t0 = time.time()
    with compile_cache.hits() as cache, jax.set_mesh(job.mesh), nn.logical_axis_rules(job.rules):
      compiled = jitted.lower(state, frozen, batch).compile()
    seconds = time.time() - t0

    def run_step(state, frozen, batch):
      with jax.set_mesh(job.mesh), nn.logical_axis_rules(job.rules):
        return compiled(state, frozen, batch)

    run_step.compiled = compiled  # benchmarks read its HLO
    run_step.from_cache = cache["hits"] > 0
    return run_step, seconds, perf.cost(compiled)

  return compile_step, state_sh


def _abstract_with_guard(job: Job, state_sh):
  abstract = dict(job.state_abs, guard=guard_abstract())
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh
  )


def _fresh_state(job: Job, state_sh):
  state = job.init_state()
  repl = sharding.replicated(job.mesh)
  state = dict(
    state,
    guard=jax.device_put(
      {
        "nonfinite_steps": np.int32(0),
        "last_nonfinite_step": np.int32(-1),
        "bad_examples": np.int32(0),
      },
      repl,
    ),
  )
  return jax.device_put(state, state_sh)


def _next_batch(job: Job, it, step: int, bad_paths: list[str]) -> dict:
  local = next(it)
  if "_bad" not in local:
    n = len(next(iter(local.values())))
    local["_bad"] = np.zeros((n,), np.int32)
  if local["_bad"].any():
    for where in job.loader.bad_examples(local):
      logging.warning(
        "step %d: skipped unreadable example %s (a readable one stands in, "
        "the same on every resume)",
        step,
        where,
      )
      bad_paths.append(where)
  local.pop("_bad_index", None)
  return sharding.global_batch(local, job.mesh)


# --------------------------------------------------------------------------- the loop
def run(job: Job) -> dict:
  """Trains until config.total_steps (or an agreed preemption); returns the last row (the
  final evaluation when the job has one, {'stopped_at': step} after a preemption)."""
  c, workdir = job.config, job.workdir
  if c.tensorboard:
    metrics_lib.preload_writers()
  lock = workdir_lock.WorkdirLock(workdir)
  lock.acquire()
  ckpt = ckpt_lib.Checkpointer(
    workdir, keep=c.keep_checkpoints, async_save=c.get("async_checkpointing", True)
  )
  writer = None
  try:
    compile_step, state_sh = _guarded_step(job)
    restored_step, state, data_state = ckpt.restore_latest(_abstract_with_guard(job, state_sh))
    check_frozen(workdir, job.frozen_fingerprint, resuming=restored_step is not None)
    if state is None:
      state = _fresh_state(job, state_sh)
    else:
      logging.info("resumed from %s/%d", ckpt.directory, restored_step)
    step = int(jax.device_get(state["step"]))
    _move_loader(job.loader, data_state, step)
    it = iter(job.loader)
    writer = metrics_lib.MetricLogger(workdir, c.total_steps, c.tensorboard)
    with PREEMPTION.watching():
      return _loop(job, state, step, it, compile_step, ckpt, writer)
  finally:
    try:
      ckpt.close()
    finally:
      if writer is not None:
        writer.close()
      lock.release()


def _loop(job, state, step, it, compile_step, ckpt, writer) -> dict:
  prof = profiler.StepProfiler(job.config, job.workdir)
  try:
    return _steps(job, state, step, it, compile_step, ckpt, writer, prof)
  finally:
    prof.stop()


def _steps(job, state, step, it, compile_step, ckpt, writer, prof) -> dict:
  c = job.config
  last_row, batch, bad_paths, step_fn = {}, None, [], None
  while step < c.total_steps:
    batch = _next_batch(job, it, step, bad_paths)
    if step_fn is None:  # compiled once, timed apart: throughput and ETA exclude it
      step_fn, seconds, cost = compile_step(state, job.frozen, batch)
      scan = bool(c.get("model") and c.model.get("scan_layers", False))
      writer.set_compiled(
        seconds,
        cost,
        scan_layers=scan,
        from_cache=step_fn.from_cache,
        model_flops=flops_lib.model_flops(c),
      )
      writer.mark(step)
    prof.before(step + 1)
    with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
      state, metrics = step_fn(state, job.frozen, batch)
    step += 1
    prof.after(step, metrics)
    is_last = step == c.total_steps
    stopping = PREEMPTION.reached(step)
    save_now = step % c.checkpoint_every == 0 or is_last or stopping
    log_now = step % c.log_every == 0 or is_last
    hook_now = (
      job.on_log is not None and job.log_hook_every and (step % job.log_hook_every == 0 or is_last)
    )
    if log_now or save_now or hook_now:
      scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
      guard = jax.device_get(state["guard"])
      _nonfinite_check(c, step, guard, ckpt)  # a skipped step never reaches a checkpoint
      _bad_data_check(c, step, guard, bad_paths)
      scalars["bad_examples"] = float(guard["bad_examples"])
      if int(guard["nonfinite_steps"]):
        scalars["nonfinite_steps"] = float(guard["nonfinite_steps"])
      if hook_now:
        t0 = time.time()
        scalars.update(job.on_log(step, state))
        writer.pause(time.time() - t0)  # the monitor's time is not training throughput
        log_now = True
      if log_now:
        last_row = writer.write(step, scalars, images_per_step=job.images_per_step)
    if job.evaluate is not None and job.eval_every and step % job.eval_every == 0 and not is_last:
      last_row = _write_eval(writer, step, job.evaluate(state), job.images_per_step)
    if job.on_vis is not None and job.vis_every and step % job.vis_every == 0:
      job.on_vis(state, job.frozen, batch, step)
    if save_now:
      ckpt.save(step, state, job.loader.get_state(), force=stopping)
    if stopping:
      ckpt.wait()  # the process is about to end: the write must be complete
      logging.warning(
        "preemption (SIGTERM): saved step %d in %s on every process, exiting", step, ckpt.directory
      )
      PREEMPTION.handled()
      return {"stopped_at": step}
  if job.evaluate is not None:
    last_row = _write_eval(writer, step, job.evaluate(state), job.images_per_step)
  if job.at_end is not None and batch is not None:
    job.at_end(state, job.frozen, batch, step)
  return last_row


def _write_eval(writer, step: int, row: dict, images_per_step: int) -> dict:
  scalars = {k: v for k, v in row.items() if isinstance(v, (int, float, np.floating))}
  writer.mark(step)  # no throughput on evaluation rows; the next interval starts now
  writer.write(step, scalars, images_per_step=images_per_step)
  logging.info("eval at step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
  return dict(row, step=step)
