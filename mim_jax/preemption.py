"""Preemption agreed by every process: a SIGTERM seen by any process makes all of them save
the same step and exit 0.

The entry points install the handler on their first line (`install_if_main`), so a SIGTERM
during imports, data set-up or compilation is caught too.
"""

from __future__ import annotations

import contextlib
import os
import signal

from absl import logging


class Preemption:
  """SIGTERM seen by any process -> every process saves the same step and exits 0.

  One process: a Python handler sets a flag. Several: jax's preemption sync manager (started
  by jax.distributed.initialize) catches SIGTERM, tells every process through the
  coordination service, and `reached_preemption_sync_point(step)` turns True at the same
  step everywhere. A SIGTERM that arrives before jax.distributed.initialize is caught by the
  Python handler and re-sent to this process once jax's handler is in place.
  """

  def __init__(self):
    self.signum = None
    self._multi = False

  def install(self):
    signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, _):
    self.signum = signum

  def after_distributed_init(self):
    # jax.distributed.initialize starts the notifier even for one process, and from then on
    # it (not the Python handler) receives SIGTERM.
    from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top

    self._multi = jax_distributed.global_state.preemption_sync_manager is not None
    if self._multi and self.signum is not None:
      logging.warning("SIGTERM during start-up: passing it to the other processes")
      os.kill(os.getpid(), signal.SIGTERM)

  def handled(self):
    """The stop has been saved: a later loop in this process (library use) starts afresh."""
    self.signum = None

  @contextlib.contextmanager
  def watching(self):
    """SIGTERM handled for the duration of a loop, also when the runner is called as a
    library (no entry point installed the handler); the previous handler comes back after.
    Never while jax's notifier owns SIGTERM: a Python handler would silence it."""
    if self._multi:
      yield
      return
    previous = signal.signal(signal.SIGTERM, self._on_signal)
    try:
      yield
    finally:
      signal.signal(signal.SIGTERM, previous)

  def reached(self, step: int) -> bool:
    """True at the step where every process stops; call it at every step."""
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      return multihost_utils.reached_preemption_sync_point(step)
    return self.signum is not None


PREEMPTION = Preemption()


def install_if_main(module_name: str) -> None:
  """Called first thing by `python -m mim_jax.train` / `mim_jax.evaluate`."""
  if module_name == "__main__":
    PREEMPTION.install()
