"""The evaluation entry point (mim_jax/evaluate.py) end to end on tiny data, in-process on
the 8 fake CPU devices of conftest.py (data- and FSDP-sharded), plus the CLI's one-line
errors in a subprocess."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import config_lib
from mim_jax import evaluate
from mim_jax.evaluation import backbones
from mim_jax.models import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
  """4 classes told apart by colour (learnable in a few steps), 16 px."""
  rng = np.random.default_rng(0)
  n = 96
  y = (np.arange(n) % 4).astype(np.int32)
  colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])
  x = colours[y][:, None, None, :] + rng.normal(0, 40, size=(n, 16, 16, 3))
  x = np.clip(x, 0, 255).astype(np.uint8)
  path = tmp_path_factory.mktemp("data") / "tiny.npz"
  np.savez(path, x_train=x, y_train=y, x_test=x[:24], y_test=y[:24])
  return str(path)


def _config(which, npz, **over):
  name = {"knn": "eval/knn", "linear_probe": "eval/linear_probe", "finetune": "eval/finetune"}[
    which
  ]
  c = config_lib.load_config(name)
  c.data.source, c.data.path = "npz", npz
  c.data.train_split, c.data.test_split = "train", "test"
  c.data.image_size, c.data.crop_pct, c.data.worker_count = 16, 1.0, 0
  c.data.num_classes, c.data.num_train_examples = 4, 96
  c.model.variant, c.model.width, c.model.depth, c.model.heads = "T/4", 32, 1, 2
  c.eval_batch_size, c.batch_size = 8, 16
  c.total_steps, c.log_every, c.checkpoint_every, c.eval_every = 6, 1, 3, 0
  c.optim.warmup_steps = 2
  c.async_checkpointing = False
  for key, value in over.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _rows(workdir):
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if "loss" in r:
        rows[r["step"]] = r
  return rows


@pytest.fixture(scope="module")
def pretrained_npz(tmp_path_factory):
  """A 'pre-trained' encoder as a converted .npz: shared rel-pos table, mask token."""
  model = vit.VisionTransformer(
    patch_size=4, embed_dim=32, depth=1, num_heads=2, use_mask_token=True
  )
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(3), jnp.zeros((1, 16, 16, 3))))[
    "params"
  ]
  params = jax.tree.map(np.asarray, params)
  table = params["rel_pos_bias"]["relative_position_bias_table"]
  params["rel_pos_bias"]["relative_position_bias_table"] = (
    np.random.RandomState(0).randn(*table.shape).astype(np.float32) * 0.1
  )
  path = str(tmp_path_factory.mktemp("ckpt") / "encoder.npz")
  backbones.save_npz(path, params, backbones.infer_spec(params, source="test"))
  return path


def test_knn_protocol(tmp_path, tiny_npz):
  out = evaluate.evaluate(
    _config("knn", tiny_npz, init="random", **{"knn.k": 5}), str(tmp_path / "knn")
  )
  assert out["train_examples"] == 96 and out["test_examples"] == 24
  assert out["knn_top1"] > 0.5  # colours: even a random encoder separates them
  with open(tmp_path / "knn" / "results.json") as f:
    assert json.load(f)["knn_top1"] == out["knn_top1"]


def test_linear_probe_on_precomputed_features_from_an_npz(tmp_path, tiny_npz, pretrained_npz):
  c = _config(
    "linear_probe",
    tiny_npz,
    init=pretrained_npz,
    total_steps=30,
    **{"probe.precompute_features": True, "optim.lr": 0.05, "pool": "cls"},
  )
  workdir = str(tmp_path / "probe")
  out = evaluate.evaluate(c, workdir)
  assert out["top1"] > 0.9 and out["test_examples"] == 24
  assert os.path.exists(os.path.join(workdir, "features_train.npz"))
  # Re-running resumes at the end (nothing to train) and re-evaluates to the same number.
  assert evaluate.evaluate(c, workdir)["top1"] == out["top1"]


def test_finetune_exact_resume_after_sigterm_with_fsdp(tmp_path, tiny_npz, pretrained_npz):
  over = {
    "init": pretrained_npz,
    "mesh.data": 4,
    "mesh.fsdp": 2,
    "ema_decay": 0.9,
    "model.drop_path_rate": 0.1,
  }
  ref_dir, cut_dir = str(tmp_path / "ref"), str(tmp_path / "cut")
  ref = evaluate.evaluate(_config("finetune", tiny_npz, **over), ref_dir)
  ref_rows = _rows(ref_dir)
  assert sorted(ref_rows) == list(range(1, 7)) and "ema_top1" in ref

  def stop_after_step_4():  # SIGTERM once step 4 is logged, like a pre-empted job
    path = os.path.join(cut_dir, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline:
      if os.path.exists(path) and max(_rows(cut_dir) or [0]) >= 4:
        os.kill(os.getpid(), signal.SIGTERM)
        return
      time.sleep(0.01)

  watcher = threading.Thread(target=stop_after_step_4)
  watcher.start()
  first = evaluate.evaluate(_config("finetune", tiny_npz, **over), cut_dir)
  watcher.join()
  assert 4 <= first["stopped_at"] < 6
  second = evaluate.evaluate(_config("finetune", tiny_npz, **over), cut_dir)
  cut_rows = _rows(cut_dir)
  for step in range(1, 7):
    for key in ("loss", "grad_norm", "lr"):
      np.testing.assert_allclose(
        cut_rows[step][key], ref_rows[step][key], rtol=0, atol=1e-6, err_msg=f"{key} at step {step}"
      )
  assert second["top1"] == pytest.approx(ref["top1"])


@pytest.mark.parametrize(
  "over, needle",
  [
    ({"protocol": "probe"}, "config.protocol"),
    ({"init": ""}, "config.init is empty"),
    ({"init": "/nonexistent/ckpt.pth"}, "config.init"),
    ({"pool": "max"}, "config.pool"),
    ({"batch_size": 15, "aug.mixup": 0.8}, "config.batch_size=15 must be even"),
    ({"optim.layer_decay": 1.5}, "config.optim.layer_decay"),
    ({"data.test_split": "val"}, "config.data.split"),
  ],
)
def test_bad_configs_are_named(tiny_npz, over, needle):
  c = _config("finetune", tiny_npz, **{"init": "random", **over})
  with pytest.raises(evaluate.ConfigError, match=needle):
    evaluate.validate_config(c)


def test_cli_error_is_one_line(tmp_path, tiny_npz):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPATH=ROOT)
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "mim_jax.evaluate",
      "--config=configs/eval/knn.py:runlocal",
      f"--workdir={tmp_path}",
      "--config.init=random",
      "--config.pool=max",
    ],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert errors == ["error: config.pool must be one of ('cls', 'mean'), got 'max'"], proc.stderr


# (config, argument) -> fields the paper's table fixes.
PAPER_RECIPES = [
  ("eval/beitv2_finetune", "", dict(lr=5e-4, layer_decay=0.65, drop_path=0.1, epochs=100)),
  (
    "eval/beitv2_finetune",
    "variant=L/16",
    dict(lr=5e-4, layer_decay=0.8, drop_path=0.2, epochs=50),
  ),
  ("eval/mapet_finetune", "variant=T/16", dict(lr=2.5e-4, layer_decay=1.0, epochs=300)),
  ("eval/mapet_finetune", "variant=S/16", dict(lr=5e-3, layer_decay=0.65, epochs=200)),
  (
    "eval/caev2_finetune",
    "variant=T/16",
    dict(lr=2e-3, layer_decay=0.75, drop_path=0.0, mixup=0.2, cutmix=0.0, ra="rand-m10"),
  ),
  ("eval/caev2_finetune", "variant=L/16", dict(lr=4e-4, layer_decay=0.8, drop_path=0.2, epochs=50)),
  ("eval/ccvit_finetune", "", dict(lr=2e-3, layer_decay=0.65, epochs=100)),
  ("eval/beitv2_linear_probe", "", dict(lr=4e-3, pool="cls", optimizer="adamw", epochs=50)),
  ("eval/mapet_linear_probe", "variant=T/16", dict(lr=4e-3, pool="mean", epochs=50)),
  (
    "eval/caev2_linear_probe",
    "variant=S/16",
    dict(base_lr=0.1, pool="cls", optimizer="lars", epochs=90),
  ),
]


@pytest.mark.parametrize("name,arg,expect", PAPER_RECIPES)
def test_paper_recipes_and_their_runlocal_shrink(name, arg, expect):
  c = config_lib.load_config(name, arg)
  steps_per_epoch = c.data.num_train_examples / c.batch_size
  checks = {
    "lr": c.optim.lr,
    "base_lr": c.optim.base_lr,
    "layer_decay": c.optim.layer_decay,
    "drop_path": c.model.drop_path_rate,
    "mixup": c.aug.mixup,
    "cutmix": c.aug.cutmix,
    "pool": c.pool,
    "optimizer": c.optim.name,
    "epochs": round(c.total_steps / steps_per_epoch),
  }
  for key, value in expect.items():
    if key == "ra":
      assert c.data.rand_augment.startswith(value)
    else:
      assert (
        checks[key] == pytest.approx(value) if isinstance(value, float) else checks[key] == value
      ), (key, checks[key], value)
  small = config_lib.load_config(name, ",".join(filter(None, [arg, "runlocal"])))
  small.init = "random"
  evaluate.validate_config(small)
  assert small.data.image_size in (32, 64) and small.total_steps < 2000
  with pytest.raises(ValueError, match="variant"):
    config_lib.load_config(name, "variant=H/14")


def test_caev2_finetune_adds_fresh_rel_pos_tables_to_a_sincos_encoder(tmp_path, tiny_npz):
  c = _config(
    "finetune",
    tiny_npz,
    init="random",
    **{"model.abs_pos": "sincos", "model.rel_pos": "none", "model.add_rel_pos": True},
  )
  c.total_steps = c.checkpoint_every = 2
  evaluate.evaluate(c, str(tmp_path / "ft"))
  from mim_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top

  params, _, _ = ckpt_lib.read_trained_state(str(tmp_path / "ft"))
  backbone = params["backbone"]
  assert "rel_pos_bias" in backbone["blocks_0"] and "pos_embed" not in backbone
