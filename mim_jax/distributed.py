"""Multi-process set-up: jax.distributed from the config, the environment or the cluster.

`initialize(config)` runs before any JAX computation (the runner calls it first). Where
the three facts a process needs come from, first match wins, field by field:

  1. the config: `coordinator_address` ("host:port"), `num_processes`, `process_id`;
  2. the standard variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID;
  3. a cluster jax detects itself (`jax/_src/clusters/` in jax-ml/jax: SLURM, Open MPI,
     Cloud TPU VMs on GCE and GKE, Kubernetes with the `kubernetes` package).

A missing piece with no cluster to fill it is a `DistributedSetupError`: one line that says
what to set. The SLURM coordinator is the first node of SLURM_STEP_NODELIST on port
61440 + SLURM_JOB_ID % 4096 (JAX_COORDINATOR_PORT overrides the port);
`jax/_src/clusters/slurm_cluster.py`. Under SLURM and Open MPI jax also gives each process
one GPU (its local rank) unless `local_device_ids` (config, a list or "0,1,...") or
JAX_LOCAL_DEVICE_IDS lists them: launch/slurm_gpu.sbatch runs one process per node and
lists all of the node's GPUs.

Multi-process jitted computations on CPU need cross-process collectives: jax 0.10.2 uses
gloo by default (`jax_cpu_collectives_implementation`); without it they fail with
"Multiprocess computations aren't implemented on the CPU backend".

On CPU, gloo gives a process 30 s to reach a collective its peers are in the first time
(the collective's set-up), so the processes of one job must compile in step.

`jax.distributed.initialize` also starts jax's preemption notifier, even for one process:
from then on SIGTERM is caught in C++ (a Python `signal.signal` handler installed before is
bypassed, one installed after replaces the notifier) and
`jax.experimental.multihost_utils.reached_preemption_sync_point(step)` turns True at the
same step on every process. A SIGTERM caught by a Python handler before initialize can be
re-sent with os.kill(os.getpid(), SIGTERM) afterwards: the notifier takes it.

A process that cannot join (coordinator unreachable, a peer never started) would be
aborted by jax with a C++ stack trace; `initialize` ends it first with one `error:` line
and exit code 2 after config.distributed_timeout_s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import socket
import sys
import threading
from typing import Any, Mapping
import warnings

import jax

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"
DEFAULT_TIMEOUT_S = 300

_HOW_TO = (
  f"set {ENV_COORDINATOR}=host:port (process 0's host and a free port), "
  f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} on every process "
  "(or --config.coordinator_address / num_processes / process_id), "
  "or launch under SLURM / Open MPI / a Cloud TPU pod"
)


class DistributedSetupError(ValueError):
  """The multi-process set-up cannot start; the message is one line naming what to set."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """What jax.distributed.initialize is called with."""

  coordinator_address: str
  num_processes: int
  process_id: int
  local_device_ids: tuple[int, ...] | None  # None: jax's choice (see the module docstring)
  timeout_s: int
  cluster: str | None  # the detected cluster that filled some of the above, if any


_SETTINGS: Settings | None = None  # what this process was initialised with (for describe)


# --------------------------------------------------------------------------- resolution
def _get(config, name: str, default):
  value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
  return default if value is None else value


def _int_from(value, name: str) -> int:
  try:
    return int(str(value).strip())
  except ValueError:
    raise DistributedSetupError(f"{name}={value!r} is not an integer") from None


def _device_ids(value, name: str) -> tuple[int, ...] | None:
  """A list of ints or a comma-separated string ("0,1,2,3"); "" / None / [] -> jax default."""
  if value is None or (isinstance(value, str) and not value.strip()):
    return None
  items = value.split(",") if isinstance(value, str) else list(value)
  if not items:
    return None
  ids = tuple(_int_from(x, name) for x in items)
  if any(i < 0 for i in ids):
    raise DistributedSetupError(f"{name}={value!r}: device ids must be >= 0")
  return ids


def _cluster_env():
  """The jax ClusterEnv class jax.distributed.initialize() would auto-detect, or None.

  The same walk as `ClusterEnv.auto_detect_unset_distributed_params` in
  jax-ml/jax:jax/_src/clusters/cluster.py: declared order, opt-in methods (mpi4py) skipped.
  """
  from jax._src import clusters  # pylint: disable=g-import-not-at-top

  with warnings.catch_warnings():  # k8s without the `kubernetes` package warns in 8 lines
    warnings.simplefilter("ignore")
    for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
      if env.opt_in_only_method:
        continue
      with contextlib.suppress(Exception):  # a broken probe means "not this cluster"
        if env.is_env_present():
          return env
  return None


def detect_cluster() -> str | None:
  """Name of the cluster jax would auto-detect here ("slurm", "ompi", ...), or None."""
  env = _cluster_env()
  return None if env is None else (env.name or env.__name__)


def resolve(config, environ: Mapping[str, str] | None = None) -> Settings:
  """The settings `initialize` would use; raises DistributedSetupError (one line) if they are
  incomplete or invalid. Starts nothing: safe to call in tests.

  Pieces missing from the config and the environment come from the detected cluster, asked
  the way jax asks it (JAX_COORDINATOR_PORT overrides its port); the local device ids stay
  for jax to choose unless given.
  """
  environ = os.environ if environ is None else environ
  source = {}

  def pick(field: str, unset, env: str, parse):
    value = _get(config, field, unset)
    if value != unset:
      source[field] = f"config.{field}"
      return parse(value, f"config.{field}")
    if environ.get(env, "").strip():
      source[field] = env
      return parse(environ[env], env)
    return None

  coordinator = pick("coordinator_address", "", ENV_COORDINATOR, lambda v, n: str(v).strip())
  num = pick("num_processes", 0, ENV_NUM_PROCESSES, _int_from)
  pid = pick("process_id", -1, ENV_PROCESS_ID, _int_from)
  local_ids = _device_ids(_get(config, "local_device_ids", None), "config.local_device_ids")
  if local_ids is None:
    local_ids = _device_ids(environ.get(ENV_LOCAL_DEVICE_IDS), ENV_LOCAL_DEVICE_IDS)
  timeout = _int_from(
    _get(config, "distributed_timeout_s", DEFAULT_TIMEOUT_S), "config.distributed_timeout_s"
  )
  if timeout <= 0:
    raise DistributedSetupError(f"config.distributed_timeout_s={timeout} must be > 0 (seconds)")

  cluster = None
  if None in (coordinator, num, pid):
    env = _cluster_env()
    if env is None:
      missing = [
        what
        for what, v in (
          (f"the coordinator address ({ENV_COORDINATOR})", coordinator),
          (f"the number of processes ({ENV_NUM_PROCESSES})", num),
          (f"the process id ({ENV_PROCESS_ID})", pid),
        )
        if v is None
      ]
      hint = ""
      if "KUBERNETES_SERVICE_HOST" in environ:
        hint = " (Kubernetes seen, but its detection needs `pip install jax[k8s]`)"
      raise DistributedSetupError(
        f"config.distributed=True but no cluster was detected{hint} and "
        f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing: {_HOW_TO}"
      )
    cluster = env.name or env.__name__
    try:
      if coordinator is None:
        coordinator = env.get_coordinator_address(
          timeout_secs=timeout, override_coordinator_port=environ.get("JAX_COORDINATOR_PORT")
        )
      num = env.get_process_count() if num is None else num
      pid = env.get_process_id() if pid is None else pid
    except Exception as e:  # pylint: disable=broad-except
      raise DistributedSetupError(
        f"{cluster} cluster detected but its settings cannot be read "
        f"({type(e).__name__}: {_first_line(e)}): {_HOW_TO}"
      ) from e
    for field in ("coordinator_address", "num_processes", "process_id"):
      source.setdefault(field, f"the {cluster} cluster")

  host, _, port = str(coordinator).rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedSetupError(
      f"coordinator address {coordinator!r} (from {source['coordinator_address']}) is not "
      f"host:port, e.g. 10.0.0.1:12345"
    )
  if num < 1:
    raise DistributedSetupError(
      f"number of processes {num} (from {source['num_processes']}) must be >= 1"
    )
  if not 0 <= pid < num:
    raise DistributedSetupError(
      f"process id {pid} (from {source['process_id']}) is not in [0, {num}) (the number of "
      f"processes, from {source['num_processes']})"
    )
  return Settings(str(coordinator), num, pid, local_ids, timeout, cluster)


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


# --------------------------------------------------------------------------- set-up
def _on_cpu() -> bool:
  platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
  return not platforms or "cpu" in platforms.split(",")


def _check_port_free(settings: Settings) -> None:
  """Process 0 serves the coordinator; a port in use makes jax crash (SIGSEGV) in C++."""
  bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS", "")
  port = int((bind or settings.coordinator_address).rpartition(":")[2])
  for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
    try:
      sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:  # no IPv6 on this host: try IPv4
      continue
    with sock:
      sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: TIME_WAIT is fine
      try:
        sock.bind((host, port))
      except OSError as e:
        if e.errno == errno.EADDRINUSE:
          raise DistributedSetupError(
            f"process 0 cannot serve the JAX coordinator at {settings.coordinator_address}: "
            f"port {port} is in use on this host; choose a free port "
            f"({ENV_COORDINATOR} / config.coordinator_address, or JAX_COORDINATOR_PORT under "
            f"a cluster)"
          ) from None
        continue
      return


def _stuck_message(settings: Settings) -> str:
  return (
    f"process {settings.process_id} of {settings.num_processes} did not join the JAX "
    f"coordinator at {settings.coordinator_address} within {settings.timeout_s} s "
    f"(config.distributed_timeout_s): check that all {settings.num_processes} processes "
    f"were started with the same coordinator address and process count, and that "
    f"process 0's port is reachable from this host"
  )


def _start_watchdog(settings: Settings) -> threading.Event:
  """jax aborts the process (a C++ CHECK, 15 lines of stack) when the coordinator cannot be
  reached or a process never joins; this ends it first with one line and exit code 2 (the
  code mim_jax.runner gives input problems). Set the returned event once joined."""
  joined = threading.Event()

  def watch():
    if not joined.wait(settings.timeout_s):
      sys.stderr.write(f"error: {_stuck_message(settings)}\n")
      sys.stderr.flush()
      os._exit(2)  # pylint: disable=protected-access

  threading.Thread(target=watch, name="mim_jax-distributed-watchdog", daemon=True).start()
  return joined


def initialize(config) -> None:
  """jax.distributed.initialize from config / env / cluster when config.distributed is True.

  Call before any JAX computation; a second call does nothing. Raises DistributedSetupError
  (one line) for missing or invalid settings and a busy coordinator port; a process that
  cannot join within config.distributed_timeout_s prints one `error:` line and exits 2.
  """
  global _SETTINGS
  if not _get(config, "distributed", False) or jax.distributed.is_initialized():
    return
  settings = resolve(config)
  if settings.process_id == 0:
    _check_port_free(settings)
  if _on_cpu() and not jax.config.jax_cpu_collectives_implementation:
    # Cross-process jitted computations on CPU need a collectives backend (gloo is
    # jax 0.10.2's default; this restores it if something switched it off).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs: dict[str, Any] = dict(
    coordinator_address=settings.coordinator_address,
    num_processes=settings.num_processes,
    process_id=settings.process_id,
    # jax's own deadline ends in an abort: leave room for the watchdog to speak first.
    initialization_timeout=settings.timeout_s + 60,
  )
  if settings.local_device_ids is not None:
    kwargs["local_device_ids"] = list(settings.local_device_ids)
  joined = _start_watchdog(settings)
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # pylint: disable=broad-except
    raise DistributedSetupError(
      f"process {settings.process_id} of {settings.num_processes} could not join the JAX "
      f"coordinator at {settings.coordinator_address}: {_first_line(e)}"
    ) from e
  finally:
    joined.set()
  _SETTINGS = settings


def describe() -> str:
  """One line for the log: process i of n, local/global devices, coordinator."""
  if _SETTINGS is None:
    coordinator = "no coordinator (single process)"
  else:
    how = f" (from {_SETTINGS.cluster} cluster detection)" if _SETTINGS.cluster else ""
    coordinator = f"coordinator {_SETTINGS.coordinator_address}{how}"
  return (
    f"process {jax.process_index()} of {jax.process_count()}, "
    f"{jax.local_device_count()} local / {jax.device_count()} global "
    f"{jax.default_backend()} devices, {coordinator}"
  )
