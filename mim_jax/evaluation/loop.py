"""The training loop shared by the linear probe and fine-tuning, on the trainer's machinery.

Same contract as `mim_jax.train`: orbax checkpoints of the state *and* the grain iterator
position (exact resume: re-run the same command), SIGTERM saves and exits, non-finite
losses stop the run and keep the last good checkpoint, metrics go to DIR/metrics.jsonl
and TensorBoard through `metrics.MetricLogger`. Evaluation on the test split runs every
`config.eval_every` steps and at the end; its rows carry `top1`, `top5`, `test_loss`.
"""
from __future__ import annotations

import signal
from typing import Any, Callable

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mim_jax import checkpoint as ckpt_lib
from mim_jax import metrics as metrics_lib
from mim_jax import sharding
from mim_jax import train


def state_shardings(tx, params_abs, params_sh, mesh, extra: dict | None = None):
  """(abstract state, shardings) of {step, params, opt_state, rng, **extra}.

  `extra` maps names to (abstract, sharding) pairs (batch statistics, EMA weights).
  The optimizer state is sharded like the parameters it tracks (as train.Trainer does).
  """
  repl = sharding.replicated(mesh)
  opt_abs = jax.eval_shape(tx.init, params_abs)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abs, params_sh,
                                 transform_non_params=lambda _: repl,
                                 is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  state_abs = dict(step=jax.ShapeDtypeStruct((), jnp.int32), params=params_abs,
                   opt_state=opt_abs, rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
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


def jit_step(step_fn, state_sh, mesh, rules):
  batch_sh = sharding.batch_sharding(mesh)
  jitted = jax.jit(step_fn, in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))

  def run(state, batch):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted(state, batch)

  return run


def summarize(sums: dict) -> dict:
  n = max(float(sums["count"]), 1.0)
  return {"top1": float(sums["correct"]) / n, "top5": float(sums["correct5"]) / n,
          "test_loss": float(sums["loss_sum"]) / n, "test_examples": int(sums["count"])}


def add_sums(total: dict | None, sums: dict) -> dict:
  sums = {k: float(v) for k, v in jax.device_get(sums).items()}
  return sums if total is None else {k: total[k] + sums[k] for k in total}


def restore_or_init(ckpt, state_abs, state_sh, init_fn: Callable[[], Any], loader):
  """(state, resumed step or None): the newest checkpoint (data position included) or init."""
  latest = ckpt.latest_step()
  if latest is None:
    return init_fn(), None
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          state_abs, state_sh)
  state, data_state = ckpt.restore(latest, abstract)
  if data_state is not None:
    loader.set_state(data_state)
  logging.info("resumed from %s/%d", ckpt.directory, latest)
  return state, latest


def run(config, workdir: str, *, state, step_fn, loader, evaluate_fn: Callable[[Any], dict],
        ckpt: ckpt_lib.Checkpointer, mesh, images_per_step: int) -> dict:
  """Trains until config.total_steps (or SIGTERM); returns the last evaluation row."""
  stop = {"sig": None}
  old_handler = signal.signal(signal.SIGTERM, lambda signum, _: stop.update(sig=signum))
  step = int(jax.device_get(state["step"]))
  writer = metrics_lib.MetricLogger(workdir, config.total_steps)
  it = iter(loader)
  last_eval: dict = {}
  try:
    writer.mark(step)
    while step < config.total_steps:
      batch = sharding.global_batch(next(it), mesh)
      state, metrics = step_fn(state, batch)
      step += 1
      is_last = step == config.total_steps
      stopping = stop["sig"] is not None
      save_now = step % config.checkpoint_every == 0 or is_last or stopping
      log_now = step % config.log_every == 0 or is_last
      if log_now or save_now:
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
        train._check_finite(step, scalars, ckpt, workdir)   # pylint: disable=protected-access
        if log_now:
          writer.write(step, scalars, images_per_step=images_per_step)
      if config.eval_every and step % config.eval_every == 0 and not is_last:
        last_eval = _write_eval(writer, step, evaluate_fn(state), images_per_step)
      if save_now:
        ckpt.save(step, state, train.loader_state(it), force=stopping)
      if stopping:
        ckpt.wait()
        logging.warning("signal %d: saved step %d in %s, exiting", stop["sig"], step,
                        ckpt.directory)
        return {"stopped_at": step}
    last_eval = _write_eval(writer, step, evaluate_fn(state), images_per_step)
  finally:
    ckpt.close()
    writer.close()
    signal.signal(signal.SIGTERM, old_handler)
  return last_eval


def _write_eval(writer, step: int, row: dict, images_per_step: int) -> dict:
  scalars = {k: v for k, v in row.items() if isinstance(v, (int, float, np.floating))}
  writer.mark(step)   # no throughput on evaluation rows; the next interval starts now
  writer.write(step, scalars, images_per_step=images_per_step)
  logging.info("eval at step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
  return dict(row, step=step)
