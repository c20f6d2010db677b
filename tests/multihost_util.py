"""Multi-process test harness: N real JAX processes on loopback, fake CPU devices each.

Not a test module (pytest collects test_*.py only). Every process writes its stdout and
stderr to one log file; `Job.report()` prints the tails for assertion messages.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_CONFIG = os.path.join(ROOT, "configs", "ccvit_vitb.py")
# SlurmCluster's port: 61440 + SLURM_JOB_ID % 4096 (jax-ml/jax:jax/_src/clusters/slurm_cluster.py)
SLURM_PORT_BASE = 65535 - 2**12 + 1
# Compilation dominates these runs: a third less CPU time with XLA's cheap CPU pipeline (the
# same in every run, so losses still compare exactly). It also keeps the 2 processes of a
# job in step: gloo (CPU collectives) gives a peer only 30 s to reach a first collective.
QUICK_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# Variables that would make a child join (or detect) a cluster this test did not start.
CLUSTER_VARIABLES = (
  "JAX_COORDINATOR_ADDRESS",
  "JAX_NUM_PROCESSES",
  "JAX_PROCESS_ID",
  "JAX_LOCAL_DEVICE_IDS",
  "JAX_COORDINATOR_PORT",
  "KUBERNETES_SERVICE_HOST",
)


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def free_slurm_job_id() -> int:
  """A SLURM_JOB_ID whose derived coordinator port is free on this machine."""
  for offset in range(2**12):
    job_id = (os.getpid() * 7 + offset) % 2**12
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", SLURM_PORT_BASE + job_id))
      except OSError:
        continue
    return 4096 * 100 + job_id
  raise RuntimeError("no free port in the SLURM range 61440-65535")


def cpu_env(devices: int, extra: dict | None = None) -> dict:
  """Environment of a child JAX process with `devices` fake CPU devices and no cluster."""
  env = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("SLURM_", "OMPI_", "TPU_")) and k not in CLUSTER_VARIABLES
  }
  env.update(
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {QUICK_COMPILE}",
    JAX_PLATFORMS="cpu",
    CUDA_VISIBLE_DEVICES="",
    TF_CPP_MIN_LOG_LEVEL="3",
    PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    PYTHONUNBUFFERED="1",
  )
  env.update(extra or {})
  return env


def process_env(
  process_id: int, num_processes: int, port: int, devices: int, extra: dict | None = None
) -> dict:
  """cpu_env plus the standard JAX_* variables of one process of a loopback job."""
  return cpu_env(
    devices,
    {
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
      "JAX_NUM_PROCESSES": str(num_processes),
      "JAX_PROCESS_ID": str(process_id),
      **(extra or {}),
    },
  )


@dataclasses.dataclass
class Job:
  """Processes started together; logs[i] holds process i's stdout and stderr."""

  procs: list[subprocess.Popen]
  logs: list[str]
  started: float = dataclasses.field(default_factory=time.time)

  def wait(self, timeout: float, since: float | None = None) -> list[int | None]:
    """Exit codes; a process still running `timeout` s after `since` (default: the start)
    is killed -> None."""
    deadline = (self.started if since is None else since) + timeout
    codes = []
    for p in self.procs:
      try:
        codes.append(p.wait(timeout=max(0.1, deadline - time.time())))
      except subprocess.TimeoutExpired:
        codes.append(None)
    self.kill()
    return codes

  def running(self) -> bool:
    return any(p.poll() is None for p in self.procs)

  def signal(self, i: int, sig=signal.SIGTERM) -> None:
    if self.procs[i].poll() is None:
      self.procs[i].send_signal(sig)

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
    for p in self.procs:
      p.wait()

  def report(self, tail: int = 3000) -> str:
    """The tail of every process's log, for assertion messages."""
    parts = []
    for i, (p, path) in enumerate(zip(self.procs, self.logs)):
      with open(path, errors="replace") as f:
        text = f.read()
      parts.append(f"--- process {i} (exit {p.poll()}) {path}:\n{text[-tail:]}")
    return "\n".join(parts)


def launch(cmd: list[str], envs: list[dict], log_dir: str, name: str) -> Job:
  """Starts one `cmd` per environment (cwd = the repository); logs to log_dir/name.<i>.log."""
  os.makedirs(log_dir, exist_ok=True)
  procs, logs = [], []
  for i, env in enumerate(envs):
    path = os.path.join(log_dir, f"{name}.{i}.log")
    with open(path, "w") as log:
      procs.append(
        subprocess.Popen(
          cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
      )
    logs.append(path)
  return Job(procs, logs)


def launch_local(
  cmd: list[str],
  num_processes: int,
  devices_per_process: int,
  log_dir: str,
  name: str,
  extra_env: dict | None = None,
) -> Job:
  """`cmd` as a loopback job of num_processes processes (1: no JAX_* variables at all)."""
  if num_processes == 1:
    envs = [cpu_env(devices_per_process, extra_env)]
  else:
    port = free_port()
    envs = [
      process_env(i, num_processes, port, devices_per_process, extra_env)
      for i in range(num_processes)
    ]
  return launch(cmd, envs, log_dir, name)


# --------------------------------------------------------------------------- the trainer
def train_cmd(
  workdir: str, flags: list[str], distributed: bool, config: str = TRAIN_CONFIG
) -> list[str]:
  cmd = [sys.executable, "-m", "mim_jax.train", f"--config={config}", f"--workdir={workdir}"]
  # No persistent compilation cache (config.compilation_cache is on by default): a process
  # that hits it while its peer compiles would leave the peer > 30 s behind.
  cmd += ["--config.compilation_cache="]
  return cmd + flags + (["--config.distributed=True"] if distributed else [])


def launch_train(
  workdir: str,
  flags: list[str],
  num_processes: int,
  devices_per_process: int,
  log_dir: str,
  name: str,
) -> Job:
  """The trainer CLI as a loopback job (no persistent compilation cache, see train_cmd)."""
  cmd = train_cmd(workdir, flags, distributed=num_processes > 1)
  return launch_local(cmd, num_processes, devices_per_process, log_dir, name)


def metrics(workdir: str) -> dict[int, dict]:
  """step -> the last logged training row of that step (a resumed run re-logs some)."""
  rows = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return rows
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        r = json.loads(line)
      except json.JSONDecodeError:  # a line being written right now
        continue
      if isinstance(r.get("step"), int) and "loss" in r:
        rows[r["step"]] = r
  return rows


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of finished checkpoints (orbax renames the temporary directory into <step>/
  only once every process has written its part)."""
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def unfinished_checkpoints(workdir: str) -> list[str]:
  """orbax's temporary step directories (a save that has not been finalised)."""
  d = os.path.join(workdir, "checkpoints")
  return sorted(n for n in os.listdir(d) if "tmp" in n) if os.path.isdir(d) else []


def copy_workdir_at(src: str, dst: str, step: int) -> None:
  """A copy of workdir src as if its run had stopped right after saving `step`: later
  checkpoints and metrics rows are left out (and the lock of the finished run)."""
  later = [str(s) for s in checkpoint_steps(src) if s > step]
  assert step in checkpoint_steps(src), f"no checkpoint {step} in {src}"
  shutil.copytree(
    src,
    dst,
    ignore=lambda d, names: [
      n for n in names if n == ".lock" or (os.path.basename(d) == "checkpoints" and n in later)
    ],
  )
  path = os.path.join(dst, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path, "w") as f:
      f.writelines(rows)


def wait_for(predicate, job: Job, timeout: float, poll: float = 0.05) -> bool:
  """Polls predicate() until it is true (-> True) or the job ends / time runs out."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    if not job.running():
      return bool(predicate())
    time.sleep(poll)
  return False


def assert_same_losses(
  got: dict[int, dict], want: dict[int, dict], steps, rtol: float, what: str
) -> None:
  """Every step in `steps` is logged in both, with losses equal to rtol (relative)."""
  missing = [s for s in steps if s not in got or s not in want]
  assert not missing, f"{what}: steps {missing} not logged (have {sorted(got)} / {sorted(want)})"
  bad = [
    (s, got[s]["loss"], want[s]["loss"])
    for s in steps
    if abs(got[s]["loss"] - want[s]["loss"]) > rtol * max(abs(want[s]["loss"]), 1e-12)
  ]
  assert not bad, f"{what}: losses differ beyond {rtol} relative at (step, got, want) {bad}"


# --------------------------------------------------------------------------- fake SLURM
FAKE_SRUN = r"""#!/usr/bin/env bash
# Stand-in for SLURM's srun on one machine: runs FAKE_SRUN_NTASKS copies of the command
# with the variables a real srun sets for each task, then fails if any task failed
# (like --kill-on-bad-exit). Options before the command are ignored.
set -u
while [[ $# -gt 0 && "$1" == -* ]]; do shift; done
n="${FAKE_SRUN_NTASKS:-2}"
log_dir="${FAKE_SRUN_LOG_DIR:-.}"
pids=()
for ((i = 0; i < n; i++)); do
  SLURM_JOB_ID="$FAKE_SRUN_JOB_ID" SLURM_JOBID="$FAKE_SRUN_JOB_ID" SLURM_STEP_ID=0 \
  SLURM_NTASKS="$n" SLURM_NPROCS="$n" SLURM_PROCID="$i" SLURM_LOCALID="$i" SLURM_NODEID=0 \
  SLURM_NNODES=1 SLURM_JOB_NUM_NODES=1 SLURM_STEP_NUM_NODES=1 SLURM_STEP_NUM_TASKS="$n" \
  SLURM_NODELIST=localhost SLURM_JOB_NODELIST=localhost SLURM_STEP_NODELIST=localhost \
  SLURMD_NODENAME=localhost SLURM_TASKS_PER_NODE="$n" SLURM_STEP_TASKS_PER_NODE="$n" \
    "$@" > "$log_dir/task$i.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def fake_slurm_env(
  tmp_dir: str, ntasks: int, devices_per_task: int, extra: dict | None = None
) -> dict:
  """Environment in which `srun` is the fake above (on PATH) for a job of ntasks tasks."""
  bin_dir = os.path.join(tmp_dir, "fake_bin")
  os.makedirs(bin_dir, exist_ok=True)
  srun = os.path.join(bin_dir, "srun")
  with open(srun, "w") as f:
    f.write(FAKE_SRUN)
  os.chmod(srun, 0o755)
  env = cpu_env(devices_per_task, extra)
  env.update(
    PATH=bin_dir + os.pathsep + env.get("PATH", ""),
    FAKE_SRUN_NTASKS=str(ntasks),
    FAKE_SRUN_LOG_DIR=tmp_dir,
    FAKE_SRUN_JOB_ID=str(free_slurm_job_id()),
    PYTHON=sys.executable,
  )
  return env


def task_logs(tmp_dir: str, ntasks: int, tail: int = 3000) -> str:
  parts = []
  for i in range(ntasks):
    path = os.path.join(tmp_dir, f"task{i}.log")
    text = open(path, errors="replace").read() if os.path.exists(path) else "(no log)"
    parts.append(f"--- task {i} {path}:\n{text[-tail:]}")
  return "\n".join(parts)
