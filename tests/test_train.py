"""The trainer end to end: exact resume after SIGKILL, SIGTERM, sharding, bad input.

The CLI runs in subprocesses on one CPU device (the real command users type); the
sharding test runs in-process on the 8 fake devices set up by conftest.py.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "ccvit_vitb.py")


def _smooth_images(n, size, seed):
  """Real-looking (spatially smooth) random images: upsampled low-res noise."""
  rng = np.random.default_rng(seed)
  low = rng.integers(0, 256, size=(n, size // 4, size // 4, 3)).astype(np.float32)
  img = np.repeat(np.repeat(low, 4, axis=1), 4, axis=2)
  img += rng.normal(0, 12, size=img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "tiny.npz"
  x = _smooth_images(96, 16, 0)
  y = np.arange(96, dtype=np.int32) % 4
  np.savez(path, x_train=x, y_train=y, x_test=x[:16], y_test=y[:16])
  return str(path)


def tiny_flags(npz, **over):
  """Command-line overrides that make ccvit_vitb.py a seconds-long CPU run."""
  f = {
      "data.source": "npz", "data.path": npz, "data.image_size": 16,
      "data.second_image_size": 16, "data.worker_count": 0,
      "model.variant": "T/4", "model.width": 32, "model.depth": 2, "model.heads": 2,
      "method.num_masked": 6, "method.num_replaced": 2, "method.min_block": 2,
      "method.early_layers": 1, "tokenizer.k": 16, "tokenizer.build_if_missing": True,
      "tokenizer.iters": 2, "tokenizer.images_per_class": 8,
      "batch_size": 8, "total_steps": 12, "log_every": 1, "checkpoint_every": 4,
      "optim.warmup_steps": 2, "optim.lr": 1e-3, "vis_every": 0,
  }
  f.update(over)
  return [f"--config.{k}={v}" for k, v in f.items()]


def _env(devices=1):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  return env


def _cmd(workdir, flags, config=CONFIG):
  return [sys.executable, "-m", "mim_jax.train", f"--config={config}",
          f"--workdir={workdir}"] + flags


def _run(workdir, flags, devices=1, timeout=300, config=CONFIG):
  return subprocess.run(_cmd(workdir, flags, config), env=_env(devices), cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def _losses(workdir):
  """step -> the last logged record of that step (a resumed run re-logs some steps)."""
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      rows[r["step"]] = r
  return rows


def _checkpoint_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


@pytest.mark.slow
def test_exact_resume_after_sigkill(tmp_path, tiny_npz):
  flags = tiny_flags(tiny_npz)
  ref_dir, cut_dir = str(tmp_path / "ref"), str(tmp_path / "cut")
  ref = _run(ref_dir, flags)
  assert ref.returncode == 0, ref.stderr[-3000:]
  ref_rows = _losses(ref_dir)
  assert sorted(ref_rows) == list(range(1, 13))

  # Kill -9 once step 6 is logged and checkpoint 4 is complete (orbax renames the
  # temporary directory into <step>/ only when it is fully written).
  proc = subprocess.Popen(_cmd(cut_dir, flags), env=_env(), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  killed_at = None
  while time.time() < deadline and proc.poll() is None:
    path = os.path.join(cut_dir, "metrics.jsonl")
    if os.path.exists(path) and 4 in _checkpoint_steps(cut_dir):
      steps = _losses(cut_dir)
      if steps and max(steps) >= 6:
        proc.send_signal(signal.SIGKILL)
        killed_at = max(steps)
        break
    time.sleep(0.05)
  proc.wait(timeout=60)
  assert killed_at is not None, f"run ended before it could be killed: {proc.stderr.read()[-2000:]}"
  assert killed_at < 12
  before = _checkpoint_steps(cut_dir)

  again = _run(cut_dir, flags)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from" in again.stderr
  cut_rows = _losses(cut_dir)
  assert sorted(cut_rows) == list(range(1, 13))
  resumed_from = max(s for s in before if s <= killed_at)
  for step in range(1, 13):
    for key in ("loss", "loss_token", "loss_pixel", "grad_norm", "lr"):
      np.testing.assert_allclose(cut_rows[step][key], ref_rows[step][key], rtol=0, atol=1e-6,
                                 err_msg=f"{key} at step {step} (resumed from {resumed_from})")


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path, tiny_npz):
  workdir = str(tmp_path / "run")
  flags = tiny_flags(tiny_npz, total_steps=10_000, checkpoint_every=10_000)
  proc = subprocess.Popen(_cmd(workdir, flags), env=_env(), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path) and _losses(workdir) and max(_losses(workdir)) >= 3:
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  err = proc.communicate(timeout=120)[1]
  assert proc.returncode == 0, err[-2000:]
  steps = _checkpoint_steps(workdir)
  assert steps and steps[-1] >= 3, (steps, err[-2000:])
  assert steps[-1] < 10_000


# ------------------------------------------------------------------ bad input
def _one_line_error(result, *needles):
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, result.stderr[-2000:]
  for n in needles:
    assert n in errors[0], errors[0]
  assert "Traceback" not in result.stderr
  assert "Compiling" not in result.stderr


@pytest.mark.parametrize("flag,needles", [
    ("--config.no_such_field=1", ("no_such_field",)),
    ("--config.total_steps=abc", ("total_steps",)),
    ("--config.optim.lr=fast", ("lr",)),
    ("--config.data.path=/nonexistent/imagenette.npz", ("/nonexistent/imagenette.npz",)),
    ("--config.method.name=nope", ("config.method.name",)),
    ("--config.knn_monitor.every=4 --config.knn_monitor.pool=max",
     ("config.knn_monitor.pool",)),
])
def test_bad_config_fails_fast_with_one_line(tmp_path, tiny_npz, flag, needles):
  result = _run(str(tmp_path / "w"), tiny_flags(tiny_npz) + flag.split(), timeout=120)
  _one_line_error(result, *needles)


def test_batch_not_divisible_by_data_parallel_size(tmp_path, tiny_npz):
  result = _run(str(tmp_path / "w"), tiny_flags(tiny_npz, batch_size=12), devices=8,
                timeout=120)
  _one_line_error(result, "config.batch_size=12", "8")


def test_undecodable_image_is_named(tmp_path):
  from PIL import Image
  root = tmp_path / "folder"
  for c in ("a", "b"):
    (root / "train" / c).mkdir(parents=True)
    for i in range(4):
      Image.fromarray(_smooth_images(1, 16, i)[0]).save(root / "train" / c / f"{i}.png")
  bad = root / "train" / "b" / "broken.jpg"
  bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
  flags = tiny_flags("", **{"data.source": "imagefolder", "data.path": str(root),
                            "batch_size": 9})
  flags = [f for f in flags if not f.startswith("--config.data.path=")] + [
      f"--config.data.path={root}"]
  result = _run(str(tmp_path / "w"), flags, timeout=120)
  _one_line_error(result, "broken.jpg")


@pytest.mark.slow
def test_checkpoint_from_incompatible_config_is_refused(tmp_path, tiny_npz):
  workdir = str(tmp_path / "w")
  ok = _run(workdir, tiny_flags(tiny_npz, total_steps=2, checkpoint_every=2))
  assert ok.returncode == 0, ok.stderr[-2000:]
  before = _checkpoint_steps(workdir)
  result = _run(workdir, tiny_flags(tiny_npz, total_steps=4, **{"model.width": 48}),
                timeout=120)
  _one_line_error(result, "model.width")
  assert _checkpoint_steps(workdir) == before   # nothing the user had is lost


# ------------------------------------------------------------------ sharding
def test_one_step_equal_on_single_device_dp_and_fsdp(tmp_path, tiny_npz):
  """One train step with data parallel and with FSDP over 8 devices equals 1 device."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices: run with the conftest's XLA_FLAGS")
  from mim_jax import methods, sharding, train
  from mim_jax import config_lib
  config = config_lib.load_config(CONFIG)
  config.unlock()
  for item in tiny_flags(tiny_npz, batch_size=16):
    key, value = item[len("--config."):].split("=", 1)
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
  local = next(iter(train.make_loader(config, method, source)))
  local = {k: v for k, v in local.items() if k in ("image", "image2", "mask", "replaced")}

  def run(mesh):
    trainer = train.Trainer(config, mesh, method)
    sample = train._sample_batch(local, mesh)
    _, state_sh = trainer.abstract_state(sample)
    state = trainer.init_state(sample, state_sh)
    step = trainer.make_step(state_sh)
    out = []
    for _ in range(2):
      state, metrics = step(state, sharding.global_batch(local, mesh))
      out.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return out, jax.device_get(state["params"]), state_sh

  single, p1, _ = run(sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1]))
  dp, p_dp, _ = run(sharding.make_mesh({"data": 8, "fsdp": 1}))
  fsdp, p_fsdp, sh_fsdp = run(sharding.make_mesh({"data": 1, "fsdp": 8}))
  # FSDP really shards parameters.
  specs = [s.spec for s in jax.tree.leaves(sh_fsdp["params"],
                                           is_leaf=lambda x: hasattr(x, "spec"))]
  assert any("fsdp" in str(s) for s in specs)
  for other in (dp, fsdp):
    for a, b in zip(single, other):
      for k in ("loss", "loss_token", "loss_pixel", "grad_norm"):
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for other in (p_dp, p_fsdp):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5),
                 p1, other)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_npz):
  workdir = str(tmp_path / "w")
  ok = _run(workdir, tiny_flags(tiny_npz, total_steps=4, checkpoint_every=2))
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert _checkpoint_steps(workdir) == [2, 4]
  # Resume with an absurd learning rate: the parameters blow up within a few steps.
  bad = _run(workdir, tiny_flags(tiny_npz, total_steps=40, checkpoint_every=2,
                                 **{"optim.lr": 1e30, "optim.warmup_steps": 0}))
  assert bad.returncode == 3, bad.stderr[-2000:]
  err = [l for l in bad.stderr.splitlines() if l.startswith("error:")]
  assert len(err) == 1 and "non-finite" in err[0], bad.stderr[-2000:]
  steps = _checkpoint_steps(workdir)
  assert steps and max(steps) < 40
  # Every checkpoint left behind is finite: restore the newest and check its parameters.
  from mim_jax import features
  params, _ = features.load_encoder_params(workdir)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  assert f"step {max(steps)}" in err[0]


def test_knn_monitor_logs_the_evaluation_protocols_number(tmp_path, tiny_npz):
  workdir = str(tmp_path / "w")
  flags = tiny_flags(tiny_npz, **{"knn_monitor.every": 6, "knn_monitor.test_split": "test",
                                  "knn_monitor.num_train": 0, "knn_monitor.crop_pct": 1.0,
                                  "knn_monitor.batch_size": 8, "knn_monitor.k": 5})
  result = _run(workdir, flags)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = _losses(workdir)
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
