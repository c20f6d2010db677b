"""Step profiles: `--config.profile.start_step=N --config.profile.num_steps=K` traces the
steps N .. N+K-1 (numbered as in metrics.jsonl) with jax.profiler into DIR/profile, where
TensorBoard's profile plugin, XProf or Perfetto (the .trace.json.gz) open them. Every step
carries a StepTraceAnnotation, so the trace viewer shows step boundaries.

Start after compilation (N >= 2) to see the steady state; every process writes its own
file (named by host) under the same directory.
"""

from __future__ import annotations

import os

from absl import logging
import jax


def check(config) -> None:
  """One-line errors (ValueError) naming the field; called before anything is built."""
  p = config.get("profile")
  if p is None:
    return
  for field, least in (("start_step", 0), ("num_steps", 1)):
    value = p.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
      raise ValueError(f"config.profile.{field} must be an integer >= {least}, got {value!r}")


class StepProfiler:
  """Starts jax.profiler before step `start_step` and stops it after `num_steps` steps."""

  def __init__(self, config, workdir: str):
    p = config.get("profile")
    self.first = int(p.start_step) if p is not None else 0
    self.last = self.first + (int(p.num_steps) if p is not None else 0) - 1
    self.directory = os.path.join(workdir, "profile")
    self.active = False
    self.started_at = self.done = None

  def before(self, step: int) -> None:
    """`step`: the number of the step about to run (1-based)."""
    if self.first and not self.active and self.first <= step <= self.last:
      jax.profiler.start_trace(self.directory)
      self.active, self.started_at = True, step

  def after(self, step: int, outputs) -> None:
    """`step`: the number of the step just dispatched; `outputs`: what it returned."""
    if not self.active:
      return
    self.done = step
    if step >= self.last:
      jax.block_until_ready(outputs)  # the device work of the last step belongs in the trace
      self.stop()

  def stop(self) -> None:
    """Ends the trace (also when the run stops early: preemption, an error)."""
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      logging.info(
        "profile of steps %d-%s written to %s", self.started_at, self.done, self.directory
      )
