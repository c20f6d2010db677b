"""Evaluation loads the encoder of every pre-training method from its workdir: BEiT v2's
final norm (beside the backbone) comes along, MaPeT's query-stream parts, CAE v2's regressor
and the aggregation head stay behind, CAE v2's fixed sin-cos positions are known."""

import jax
import jax.numpy as jnp
import method_util
import numpy as np
import pytest

from mim_jax.evaluation import backbones
from mim_jax.models import vit

SIZE = method_util.SIZE


@pytest.mark.parametrize(
  "name,expect",
  [
    ("beitv2_vitb", dict(rel_pos="shared", abs_pos="none", k_bias=False)),
    ("mapet_vitb", dict(rel_pos="none", abs_pos="learned", k_bias=True)),
    ("caev2_vitb", dict(rel_pos="none", abs_pos="sincos", k_bias=False)),
  ],
)
def test_workdir_encoder_loads_for_evaluation(tmp_path, name, expect):
  workdir, method, params = method_util.make_workdir(name, tmp_path, step=1, perturb=False)
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
