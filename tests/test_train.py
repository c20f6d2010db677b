"""The trainer end to end: exact resume after SIGKILL, SIGTERM, sharding, bad input.

The CLI runs in subprocesses on one CPU device (the real command users type); the
sharding test runs in-process on the 8 fake devices set up by conftest.py.
"""

import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from train_util import assert_one_line_error
from train_util import checkpoint_steps
from train_util import CONFIG
from train_util import logged_rows
from train_util import ROOT
from train_util import run_train
from train_util import tiny_flags
from train_util import train_cmd
from train_util import train_env


@pytest.mark.slow
def test_exact_resume_after_sigkill(tmp_path, tiny_npz):
  flags = tiny_flags(tiny_npz)
  ref_dir, cut_dir = str(tmp_path / "ref"), str(tmp_path / "cut")
  # The reference run also writes TensorBoard events (the other runs, metrics.jsonl only).
  ref = run_train(ref_dir, flags + ["--config.tensorboard=True"])
  assert ref.returncode == 0, ref.stderr[-3000:]
  ref_rows = logged_rows(ref_dir)
  assert sorted(ref_rows) == list(range(1, 13))
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(ref_dir))

  # Kill -9 once step 6 is logged and checkpoint 4 is complete (orbax renames the
  # temporary directory into <step>/ only when it is fully written).
  proc = subprocess.Popen(
    train_cmd(cut_dir, flags),
    env=train_env(),
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 240
  killed_at = None
  while time.time() < deadline and proc.poll() is None:
    path = os.path.join(cut_dir, "metrics.jsonl")
    if os.path.exists(path) and 4 in checkpoint_steps(cut_dir):
      steps = logged_rows(cut_dir)
      if steps and max(steps) >= 6:
        proc.send_signal(signal.SIGKILL)
        killed_at = max(steps)
        break
    time.sleep(0.05)
  proc.wait(timeout=60)
  assert killed_at is not None, f"run ended before it could be killed: {proc.stderr.read()[-2000:]}"
  assert killed_at < 12
  before = checkpoint_steps(cut_dir)

  again = run_train(cut_dir, flags)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from" in again.stderr
  cut_rows = logged_rows(cut_dir)
  assert sorted(cut_rows) == list(range(1, 13))
  assert not any(n.startswith("events.out") for n in os.listdir(cut_dir))
  resumed_from = max(s for s in before if s <= killed_at)
  for step in range(1, 13):
    for key in ("loss", "loss_token", "loss_pixel", "grad_norm", "lr"):
      np.testing.assert_allclose(
        cut_rows[step][key],
        ref_rows[step][key],
        rtol=0,
        atol=1e-6,
        err_msg=f"{key} at step {step} (resumed from {resumed_from})",
      )


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path, tiny_npz):
  workdir = str(tmp_path / "run")
  flags = tiny_flags(tiny_npz, total_steps=10_000, checkpoint_every=10_000)
  proc = subprocess.Popen(
    train_cmd(workdir, flags),
    env=train_env(),
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path) and logged_rows(workdir) and max(logged_rows(workdir)) >= 3:
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  err = proc.communicate(timeout=120)[1]
  assert proc.returncode == 0, err[-2000:]
  steps = checkpoint_steps(workdir)
  assert steps and steps[-1] >= 3, (steps, err[-2000:])
  assert steps[-1] < 10_000


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
  "flag,needles",
  [
    ("--config.no_such_field=1", ("no_such_field",)),
    ("--config.total_steps=abc", ("total_steps",)),
    ("--config.optim.lr=fast", ("lr",)),
    ("--config.data.path=/nonexistent/imagenette.npz", ("/nonexistent/imagenette.npz",)),
    ("--config.method.name=nope", ("config.method.name",)),
    ("--config.knn_monitor.every=4 --config.knn_monitor.pool=max", ("config.knn_monitor.pool",)),
    ("--config.profile.start_step=2 --config.profile.num_steps=0", ("config.profile.num_steps",)),
  ],
)
def test_bad_config_fails_fast_with_one_line(tmp_path, tiny_npz, flag, needles):
  result = run_train(str(tmp_path / "w"), tiny_flags(tiny_npz) + flag.split(), timeout=120)
  assert_one_line_error(result, *needles)


def test_batch_not_divisible_by_data_parallel_size(tmp_path, tiny_npz):
  result = run_train(
    str(tmp_path / "w"), tiny_flags(tiny_npz, batch_size=12), devices=8, timeout=120
  )
  assert_one_line_error(result, "config.batch_size=12", "8")


@pytest.mark.slow
def test_checkpoint_from_incompatible_config_is_refused(trained_workdir, tiny_npz):
  workdir = trained_workdir
  before = checkpoint_steps(workdir)
  result = run_train(
    workdir, tiny_flags(tiny_npz, total_steps=6, **{"model.width": 48}), timeout=120
  )
  assert_one_line_error(result, "model.width")
  assert checkpoint_steps(workdir) == before  # nothing the user had is lost


def test_profile_traces_the_requested_steps_and_rows_report_efficiency(tmp_path, tiny_npz):
  workdir = str(tmp_path / "w")
  flags = tiny_flags(
    tiny_npz,
    total_steps=5,
    checkpoint_every=5,
    **{"profile.start_step": 3, "profile.num_steps": 2},
  )
  result = run_train(workdir, flags)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "profile of steps 3-4 written to" in result.stderr
  traces = [
    os.path.join(d, n)
    for d, _, names in os.walk(os.path.join(workdir, "profile"))
    for n in names
    if n.endswith(".xplane.pb")
  ]
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0, traces
  # The trace holds the annotated training steps 3 and 4, not step 1 or 5.
  import glob  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top

  (trace_json,) = glob.glob(os.path.join(os.path.dirname(traces[0]), "*.trace.json.gz"))
  with gzip.open(trace_json, "rt") as f:
    events = json.load(f)["traceEvents"]
  steps = {e.get("args", {}).get("step_num") for e in events if e.get("name") == "train"} - {None}
  assert steps == {"3", "4"}, steps
  # Compilation is reported once, apart; throughput and FLOP rate come from the steps only.
  rows = logged_rows(workdir)
  assert rows[1]["compile_s"] > 0 and all("compile_s" not in rows[s] for s in range(2, 6))
  assert "compiled the step in" in result.stderr
  for s in range(1, 6):
    assert rows[s]["img_per_s_per_chip"] == pytest.approx(rows[s]["img_per_s"])  # 1 device
    assert rows[s]["tflops_per_device"] > 0
    assert "mfu" not in rows[s]  # a CPU has no peak in the table
  # Step 1's time excludes compilation: its throughput is of the order of the later steps'.
  assert rows[1]["img_per_s"] > 0.05 * rows[5]["img_per_s"]


def test_restarted_run_loads_its_step_from_the_compilation_cache(tmp_path, tiny_npz):
  """config.compilation_cache is on by default; 'workdir' keeps it in DIR/jax_cache. A run
  that lost its last checkpoint (killed after step 2) is restarted with the same command:
  its first row reports the step loaded from the cache (jax's own cache-hit event), not a
  second compilation. Compile seconds are not compared: on a busy CI machine a load can
  take as long as the small test step's compilation."""
  import shutil  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path / "w")
  flags = tiny_flags(tiny_npz, total_steps=4, checkpoint_every=2)
  flags += ["--config.compilation_cache=workdir"]
  first = run_train(workdir, flags)
  assert first.returncode == 0, first.stderr[-3000:]
  assert os.listdir(os.path.join(workdir, "jax_cache"))
  assert logged_rows(workdir)[1]["compile_cache_hit"] == 0
  assert "compiled the step" in first.stderr
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  second = run_train(workdir, flags)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resumed from" in second.stderr
  assert logged_rows(workdir)[3]["compile_cache_hit"] == 1
  assert "loaded (compilation cache) the step" in second.stderr


# ------------------------------------------------------------------ sharding
def test_one_step_equal_on_single_device_dp_and_fsdp(tmp_path, tiny_npz):
  """One train step with data parallel and with FSDP over 8 devices equals 1 device."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices: run with the conftest's XLA_FLAGS")
  from mim_jax import config_lib
  from mim_jax import methods
  from mim_jax import runner
  from mim_jax import sharding
  from mim_jax import train

  config = config_lib.load_config(CONFIG)
  config.unlock()
  for item in tiny_flags(tiny_npz, batch_size=16):
    key, value = item[len("--config.") :].split("=", 1)
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], bool) else value == "True"
  # Adam's first step is ~sign(g) for tiny gradients, which amplifies rounding; a larger
  # eps keeps the parameter comparison meaningful (see environment notes).
  config.optim.eps = 1e-3
  from mim_jax.data import sources as data_sources

  source = data_sources.build_source(config.data)
  method = methods.build(config, workdir=str(tmp_path), source=source)
  with train.make_loader(config, method, source) as loader:
    local = next(iter(loader))
  local = {k: v for k, v in local.items() if k in ("image", "image2", "mask", "replaced")}

  def run(mesh):
    trainer = train.Trainer(config, mesh, method)
    sample = runner.global_sample(local)
    _, state_sh = trainer.abstract_state(sample)
    state = trainer.init_state(sample, state_sh)
    frozen, frozen_sh = trainer.frozen()
    step = trainer.make_step(state_sh, frozen_sh)
    out = []
    for _ in range(2):
      state, metrics = step(state, frozen, sharding.global_batch(local, mesh))
      out.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return out, jax.device_get(state["params"]), state_sh

  single, p1, _ = run(sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1]))
  dp, p_dp, _ = run(sharding.make_mesh({"data": 8, "fsdp": 1}))
  fsdp, p_fsdp, sh_fsdp = run(sharding.make_mesh({"data": 1, "fsdp": 8}))
  # FSDP really shards parameters.
  specs = [s.spec for s in jax.tree.leaves(sh_fsdp["params"], is_leaf=lambda x: hasattr(x, "spec"))]
  assert any("fsdp" in str(s) for s in specs)
  for other in (dp, fsdp):
    for a, b in zip(single, other):
      for k in ("loss", "loss_token", "loss_pixel", "grad_norm"):
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for other in (p_dp, p_fsdp):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5), p1, other)


def test_knn_monitor_logs_the_evaluation_protocols_number(tmp_path, tiny_npz):
  workdir = str(tmp_path / "w")
  flags = tiny_flags(
    tiny_npz,
    **{
      "knn_monitor.every": 6,
      "knn_monitor.test_split": "test",
      "knn_monitor.num_train": 0,
      "knn_monitor.crop_pct": 1.0,
      "knn_monitor.batch_size": 8,
      "knn_monitor.k": 5,
    },
  )
  result = run_train(workdir, flags)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = logged_rows(workdir)
  assert [s for s in sorted(rows) if "knn_top1" in rows[s]] == [6, 12]
  assert all("img_per_s" in rows[s] for s in (7, 12))
  # The same number as `python -m mim_jax.evaluate` with the kNN protocol on the final
  # checkpoint (all 96 train images as the bank, the 16 test images as queries).
  from mim_jax import config_lib  # pylint: disable=g-import-not-at-top
  from mim_jax import evaluate  # pylint: disable=g-import-not-at-top

  c = config_lib.load_config("eval/knn")
  c.init = workdir
  c.data.source, c.data.path = "npz", tiny_npz
  c.data.train_split, c.data.test_split = "train", "test"
  c.data.image_size, c.data.crop_pct, c.data.worker_count = 16, 1.0, 0
  c.data.num_classes = 4
  c.model.variant, c.model.heads = "T/4", 2
  c.eval_batch_size, c.knn.k = 8, 5
  out = evaluate.evaluate(c, str(tmp_path / "knn"))
  assert out["knn_top1"] == pytest.approx(rows[12]["knn_top1"], abs=1e-6)
