"""mim_jax/host_memory.py: a `python -m mim_jax.X` process restarts itself with glibc's
huge-page malloc tunable, which cuts a CPU step's page faults; the decision's rules."""

import json
import os
import subprocess
import sys

import pytest

from mim_jax import host_memory

_CAN_USE_HUGE_PAGES = host_memory.huge_pages_env({})[0] is not None


def _probe(**env) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", **env)
  env.pop("GLIBC_TUNABLES", None)
  out = subprocess.run(
    [sys.executable, "-m", "mim_jax.malloc_probe"],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
  not _CAN_USE_HUGE_PAGES,
  reason="needs Linux, glibc >= 2.35 and the kernel's transparent huge pages (madvise/always)",
)
def test_command_line_restarts_with_huge_pages_and_faults_far_less():
  huge, plain = _probe(), _probe(MIM_JAX_HUGE_PAGES="0")
  assert huge["state"].startswith("huge pages for malloc"), huge
  assert "glibc.malloc.hugetlb=1" in huge["state"], huge
  assert plain["state"] == "malloc left as it is (MIM_JAX_HUGE_PAGES=0)", plain
  # glibc's defaults: each step maps its temporaries afresh (64 MiB = 16,384 small pages each).
  assert plain["faults_per_step"] > 16_384, plain
  # 2 MiB pages: 512x fewer in principle (195x measured); a loaded machine may not find every
  # huge page, and the kernel then falls back to small ones.
  assert huge["faults_per_step"] < plain["faults_per_step"] / 4, (huge, plain)


def test_a_library_process_is_not_restarted(monkeypatch):
  # pytest is not `python -m mim_jax.X`: nothing to do, and no execve.
  monkeypatch.setattr(os, "execve", lambda *a: pytest.fail(f"execve{a}"))
  host_memory.restart_with_huge_pages()


@pytest.mark.parametrize(
  "argv, module",
  [
    (["python", "-m", "mim_jax.train", "--config=c.py"], "mim_jax.train"),
    (["python", "-u", "-X", "faulthandler", "-m", "mim_jax.evaluate"], "mim_jax.evaluate"),
    (["python", "-Xdev", "-um", "mim_jax.aot"], "mim_jax.aot"),
    (["python", "-mmim_jax.train"], "mim_jax.train"),
    (["python", "-W", "ignore", "-c", "import mim_jax", "-m", "mim_jax.train"], None),
    (["python", "-u", "-m", "mim_jax.evaluate", "-m", "x"], "mim_jax.evaluate"),
    (["python", "-m", "pytest", "-m", "mim_jax.train"], None),
    (["python", "script.py", "-m", "mim_jax.train"], None),
    (["python", "-c", "import mim_jax"], None),
  ],
)
def test_command_line_module(monkeypatch, argv, module):
  monkeypatch.setattr(sys, "orig_argv", argv)
  assert host_memory._command_line_module() == module  # pylint: disable=protected-access


def test_rules_leave_the_users_choices_alone(monkeypatch):
  monkeypatch.setattr(host_memory, "_glibc_version", lambda: (2, 36))
  monkeypatch.setattr(host_memory, "_thp_mode", lambda: "madvise")
  env, why = host_memory.huge_pages_env({"GLIBC_TUNABLES": "glibc.pthread.rseq=0", "A": "1"})
  assert env == {"GLIBC_TUNABLES": "glibc.pthread.rseq=0:glibc.malloc.hugetlb=1", "A": "1"}
  assert "glibc.malloc.hugetlb=1" in why
  for user_env in (
    {"MIM_JAX_HUGE_PAGES": "0"},
    {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},  # already on: no second restart
    {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},
    {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4096"},
    {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"},
  ):
    assert host_memory.huge_pages_env(user_env)[0] is None, user_env
  monkeypatch.setattr(host_memory, "_thp_mode", lambda: "never")
  assert "never" in host_memory.huge_pages_env({})[1]
  monkeypatch.setattr(host_memory, "_glibc_version", lambda: (2, 31))
  assert "2.35" in host_memory.huge_pages_env({})[1]


def test_a_failed_restart_runs_on_without_huge_pages(monkeypatch, capsys):
  monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "mim_jax.train"])
  monkeypatch.setattr(host_memory, "huge_pages_env", lambda: ({"GLIBC_TUNABLES": "x"}, ""))
  calls = []

  def execve(*args):
    calls.append(args)
    raise PermissionError("denied")

  monkeypatch.setattr(os, "execve", execve)
  host_memory.restart_with_huge_pages()
  assert calls and calls[0][1][1:] == ["-m", "mim_jax.train"], calls
  assert "could not restart" in capsys.readouterr().err
  # The restarted process (same pid) never restarts again, whatever its environment says.
  monkeypatch.setenv("MIM_JAX_HUGE_PAGES_RESTARTED", str(os.getpid()))
  host_memory.restart_with_huge_pages()
  assert len(calls) == 1, calls
