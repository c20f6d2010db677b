"""Evaluation loads the encoder of every pre-training method from its workdir: BEiT v2's
final norm (beside the backbone) comes along, MaPeT's query-stream parts, CAE v2's regressor
and the aggregation head stay behind, CAE v2's fixed sin-cos positions are known."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import checkpoint as ckpt_lib
from mim_jax import config_lib
from mim_jax import methods
from mim_jax.evaluation import backbones
from mim_jax.models import vit
from mim_jax.tokenizers import centroids as centroid_lib

SIZE = 16


def _config(name, tmp_path):
  c = config_lib.load_config(name, "runlocal")
  c.data.image_size = c.data.second_image_size = SIZE
  c.model.variant, c.model.width, c.model.depth, c.model.heads = "T/4", 32, 2, 2
  if "tokenizer" in c:
    path = str(tmp_path / "centroids")
    centroid_lib.CentroidTokenizer(
      np.random.default_rng(0).random((8, 48)).astype(np.float32), 4, metadata={"image_size": SIZE}
    ).save(path)
    c.tokenizer.update(kind="centroids", path=path, build_if_missing=False)
  if name == "beitv2_vitb":
    c.method.update(num_masked=6, min_block=2, early_layers=1)
  if name == "mapet_vitb":
    c.method.least_number = 6
  if name == "caev2_vitb":
    c.method.update(num_masked=6, min_block=2, regressor_dim=32, regressor_heads=2)
    c.teacher.random_init = "random:ViT-B/16,width=32,layers=1,patch_size=4,image_size=16"
  return c


@pytest.mark.parametrize(
  "name,expect",
  [
    ("beitv2_vitb", dict(rel_pos="shared", abs_pos="none", k_bias=False)),
    ("mapet_vitb", dict(rel_pos="none", abs_pos="learned", k_bias=True)),
    ("caev2_vitb", dict(rel_pos="none", abs_pos="sincos", k_bias=False)),
  ],
)
def test_workdir_encoder_loads_for_evaluation(tmp_path, name, expect):
  c = _config(name, tmp_path)
  method = methods.build(c)
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
  ex = [
    method.prepare({"image": img[i], "image2": img[i]}, np.random.default_rng(i)) for i in range(2)
  ]
  batch = {k: jnp.asarray(np.stack([e[k] for e in ex])) for k in ex[0]}
  params = nn.unbox(method.init(jax.random.PRNGKey(0), batch))["params"]
  workdir = str(tmp_path / "run")
  ckpt_lib.write_config(workdir, c.to_json_best_effort(), method.fingerprint())
  saver = ckpt_lib.Checkpointer(workdir, async_save=False)
  saver.save(1, {"params": params}, None)
  saver.close()
  encoder, spec = backbones.load_workdir(workdir)
  assert (spec.rel_pos, spec.abs_pos, spec.k_bias) == (
    expect["rel_pos"],
    expect["abs_pos"],
    expect["k_bias"],
  )
  assert "norm" in encoder and not {
    "decoder",
    "mask_positional_token",
    "lm_head",
    "cls_pt_block_0",
    "regressor_0",
  } & set(encoder)
  expected = jax.tree.map(np.asarray, method.encoder_params(params))
  jax.tree.map(np.testing.assert_array_equal, encoder, expected)
  out = vit.VisionTransformer(**spec.vit_kwargs()).apply(
    {"params": encoder}, jnp.zeros((1, SIZE, SIZE, 3))
  )
  assert out["normed"].shape == (1, 17, 32)
