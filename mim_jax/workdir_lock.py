"""One run per workdir: a lock file DIR/.lock held by process 0 of the job.

Two trainers on one workdir would delete each other's checkpoints (orbax keeps the newest
`keep` steps it sees) and interleave DIR/metrics.jsonl. `WorkdirLock` makes the second one
stop with one line naming the holder:

  workdir DIR is in use by host H pid P since T; stop that run or use another --workdir

The lock is created atomically (os.open with O_CREAT | O_EXCL) and holds JSON
{host, pid, started, heartbeat, token}; a daemon thread rewrites `heartbeat` every 30 s.
A lock left behind by a run that died without releasing it (SIGKILL, OOM kill, a lost
node) does not block the automatic resume:

  * same host, the pid no longer runs (or now belongs to a process started later, or is
    our own pid, as after a container restart): stale, taken over with one log line;
  * same host, the pid runs: in use (error above);
  * another host: stale only when its heartbeat is older than 3 intervals (90 s), else in
    use. This compares wall clocks, so the hosts' clocks must agree to well within that.

Only process 0 of a multi-process job takes the lock (the others hold nothing), so create
the lock after `jax.distributed` is initialised.

gs:// and other object-store workdirs: the lock needs a POSIX filesystem (atomic exclusive
create, rename). On a workdir given as a URL (`gs://...`) it does nothing but log a warning:
there the user must make sure that one job at a time uses a workdir. (The trainer's own
local file writes do not support gs:// workdirs today either.)
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid

from absl import logging

LOCK_FILE = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_BEATS = 3


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir (message: one line naming host, pid, start)."""


def _utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _is_primary() -> bool:
  jax = sys.modules.get("jax")  # no jax imported: not part of a multi-process job
  return jax is None or jax.process_index() == 0


def _process_start_ticks(pid: int) -> int | None:
  """The kernel's start time of `pid` (Linux /proc), to tell a reused pid from the holder."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return int(f.read().rsplit(")", 1)[1].split()[19])
  except (OSError, ValueError, IndexError):
    return None


def _pid_runs(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  try:  # a killed process its parent has not reaped yet (a zombie) no longer runs
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except (OSError, IndexError):
    return True


class WorkdirLock:
  """DIR/.lock for the lifetime of a run: `acquire()` ... `release()`, or `with`."""

  def __init__(self, workdir: str, *, heartbeat_s: float = HEARTBEAT_S):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self.heartbeat_s = float(heartbeat_s)
    self._record: dict | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  # ---- public
  def acquire(self) -> "WorkdirLock":
    if self._record is not None or not _is_primary():
      return self
    if "://" in self.workdir:
      logging.warning(
        "workdir %s is not a local path: no workdir lock; make sure only one job uses it",
        self.workdir,
      )
      return self
    os.makedirs(self.workdir, exist_ok=True)
    for _ in range(5):  # each retry follows a stale lock moved away or a racing writer
      if self._try_create():
        self._start_heartbeat()
        return self
      holder = self._read(self.path)
      if holder is None:  # vanished, or a writer between create and write: look again
        time.sleep(0.2)
        continue
      why_stale = self._stale_reason(holder)
      if why_stale is None:
        raise WorkdirLockedError(
          f"workdir {self.workdir} is in use by host {holder.get('host')} pid "
          f"{holder.get('pid')} since {holder.get('started')}; stop that run or use "
          f"another --workdir"
        )
      if self._remove_if_unchanged(holder):
        logging.warning(
          "workdir %s: took over the lock of host %s pid %s (started %s), %s",
          self.workdir,
          holder.get("host"),
          holder.get("pid"),
          holder.get("started"),
          why_stale,
        )
    raise WorkdirLockedError(
      f"workdir {self.workdir}: could not take {self.path} (another "
      f"run keeps creating it); use another --workdir"
    )

  def release(self) -> None:
    """Stops the heartbeat and removes the lock file if it is still ours."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
      self._thread = None
    if self._record is None:
      return
    current = self._read(self.path)
    if current is not None and current.get("token") == self._record["token"]:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
    self._record = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()

  # ---- internals
  def _new_record(self) -> dict:
    now = time.time()
    return {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "started": _utc_now(),
      "heartbeat": now,
      "proc_start": _process_start_ticks(os.getpid()),
      "token": uuid.uuid4().hex,
    }

  def _try_create(self) -> bool:
    record = self._new_record()
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      json.dump(record, f)
      f.flush()
      os.fsync(f.fileno())
    self._record = record
    return True

  @staticmethod
  def _read(path: str) -> dict | None:
    try:
      with open(path) as f:
        text = f.read()
    except FileNotFoundError:
      return None
    try:
      record = json.loads(text)
      return record if isinstance(record, dict) else {}
    except json.JSONDecodeError:
      # Empty or cut short: its writer died between create and write, or is writing now.
      return {} if time.time() - _mtime(path) > 5 else None

  def _stale_reason(self, holder: dict) -> str | None:
    """Why `holder` no longer holds the workdir, or None if it does."""
    if not holder.get("host") or not isinstance(holder.get("pid"), int):
      return "which was unreadable"
    pid = holder["pid"]
    if holder["host"] == socket.gethostname():
      if pid == os.getpid():
        return "left by an earlier run with our pid (a restarted container)"
      if not _pid_runs(pid):
        return "which is no longer running"
      recorded, now = holder.get("proc_start"), _process_start_ticks(pid)
      if recorded is not None and now is not None and recorded != now:
        return "whose pid now belongs to another process"
      return None
    age = time.time() - float(holder.get("heartbeat", 0))
    if age > STALE_AFTER_BEATS * self.heartbeat_s:
      return f"whose last heartbeat is {age:.0f} s old"
    return None

  def _remove_if_unchanged(self, holder: dict) -> bool:
    """Moves the stale lock away atomically; puts it back if it changed meanwhile (another
    run took it over first). Returns whether it was ours to remove."""
    aside = f"{self.path}.stale-{socket.gethostname()}-{os.getpid()}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return False
    if (self._read(aside) or {}).get("token") != holder.get("token"):
      try:
        os.link(aside, self.path)  # never overwrites a lock created meanwhile
      except FileExistsError:
        pass
      os.remove(aside)
      return False
    os.remove(aside)
    return True

  def _start_heartbeat(self) -> None:
    self._stop.clear()
    self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      record = self._record
      if record is None:
        return
      current = self._read(self.path)
      if current is None or current.get("token") != record["token"]:
        logging.warning("workdir %s: the lock %s is no longer ours", self.workdir, self.path)
        return
      record = dict(record, heartbeat=time.time())
      tmp = f"{self.path}.{record['token']}.tmp"
      try:
        with open(tmp, "w") as f:
          json.dump(record, f)
        os.replace(tmp, self.path)  # atomic: readers never see a half-written lock
        self._record = record
      except OSError as e:  # a full disk must not kill the run over a heartbeat
        logging.warning("workdir %s: could not refresh %s: %s", self.workdir, self.path, e)


def _mtime(path: str) -> float:
  try:
    return os.path.getmtime(path)
  except OSError:
    return time.time()
