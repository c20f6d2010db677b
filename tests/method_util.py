"""Helpers of the tests that build a method in-process: a seconds-small config of any paper
config (T/4 at 16 px, stand-in tokenizer and teacher), a batch through the method's own
`prepare`, and a workdir holding one checkpoint of its weights. Not a test module."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import checkpoint as ckpt_lib
from mim_jax import config_lib
from mim_jax import methods
from mim_jax.tokenizers import centroids as centroid_lib

SIZE = 16


def tiny_config(name, tmp_path):
  """configs/<name>.py:runlocal shrunk to a 2-block, width-32 ViT on 16 px images."""
  c = config_lib.load_config(name, "runlocal")
  c.data.image_size = c.data.second_image_size = SIZE
  c.model.variant, c.model.width, c.model.depth, c.model.heads = "T/4", 32, 2, 2
  if "tokenizer" in c:
    path = str(tmp_path / "centroids")
    centroid_lib.CentroidTokenizer(
      np.random.default_rng(0).random((8, 48)).astype(np.float32), 4, metadata={"image_size": SIZE}
    ).save(path)
    c.tokenizer.update(kind="centroids", path=path, build_if_missing=False)
  if name in ("beitv2_vitb", "peco_vitb", "ccvit_vitb"):
    c.method.update(num_masked=6, min_block=2, early_layers=1)
  if name == "ccvit_vitb":
    c.method.num_replaced = 2
  if name == "mapet_vitb":
    c.method.least_number = 6
  if name == "caev2_vitb":
    c.method.update(num_masked=6, min_block=2, regressor_dim=32, regressor_heads=2)
    c.teacher.random_init = "random:ViT-B/16,width=32,layers=1,patch_size=4,image_size=16"
  if name == "vqkd_vitb":
    c.vqkd.update(num_codes=16, decoder_width=32, decoder_heads=2)
    c.teacher.random_init = "random:ViT-B/16,width=32,layers=1,patch_size=4,image_size=16"
  if name == "peco_mae_vitb":
    c.method.update(num_masked=12, decoder_dim=16, decoder_depth=1, decoder_heads=2)
  return c


def batch_and_variables(method, n: int):
  """(numpy batch of n random images through method.prepare, unboxed initial variables)."""
  img = np.random.default_rng(0).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
  ex = [
    method.prepare({"image": img[i], "image2": img[i]}, np.random.default_rng(i)) for i in range(n)
  ]
  batch = {k: np.stack([e[k] for e in ex]) for k in ex[0]}
  variables = nn.unbox(method.init(jax.random.PRNGKey(0), jax.tree.map(jnp.asarray, batch)))
  return batch, variables


def perturbed(params, seed):
  """Every leaf moved off its initial value (layer scale, zero biases, tables), so that a
  tensor mapped to the wrong place cannot hide behind a constant init."""
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  out = [
    np.asarray(x) + rng.normal(0, 0.05, np.shape(x)).astype(np.asarray(x).dtype) for x in leaves
  ]
  return jax.tree.unflatten(tree, out)


def make_workdir(name, tmp_path, *, step=3, perturb=True):
  """(workdir, method, params): a mim_jax workdir of config `name` holding one checkpoint
  of random weights (moved off their init unless perturb is False)."""
  c = tiny_config(name, tmp_path)
  method = methods.build(c)
  _, variables = batch_and_variables(method, 2)
  params = variables["params"]
  if perturb:
    params = perturbed(params, 1)
  workdir = str(tmp_path / f"run_{name}")
  ckpt_lib.write_config(workdir, c.to_json_best_effort(), method.fingerprint())
  saver = ckpt_lib.Checkpointer(workdir, async_save=False)
  saver.save(step, {"params": params}, None)
  saver.close()
  return workdir, method, params
