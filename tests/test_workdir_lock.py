"""The workdir lock: a live holder blocks a second run; a dead one's lock is taken over."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from mim_jax import workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from mim_jax import workdir_lock
    lock = workdir_lock.WorkdirLock({workdir!r}).acquire()
    print("locked", flush=True)
    time.sleep(120)
    """)

_CONTENDER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from mim_jax import workdir_lock
    try:
      workdir_lock.WorkdirLock({workdir!r}).acquire()
    except workdir_lock.WorkdirLockedError as e:
      print("error:", e, file=sys.stderr)
      sys.exit(2)
    """)


def _start_holder(workdir: str) -> subprocess.Popen:
  proc = subprocess.Popen(
    [sys.executable, "-c", _HOLDER.format(root=ROOT, workdir=workdir)],
    stdout=subprocess.PIPE,
    text=True,
  )
  assert proc.stdout.readline().strip() == "locked"
  return proc


def _write_lock(workdir, **record):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE), "w") as f:
    json.dump(record, f)


def test_a_second_run_fails_with_one_line_and_a_sigkilled_holder_is_taken_over(tmp_path, caplog):
  workdir = str(tmp_path / "w")
  holder = _start_holder(workdir)
  try:
    with pytest.raises(workdir_lock.WorkdirLockedError) as e:
      workdir_lock.WorkdirLock(workdir).acquire()
    msg = str(e.value)
    assert "\n" not in msg and workdir in msg
    assert f"host {socket.gethostname()} pid {holder.pid} since" in msg
    assert "use another --workdir" in msg
    # The same from another process, as a second trainer would see it.
    other = subprocess.run(
      [sys.executable, "-c", _CONTENDER.format(root=ROOT, workdir=workdir)],
      capture_output=True,
      text=True,
      timeout=60,
    )
    assert other.returncode == 2 and other.stderr.count("\n") == 1, other.stderr
    assert f"pid {holder.pid}" in other.stderr
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert os.path.exists(os.path.join(workdir, ".lock"))  # left behind by the killed run
  with caplog.at_level(logging.WARNING):
    lock = workdir_lock.WorkdirLock(workdir).acquire()
  taken = [r.getMessage() for r in caplog.records if "took over" in r.getMessage()]
  assert len(taken) == 1 and f"pid {holder.pid}" in taken[0], taken
  with open(lock.path) as f:
    assert json.load(f)["pid"] == os.getpid()
  lock.release()
  assert not os.path.exists(lock.path)


def test_another_hosts_lock_blocks_until_its_heartbeat_is_stale(tmp_path):
  workdir = str(tmp_path)
  _write_lock(
    workdir,
    host="node-7",
    pid=123,
    started="2024-01-01T00:00:00+00:00",
    heartbeat=time.time() - 10,
    token="x",
  )
  with pytest.raises(workdir_lock.WorkdirLockedError, match="host node-7 pid 123 since"):
    workdir_lock.WorkdirLock(workdir).acquire()
  _write_lock(
    workdir,
    host="node-7",
    pid=123,
    started="2024-01-01T00:00:00+00:00",
    heartbeat=time.time() - 4 * workdir_lock.HEARTBEAT_S,
    token="x",
  )
  with workdir_lock.WorkdirLock(workdir) as lock:
    with open(lock.path) as f:
      assert json.load(f)["host"] == socket.gethostname()


def test_a_lock_with_our_own_pid_is_a_leftover(tmp_path):
  """After a container restart the new run can get the dead run's pid."""
  _write_lock(
    str(tmp_path),
    host=socket.gethostname(),
    pid=os.getpid(),
    started="earlier",
    heartbeat=time.time(),
    token="old",
  )
  with workdir_lock.WorkdirLock(str(tmp_path)) as lock:
    with open(lock.path) as f:
      assert json.load(f)["token"] != "old"


def test_release_removes_only_our_own_lock(tmp_path):
  lock = workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  _write_lock(
    str(tmp_path), host="node-7", pid=1, started="now", heartbeat=time.time(), token="someone-else"
  )
  lock.release()
  with open(os.path.join(tmp_path, ".lock")) as f:
    assert json.load(f)["token"] == "someone-else"


def test_heartbeat_is_refreshed(tmp_path):
  with workdir_lock.WorkdirLock(str(tmp_path), heartbeat_s=0.05) as lock:
    with open(lock.path) as f:
      first = json.load(f)["heartbeat"]
    time.sleep(0.5)
    with open(lock.path) as f:
      assert json.load(f)["heartbeat"] > first


def test_only_process_zero_takes_the_lock(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, "_is_primary", lambda: False)
  with workdir_lock.WorkdirLock(str(tmp_path)):
    assert not os.path.exists(os.path.join(tmp_path, ".lock"))
