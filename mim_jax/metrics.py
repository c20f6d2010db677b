"""Metric writing: clu writers (TensorBoard + log), DIR/metrics.jsonl, console progress."""

from __future__ import annotations

import datetime
import json
import math
import os
import threading
import time
from typing import Mapping

from absl import logging
import jax

from mim_jax import cli
from mim_jax import perf


def preload_writers() -> threading.Thread:
  """Imports clu's writers (and with them TensorFlow, ~5 s) on a thread, so that the import
  overlaps the step's compilation instead of delaying start-up and every `--help`."""
  thread = threading.Thread(target=_import_writers, daemon=True, name="preload-clu")
  thread.start()
  return thread


def _import_writers():
  cli.quiet_tensorflow()
  from clu import metric_writers  # pylint: disable=g-import-not-at-top

  return metric_writers


class MetricLogger:
  """Writes one JSON object per logging step and, unless `tensorboard` is False,
  TensorBoard scalars (process 0 only)."""

  def __init__(self, workdir: str, total_steps: int, tensorboard: bool = True):
    self.is_main = jax.process_index() == 0
    self.tensorboard = tensorboard
    self.total_steps = total_steps
    self.workdir = workdir
    self._writer = None  # created at the first row: its import overlaps compilation
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._t0 = time.time()
    self._last_time = None
    self._last_step = None
    self._flops = None  # FLOPs of one step per device (set_compiled)
    self._compile_s = None  # reported once, on the first row after compilation
    self._cache_hit = 0
    self._chips = jax.device_count()

  def set_compiled(
    self,
    seconds: float,
    cost: dict,
    scan_layers: bool = False,
    from_cache: bool = False,
    model_flops: float | None = None,
  ):
    """Compilation time (kept out of throughput and ETA), whether the step was loaded from
    the persistent compilation cache, and the FLOPs of one step behind the TFLOP/s and MFU
    fields: `model_flops` (the whole batch's, mim_jax/flops.py) split over the devices where
    the method has a formula, else XLA's count per device. Model FLOPs, not XLA's, because
    XLA:GPU's cost analysis leaves out the cuBLAS/cuDNN calls that do the matmuls (an H200
    CCViT ViT-B/16 step: 5.7 GFLOP per image counted against 127.7 done; BENCHMARKS.md §13),
    and under scan_layers XLA counts the layer loop once."""
    self._compile_s = seconds
    self._cache_hit = int(from_cache)
    xla = cost.get("flops")
    if model_flops:
      self._flops = model_flops / self._chips
    else:
      self._flops = None if scan_layers else xla
    source = "model FLOPs, mim_jax/flops.py" if model_flops else "XLA"
    logging.info(
      "%s the step in %.1f s%s%s",
      "loaded (compilation cache)" if from_cache else "compiled",
      seconds,
      f", {self._flops / 1e9:.4g} GFLOP per device per step ({source})" if self._flops else "",
      f"; XLA counts {xla / 1e9:.4g}" if model_flops and xla else "",
    )

  @property
  def writer(self):
    if self._writer is None:
      self._writer = _import_writers().create_default_writer(
        self.workdir, just_logging=not self.is_main, asynchronous=False
      )
    return self._writer

  def mark(self, step: int):
    """Starts the throughput clock at `step` (after compilation/restore)."""
    self._last_time, self._last_step = time.time(), step

  def pause(self, seconds: float):
    """Leaves `seconds` of non-training work (a kNN monitor) out of the throughput."""
    if self._last_time is not None:
      self._last_time += seconds

  def write(self, step: int, scalars: Mapping[str, float], *, images_per_step: int) -> dict:
    now = time.time()
    row = {"step": int(step)}
    row.update({k: float(v) for k, v in scalars.items()})
    if self._last_time is not None and step > self._last_step:
      dt = now - self._last_time
      steps = step - self._last_step
      row["img_per_s"] = images_per_step * steps / max(dt, 1e-9)
      row["img_per_s_per_chip"] = row["img_per_s"] / self._chips
      row["step_time_s"] = dt / steps
      row.update(perf.efficiency(self._flops, dt / steps))
      eta = (self.total_steps - step) * dt / steps
    else:
      eta = math.nan
    self._last_time, self._last_step = now, step
    if self._compile_s is not None:
      row["compile_s"], self._compile_s = self._compile_s, None
      row["compile_cache_hit"] = self._cache_hit
    if self.is_main:
      with open(self.jsonl_path, "a") as f:
        f.write(json.dumps(row) + "\n")
      if self.tensorboard:
        self.writer.write_scalars(step, {k: v for k, v in row.items() if k != "step"})
      eta_s = "?" if math.isnan(eta) else str(datetime.timedelta(seconds=int(eta)))
      shown = " ".join(f"{k}={v:.4g}" for k, v in row.items() if k not in ("step", "step_time_s"))
      logging.info(
        "step %d/%d (%.0f%%) %s | ETA %s",
        step,
        self.total_steps,
        100.0 * step / self.total_steps,
        shown,
        eta_s,
      )
    return row

  def close(self):
    if self._writer is not None:
      self._writer.flush()
      self._writer.close()
