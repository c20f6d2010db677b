"""Frozen-backbone features for probes and kNN (the evaluation issue builds on this)."""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mim_jax.data import transforms
from mim_jax.models import vit


def load_trained_state(workdir: str, step: int | None = None) -> tuple[Any, Any, int]:
  """(params, extra, step) of a mim_jax checkpoint: every trained parameter and the mutable
  collections (codebooks, their statistics), without the optimizer state. Host numpy."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints directory in {workdir}")
  with ocp.CheckpointManager(directory, item_names=("state", "data")) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(restore_args=None)))
  return restored.state["params"], restored.state.get("extra", {}), step


def load_encoder_params(workdir: str, step: int | None = None) -> tuple[Any, int]:
  """The backbone parameters of a mim_jax pre-training checkpoint (no heads, no optimizer)."""
  params, _, step = load_trained_state(workdir, step)
  return params.get("backbone", params), step


def extract(params, vit_kw: dict, images_uint8: np.ndarray, *, batch_size: int = 256,
            pool: str = "mean", mean=transforms.IMAGENET_MEAN, std=transforms.IMAGENET_STD,
            layer: int | None = None) -> np.ndarray:
  """Features of uint8 NHWC images: 'mean' (patches, after the final norm), 'cls'.

  `layer` picks an intermediate block's output (before any norm) instead.
  """
  model = vit.VisionTransformer(**vit_kw, weight_init="beit")
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)

  @jax.jit
  def run(x):
    x = (x.astype(jnp.float32) / 255.0 - mean) / std
    out = model.apply({"params": params}, x.astype(vit_kw.get("dtype", jnp.float32)),
                      return_layers=(layer,) if layer else ())
    tokens = out["layers"][layer] if layer else out["normed"]
    tokens = tokens.astype(jnp.float32)
    return tokens[:, 1:].mean(1) if pool == "mean" else tokens[:, 0]

  feats = []
  for i in range(0, len(images_uint8), batch_size):
    chunk = images_uint8[i:i + batch_size]
    pad = batch_size - len(chunk)
    if pad:   # one compiled shape for every batch
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    feats.append(np.asarray(run(chunk))[:batch_size - pad])
  return np.concatenate(feats)


def linear_probe(train_x, train_y, test_x, test_y, *, max_iter: int = 2000, c: float = 1.0):
  """Top-1 of multinomial logistic regression on standardised features (scikit-learn)."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.pipeline import make_pipeline  # pylint: disable=g-import-not-at-top
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top
  clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, C=c))
  clf.fit(train_x, train_y)
  return float((clf.predict(test_x) == test_y).mean())


def saved_config(workdir: str) -> dict:
  with open(os.path.join(workdir, "config.json")) as f:
    return json.load(f)["config"]
