"""The trainer as a real multi-process job: 2 processes x 2 fake CPU devices on loopback,
compared with 1 process x 4 devices reading the same global batches.

(a) both log the same losses; (b) both processes SIGKILLed after a checkpoint and restarted
continue exactly; (c) a checkpoint resumes exactly on the other process count; (d) SIGTERM
to one process, or to both 2 s apart, ends both with exit 0 and one checkpoint of one step.

Every process logs to a file under tmp_path; assertion messages print the tails.
"""

import os
import signal
import time

import multihost_util as mh
import pytest
from train_util import tiny_flags

# One xdist worker runs every multi-process test in turn (loopback ports, CPU for peers).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiprocess")]

TOTAL = 12  # tiny_flags: 12 steps, log_every=1, checkpoint_every=4, batch 8
RUN_TIMEOUT = 420  # seconds per job; compilation dominates on a loaded 2-core machine
STOP_TIMEOUT = 30  # seconds from the first SIGTERM to both processes' exit
LAYOUTS = {1: 4, 2: 2}  # processes -> fake CPU devices per process: 4 devices either way


def _run(workdir, flags, processes, log_dir, name):
  """A job run to completion; returns its metrics (step -> row)."""
  job = mh.launch_train(str(workdir), flags, processes, LAYOUTS[processes], str(log_dir), name)
  codes = job.wait(RUN_TIMEOUT)
  assert codes == [0] * processes, f"{name}: exit codes {codes}\n{job.report()}"
  return mh.metrics(str(workdir))


@pytest.fixture(scope="session")
def npz(tiny_npz):  # noqa: F811
  return tiny_npz


@pytest.fixture(scope="session")
def reference(tmp_path_factory, npz):
  """processes -> (workdir, metrics) of an uninterrupted run of TOTAL steps (session scope:
  pytest-xdist interleaves the modules of the multi-process group on one worker, which
  would tear a module-scoped fixture down and run it again)."""
  out = {}
  for processes in (1, 2):
    base = tmp_path_factory.mktemp(f"ref{processes}p")
    rows = _run(base / "run", tiny_flags(npz), processes, base, f"ref{processes}p")
    assert sorted(rows) == list(range(1, TOTAL + 1)), f"{processes} process(es): {sorted(rows)}"
    out[processes] = (str(base / "run"), rows)
  return out


def test_two_processes_log_the_losses_of_one(reference):
  """(a) Batches depend on the global step only, not on who reads them."""
  mh.assert_same_losses(
    reference[2][1], reference[1][1], range(1, TOTAL + 1), 1e-5, "2 processes vs 1 process"
  )


def test_sigkill_then_restart_resumes_exactly(tmp_path, npz, reference):
  """(b) Killed without warning once checkpoint 4 is finished; the same command resumes."""
  workdir = str(tmp_path / "run")
  flags = tiny_flags(npz)
  job = mh.launch_train(workdir, flags, 2, 2, str(tmp_path), "first")
  saved = mh.wait_for(lambda: mh.checkpoint_steps(workdir), job, RUN_TIMEOUT)
  for i in range(2):
    job.signal(i, signal.SIGKILL)
  job.wait(60)
  logged = sorted(mh.metrics(workdir))
  assert saved, f"no checkpoint before the end / timeout\n{job.report()}"
  assert not logged or logged[-1] < TOTAL, f"the run finished before the kill: {logged}"
  resumed_from = max(mh.checkpoint_steps(workdir))

  rows = _run(workdir, flags, 2, tmp_path, "restart")
  later = range(resumed_from + 1, TOTAL + 1)
  what = f"2 processes resumed from step {resumed_from} after SIGKILL"
  mh.assert_same_losses(rows, reference[2][1], later, 1e-6, what)


@pytest.mark.parametrize("saved_by, resumed_by", [(2, 1), (1, 2)])
def test_resume_on_another_process_count(tmp_path, npz, reference, saved_by, resumed_by):
  """(c) Step 4 of a run on `saved_by` processes, continued on `resumed_by`."""
  src, want = reference[saved_by]
  workdir = str(tmp_path / "run")
  mh.copy_workdir_at(src, workdir, 4)
  rows = _run(workdir, tiny_flags(npz), resumed_by, tmp_path, "resume")
  what = f"checkpoint 4 of {saved_by} process(es) resumed on {resumed_by}"
  mh.assert_same_losses(rows, want, range(5, TOTAL + 1), 1e-6, what)


@pytest.mark.parametrize("signalled", [(1,), (1, 0)], ids=["one", "both_2s_apart"])
def test_sigterm_saves_one_step_on_every_process(tmp_path, npz, signalled):
  """(d) A preempted slice: SIGTERM reaches one host, or the hosts 2 s apart. Every process
  must stop at the same step, save it together and exit 0 (no deadlock in a barrier)."""
  workdir = str(tmp_path / "run")
  # Long enough to be running when the signal comes; no periodic checkpoint in the way.
  flags = tiny_flags(npz, total_steps=100000, checkpoint_every=100000)
  job = mh.launch_train(workdir, flags, 2, 2, str(tmp_path), "term")
  started = mh.wait_for(lambda: len(mh.metrics(workdir)) >= 2, job, RUN_TIMEOUT)
  assert started and job.running(), f"the run did not get to step 2\n{job.report()}"
  logged_before = max(mh.metrics(workdir))
  first_signal = time.time()
  for k, i in enumerate(signalled):
    if k:
      time.sleep(2)
    job.signal(i, signal.SIGTERM)
  codes = job.wait(STOP_TIMEOUT, since=first_signal)
  assert codes == [0, 0], (
    f"exit codes {codes} ({STOP_TIMEOUT} s after the first SIGTERM; "
    f"None: still running)\n{job.report()}"
  )
  steps = mh.checkpoint_steps(workdir)
  assert len(steps) == 1 and steps[0] >= logged_before, (
    f"checkpoints {steps}, step {logged_before} was logged before SIGTERM\n{job.report()}"
  )
  assert not mh.unfinished_checkpoints(workdir), (
    f"unfinished: {mh.unfinished_checkpoints(workdir)}\n{job.report()}"
  )
  step_dir = os.path.join(workdir, "checkpoints", str(steps[0]))
  assert {"state", "data"} <= set(os.listdir(step_dir)), os.listdir(step_dir)
