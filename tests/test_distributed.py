"""Distributed set-up (mim_jax/distributed.py) and the launchers in launch/.

Where the settings come from and the one-line errors are checked in-process (nothing is
initialised); joining a job runs real processes on loopback (tests/multihost_util.py):
explicit JAX_* variables, an emulated SLURM job step, and launch/slurm_gpu.sbatch itself
with a fake `srun`.
"""

import json
import os
import socket
import subprocess
import sys

import ml_collections
import multihost_util as mh
import pytest
from train_util import tiny_flags

from mim_jax import distributed

# One xdist worker runs every multi-process test in turn (loopback ports, CPU for peers).
pytestmark = pytest.mark.xdist_group("multiprocess")

SBATCH = os.path.join(mh.ROOT, "launch", "slurm_gpu.sbatch")
TPU_POD = os.path.join(mh.ROOT, "launch", "tpu_pod.sh")

# Joins the job, then a jitted sum over a global array spread over every device of every
# process (a cross-process collective); prints describe() and the sum.
PROBE = """
import json, sys
import ml_collections
from mim_jax import distributed
try:
  distributed.initialize(ml_collections.ConfigDict(json.loads(sys.argv[1])))
except distributed.DistributedSetupError as e:
  print(f"error: {e}", file=sys.stderr)
  sys.exit(2)
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("d",))
rows = np.full((2 * jax.local_device_count(), 1), jax.process_index() + 1, np.float32)
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), rows)
total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))(x)
print(distributed.describe())
print("SUM", float(total))
"""


def _config(**fields):
  c = ml_collections.ConfigDict(
    {"distributed": True, "coordinator_address": "", "num_processes": 0, "process_id": -1}
  )
  c.update(fields)
  return c


@pytest.fixture
def no_cluster(monkeypatch):
  """An environment with no cluster variables (the CI machine might be in one)."""
  for k in list(os.environ):
    if k.startswith(("SLURM_", "OMPI_", "TPU_")) or k in mh.CLUSTER_VARIABLES:
      monkeypatch.delenv(k)
  return monkeypatch


# --------------------------------------------------------------------------- resolution
def test_config_fields_win_over_env(no_cluster):
  env = {
    "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
    "JAX_NUM_PROCESSES": "4",
    "JAX_PROCESS_ID": "3",
  }
  s = distributed.resolve(_config(coordinator_address="10.0.0.9:99", process_id=1), env)
  assert (s.coordinator_address, s.num_processes, s.process_id) == ("10.0.0.9:99", 4, 1)
  assert s.cluster is None and s.timeout_s == distributed.DEFAULT_TIMEOUT_S
  s = distributed.resolve(_config(distributed_timeout_s=20, local_device_ids="0,1"), env)
  assert (s.coordinator_address, s.num_processes, s.process_id) == ("10.0.0.1:1234", 4, 3)
  assert s.timeout_s == 20 and s.local_device_ids == (0, 1)


@pytest.mark.parametrize(
  "env, words",
  [
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, ["coordinator address", "is missing"]),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:5"}, ["JAX_NUM_PROCESSES", "JAX_PROCESS_ID"]),
    ({}, ["no cluster was detected", "JAX_COORDINATOR_ADDRESS=host:port"]),
  ],
)
def test_incomplete_settings_say_what_to_set(no_cluster, env, words):
  with pytest.raises(distributed.DistributedSetupError) as e:
    distributed.resolve(_config(), env)
  msg = str(e.value)
  assert "\n" not in msg and all(w in msg for w in words), msg
  assert isinstance(e.value, ValueError)


@pytest.mark.parametrize(
  "fields, env, words",
  [
    (
      {},
      {"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0", "JAX_COORDINATOR_ADDRESS": "h:1"},
      ["JAX_NUM_PROCESSES='two'", "not an integer"],
    ),
    (
      {"process_id": 2, "num_processes": 2, "coordinator_address": "h:1"},
      {},
      ["process id 2", "[0, 2)"],
    ),
    (
      {"coordinator_address": "10.0.0.1"},
      {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
      ["not host:port"],
    ),
    ({"distributed_timeout_s": 0}, {}, ["distributed_timeout_s"]),
  ],
)
def test_invalid_settings_are_one_line(no_cluster, fields, env, words):
  with pytest.raises(distributed.DistributedSetupError) as e:
    distributed.resolve(_config(**fields), env)
  assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_slurm_fills_what_is_not_given(no_cluster):
  for k, v in {
    "SLURM_JOB_ID": "7",
    "SLURM_STEP_NODELIST": "node[001-004]",
    "SLURM_NTASKS": "4",
    "SLURM_PROCID": "2",
    "SLURM_LOCALID": "0",
  }.items():
    no_cluster.setenv(k, v)
  assert distributed.detect_cluster() == "slurm"
  s = distributed.resolve(_config(), {})
  # jax-ml/jax:jax/_src/clusters/slurm_cluster.py: first node, port 61440 + job id % 4096.
  assert (s.coordinator_address, s.num_processes, s.process_id) == ("node001:61447", 4, 2)
  assert s.cluster == "slurm" and s.local_device_ids is None
  s = distributed.resolve(
    _config(process_id=3), {"JAX_COORDINATOR_PORT": "5000", "JAX_LOCAL_DEVICE_IDS": "0,1,2,3"}
  )
  assert (s.coordinator_address, s.num_processes, s.process_id) == ("node001:5000", 4, 3)
  assert s.local_device_ids == (0, 1, 2, 3)


def test_busy_coordinator_port_is_one_line(no_cluster):
  """jax crashes (SIGSEGV) when process 0 cannot bind the coordinator port; we say why."""
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    s = distributed.resolve(
      _config(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=0), {}
    )
    with pytest.raises(distributed.DistributedSetupError, match=f"port {port} is in use"):
      distributed._check_port_free(s)


def test_not_distributed_does_nothing(no_cluster):
  distributed.initialize(ml_collections.ConfigDict({"distributed": False}))
  distributed.initialize(ml_collections.ConfigDict({}))  # configs without the fields


# --------------------------------------------------------------------------- real processes
def _probe(config: dict) -> list[str]:
  return [sys.executable, "-c", PROBE, json.dumps(config)]


def _check_probe(job, n, devices):
  codes = job.wait(timeout=120)
  assert codes == [0] * n, job.report()
  want = sum((i + 1) * 2 * devices for i in range(n))
  for i, path in enumerate(job.logs):
    out = open(path).read()
    assert f"process {i} of {n}, {devices} local / {n * devices} global cpu devices" in out, out
    assert f"SUM {float(want)}" in out, out


def test_two_processes_from_env_variables(tmp_path):
  """JAX_* variables only: the case that used to fail with 'Number of processes must be
  defined'. The jitted sum needs gloo collectives across processes."""
  job = mh.launch_local(_probe({"distributed": True}), 2, 2, str(tmp_path), "env")
  _check_probe(job, 2, 2)
  assert "coordinator 127.0.0.1:" in open(job.logs[1]).read()


def test_two_processes_from_emulated_slurm(tmp_path):
  """The SLURM variables a real srun sets, nothing else: jax's SlurmCluster finds the
  coordinator (first node, port from SLURM_JOB_ID)."""
  env = mh.fake_slurm_env(str(tmp_path), ntasks=2, devices_per_task=2)
  cmd = ["srun", "--kill-on-bad-exit=1"] + _probe({"distributed": True})
  r = subprocess.run(cmd, env=env, cwd=mh.ROOT, capture_output=True, text=True, timeout=120)
  logs = mh.task_logs(str(tmp_path), 2)
  assert r.returncode == 0, logs
  port = mh.SLURM_PORT_BASE + int(env["FAKE_SRUN_JOB_ID"]) % 4096
  for i in range(2):
    out = open(tmp_path / f"task{i}.log").read()
    assert f"process {i} of 2, 2 local / 4 global cpu devices" in out, logs
    assert f"coordinator localhost:{port} (from slurm cluster detection)" in out, logs
    assert "SUM 12.0" in out, logs


@pytest.mark.parametrize("process_id", [0, 1])
def test_lonely_process_is_one_line(tmp_path, process_id):
  """One process of 2 started alone: process 1 finds no coordinator, process 0 waits for a
  peer that never comes. jax would abort with a C++ stack; we print one line, exit 2."""
  port = mh.free_port()
  env = mh.process_env(process_id, 2, port, 1)
  r = subprocess.run(
    _probe({"distributed": True, "distributed_timeout_s": 3}),
    env=env,
    cwd=mh.ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert r.returncode == 2, r.stderr[-3000:]
  lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
  assert len(lines) == 1, r.stderr[-3000:]
  assert f"127.0.0.1:{port}" in lines[0] and f"process {process_id} of 2" in lines[0], lines[0]


# --------------------------------------------------------------------------- launchers
@pytest.mark.slow
def test_slurm_sbatch_runs_two_tasks(tmp_path, tiny_npz):  # noqa: F811
  """launch/slurm_gpu.sbatch's own command line, 2 tasks x 2 CPU devices on loopback."""
  workdir = tmp_path / "run"
  env = mh.fake_slurm_env(str(tmp_path), ntasks=2, devices_per_task=2)
  flags = tiny_flags(tiny_npz, total_steps=6)
  r = subprocess.run(
    ["bash", SBATCH, mh.TRAIN_CONFIG, str(workdir)] + flags,
    env=env,
    cwd=mh.ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  logs = mh.task_logs(str(tmp_path), 2) + "\n--- sbatch stderr:\n" + r.stderr[-2000:]
  assert r.returncode == 0, logs
  rows = mh.metrics(str(workdir))
  assert sorted(rows) == list(range(1, 7)), logs
  assert 6 in mh.checkpoint_steps(str(workdir)), logs


def _tpu_pod(tmp_path, args, **env_vars):
  """Runs launch/tpu_pod.sh with a fake gcloud that records its arguments."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  calls = tmp_path / "gcloud_calls"
  (bin_dir / "gcloud").write_text(f'#!/usr/bin/env bash\necho "$@" >> {calls}\n')
  (bin_dir / "gcloud").chmod(0o755)
  env = {
    k: v
    for k, v in os.environ.items()
    if k not in ("TPU_NAME", "ZONE", "REPO", "CONFIG", "WORKDIR", "EXTRA", "REF")
  }
  env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", **env_vars)
  r = subprocess.run(["bash", TPU_POD] + args, env=env, capture_output=True, text=True, timeout=30)
  return r, (calls.read_text() if calls.exists() else "")


@pytest.mark.parametrize(
  "args, env_vars, word",
  [
    (["setup"], {"TPU_NAME": "t", "ZONE": "z"}, "REPO"),
    (["train"], {"TPU_NAME": "t", "ZONE": "z", "CONFIG": "c.py"}, "WORKDIR"),
    (
      ["train"],
      {"TPU_NAME": "t", "ZONE": "z", "CONFIG": "c.py", "WORKDIR": "gs://b/r"},
      "shared mount",
    ),
    (["create"], {"ZONE": "z"}, "TPU_NAME"),
    (["bogus"], {"TPU_NAME": "t", "ZONE": "z"}, "usage"),
  ],
)
def test_tpu_pod_refuses_missing_variables(tmp_path, args, env_vars, word):
  r, calls = _tpu_pod(tmp_path, args, **env_vars)
  assert r.returncode != 0 and word in r.stderr, r.stderr
  assert calls == "", f"gcloud ran before the check: {calls}"


def test_tpu_pod_commands(tmp_path):
  common = {"TPU_NAME": "mim", "ZONE": "us-central2-b"}
  r, calls = _tpu_pod(tmp_path, ["setup"], REPO="https://example.org/mim_jax.git", **common)
  assert r.returncode == 0, r.stderr
  assert "--worker=all" in calls and "git clone 'https://example.org/mim_jax.git'" in calls
  r, calls = _tpu_pod(
    tmp_path,
    ["train"],
    CONFIG="configs/ccvit_vitb.py",
    WORKDIR="/mnt/shared/run",
    EXTRA="--config.batch_size=64",
    **common,
  )
  assert r.returncode == 0, r.stderr
  assert "--workdir='/mnt/shared/run' --config.distributed=True --config.batch_size=64" in calls
