"""Encoder loading (mim_jax/evaluation/backbones.py): official PyTorch BEiT v2 / CAE v2 key
layouts against randomly initialised timm references, .npz and mim_jax workdirs."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from mim_jax import checkpoint as ckpt_lib
from mim_jax.evaluation import backbones
from mim_jax.models import convert
from mim_jax.models import vit

IMG = 32


def _timm_beit(torch, **kw):
  from timm.models.beit import Beit  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  model = Beit(
    img_size=IMG,
    patch_size=4,
    embed_dim=64,
    depth=3,
    num_heads=4,
    num_classes=0,
    init_values=0.1,
    global_pool="token",
    use_fc_norm=False,
    **kw,
  ).eval()
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(torch.randn(p.shape, generator=gen) * (0.5 if "relative_position" in name else 0.05))
  return model


def _images(batch=2):
  return np.random.RandomState(0).randn(batch, IMG, IMG, 3).astype(np.float32)


def _forward(torch, model, images):
  with torch.no_grad():
    return model.forward_features(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


def _ours(spec, params, images):
  model = vit.VisionTransformer(**spec.vit_kwargs())
  return np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x)["normed"])(params, images))


def test_beit_v2_checkpoint_layout(torch_ref):
  torch = torch_ref
  ref = _timm_beit(torch, use_shared_rel_pos_bias=True, use_abs_pos_emb=False)
  sd = dict(ref.state_dict())
  # Official BEiT v2 pre-training checkpoints also hold the MIM heads: dropped.
  sd["lm_head.weight"] = torch.zeros(10, 64)
  sd["cls_pt_layers.0.mlp.fc1.weight"] = torch.zeros(256, 64)
  sd["mask_token"] = torch.randn(1, 1, 64)
  params, spec = backbones.from_torch_state_dict({"model": sd}["model"], source="beitv2.pth")
  assert (
    spec.rel_pos,
    spec.abs_pos,
    spec.num_heads,
    spec.depth,
    spec.patch_size,
    spec.grid,
    spec.use_mask_token,
  ) == ("shared", "none", 4, 3, 4, (8, 8), True)
  assert "lm_head" not in params and "cls_pt_layers" not in params
  images = _images()
  np.testing.assert_allclose(
    _ours(spec, params, images), _forward(torch, ref, images), rtol=1e-4, atol=1e-5
  )


def test_cae_v2_encoder_checkpoint_layout(torch_ref):
  """CAE v2: `encoder.*` keys, a fixed sin-cos pos_embed (requires_grad False), no rel-pos
  (docs/reference_details.md#cae-v2-encoder). The reference is timm's Beit with absolute
  positions set to that table."""
  torch = torch_ref
  ref = _timm_beit(torch, use_abs_pos_emb=True)
  with torch.no_grad():
    ref.pos_embed.copy_(torch.from_numpy(vit.sincos_2d_pos_embed((8, 8), 64))[None])
  sd = {f"encoder.{k}": v for k, v in ref.state_dict().items()}
  sd["regressor.blocks.0.norm1.weight"] = torch.ones(64)  # not part of the encoder
  with pytest.raises(ValueError, match="config.model.heads"):
    backbones.from_torch_state_dict(sd, source="caev2.pth")
  params, spec = backbones.from_torch_state_dict(sd, {"heads": 4}, source="caev2.pth")
  assert (spec.rel_pos, spec.abs_pos, spec.grid) == ("none", "sincos", (8, 8))
  assert "pos_embed" not in params
  images = _images()
  np.testing.assert_allclose(
    _ours(spec, params, images), _forward(torch, ref, images), rtol=1e-4, atol=1e-5
  )
  # A learned (non-sin-cos) table stays a learned pos_embed.
  with torch.no_grad():
    ref.pos_embed.add_(0.1)
  sd = {f"encoder.{k}": v for k, v in ref.state_dict().items()}
  params, spec = backbones.from_torch_state_dict(sd, {"heads": 4}, source="x.pth")
  assert spec.abs_pos == "learned" and "pos_embed" in params
  np.testing.assert_allclose(
    _ours(spec, params, images), _forward(torch, ref, images), rtol=1e-4, atol=1e-5
  )


def test_npz_round_trip_and_load_dispatch(tmp_path, torch_ref):
  torch = torch_ref
  ref = _timm_beit(torch, use_rel_pos_bias=True, use_abs_pos_emb=False)
  path = str(tmp_path / "beit.pth")
  torch.save({"model": ref.state_dict()}, path)
  params, spec = backbones.load(path)
  assert spec.rel_pos == "per_layer"
  out = str(tmp_path / "beit.npz")
  backbones._main(["--checkpoint", path, "--out", out])  # pylint: disable=protected-access
  params2, spec2 = backbones.load(out)
  assert spec2 == spec
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  with pytest.raises(FileNotFoundError, match="config.init"):
    backbones.load(str(tmp_path / "missing.pth"))
  with pytest.raises(ValueError, match="config.init is empty"):
    backbones.load("")


@pytest.mark.parametrize("scanned", [False, True])
def test_mim_jax_workdir_keeps_the_backbone_only(tmp_path, scanned):
  model = vit.VisionTransformer(
    patch_size=4, embed_dim=32, depth=2, num_heads=2, use_mask_token=True, scan_layers=scanned
  )
  backbone = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3))))[
    "params"
  ]
  state = {
    "step": jnp.int32(5),
    "params": {
      "backbone": backbone,
      "lm_head": {"kernel": jnp.ones((32, 7))},
      "pixel_block": {"bias": jnp.zeros(3)},
    },
  }
  workdir = str(tmp_path / "run")
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
  ckpt.save(5, state, None)
  ckpt.close()
  ckpt_lib.write_config(
    workdir,
    json.dumps(
      {
        "model": {"variant": "T/4", "width": 32, "depth": 2, "heads": 2},
        "method": {"name": "ccvit"},
      }
    ),
    {"method": "ccvit"},
  )
  params, spec = backbones.load(workdir, mlc.ConfigDict({"variant": "B/16"}))
  assert (spec.depth, spec.embed_dim, spec.num_heads, spec.rel_pos) == (2, 32, 2, "shared")
  assert "blocks_1" in params and "blocks" not in params and "lm_head" not in params
  expected = convert.unstack_layers(backbone) if scanned else backbone
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), params, expected)


def test_merge_into_checks_shapes_and_reports_fresh_leaves():
  init = {"a": {"kernel": np.zeros((2, 3))}, "b": np.zeros(4)}
  merged, fresh = backbones.merge_into(init, {"a": {"kernel": np.ones((2, 3))}})
  assert fresh == ["backbone/b"] and merged["a"]["kernel"].sum() == 6
  with pytest.raises(ValueError, match="backbone/a/kernel"):
    backbones.merge_into(init, {"a": {"kernel": np.ones((3, 3))}})
  with pytest.raises(ValueError, match="no place"):
    backbones.merge_into(init, {"c": np.ones(1)})
