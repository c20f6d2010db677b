"""Weights out and in (mim_jax/export.py, mim_jax/encoders.py): every method's encoder goes
through a timm export, `timm.create_model` + strict `load_state_dict`, and timm's
`forward_features` equals `mim_jax.load_encoder(workdir).tokens`; tampered exports are
refused with one line; official MaPeT / CCViT checkpoint layouts load with features equal to
their PyTorch forward."""

import argparse
import json
import os

import method_util
import numpy as np
import pytest

import mim_jax
from mim_jax import checkpoint as ckpt_lib
from mim_jax import export
from mim_jax.models import exported

SIZE = method_util.SIZE
CONFIGS = (
  "beitv2_vitb",
  "peco_vitb",
  "ccvit_vitb",
  "mapet_vitb",
  "caev2_vitb",
  "peco_mae_vitb",
  "vqkd_vitb",  # the tokenizer's ViT encoder
)


def make_workdir(name, tmp_path, step=3):
  return method_util.make_workdir(name, tmp_path, step=step)[0]


def _timm_forward(torch, timm, folder, images):
  from safetensors import torch as st_torch  # pylint: disable=g-import-not-at-top

  with open(os.path.join(folder, "config.json")) as f:
    cfg = json.load(f)
  model = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"]).eval()
  model.load_state_dict(st_torch.load_file(os.path.join(folder, "model.safetensors")), strict=True)
  with torch.no_grad():
    return model.forward_features(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


def _rel(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_method_exports_to_timm_with_equal_features(tmp_path, torch_ref, name):
  import timm  # pylint: disable=g-import-not-at-top

  workdir = make_workdir(name, tmp_path)
  out = str(tmp_path / "export")
  result = export.export_timm(workdir, out)
  assert result["rel_err"] <= export.TOLERANCE
  assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
  images = np.random.default_rng(5).standard_normal((3, SIZE, SIZE, 3)).astype(np.float32)
  ref = _timm_forward(torch_ref, timm, out, images)
  enc = mim_jax.load_encoder(workdir)
  ours = enc.tokens(images)
  assert ours.shape == (3, 1 + (SIZE // 4) ** 2, 32)
  assert _rel(ours, ref) <= 1e-5
  # The export loads back through the same API with the same features.
  np.testing.assert_allclose(mim_jax.load_encoder(out).tokens(images), ours, rtol=0, atol=1e-5)
  card = open(os.path.join(out, "README.md")).read()
  assert "library_name: timm" in card and c_method(workdir) in card


def c_method(workdir):
  return ckpt_lib.saved_config(workdir)["method"]["name"]


@pytest.fixture(scope="module")
def beit_export(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("beit")
  workdir = make_workdir("beitv2_vitb", tmp)
  out = str(tmp / "export")
  export.export_timm(workdir, out, check=False)
  return workdir, out


def _copy(folder, dst, edit):
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top

  os.makedirs(dst)
  tensors = st_numpy.load_file(os.path.join(folder, "model.safetensors"))
  edit(tensors)
  st_numpy.save_file(tensors, os.path.join(dst, "model.safetensors"))
  with (
    open(os.path.join(folder, "config.json")) as f,
    open(os.path.join(dst, "config.json"), "w") as g,
  ):
    g.write(f.read())
  return dst


@pytest.mark.parametrize(
  "edit,words",
  [
    (lambda t: t.pop("blocks.1.mlp.fc2.bias"), "1 missing (blocks.1.mlp.fc2.bias)"),
    (
      lambda t: t.update({"blocks.0.mlp.fc_1.weight": t.pop("blocks.0.mlp.fc1.weight")}),
      "blocks.0.mlp.fc_1.weight",
    ),
    (lambda t: t.update({"norm.bias": t["norm.bias"][:-1]}), "of the wrong shape (norm.bias"),
  ],
)
def test_a_tampered_export_is_refused_with_one_line(beit_export, tmp_path, edit, words):
  _, out = beit_export
  bad = _copy(out, str(tmp_path / "bad"), edit)
  with pytest.raises(exported.ExportError) as e:
    mim_jax.load_encoder(bad)
  msg = str(e.value)
  assert words in msg and "\n" not in msg and bad in msg


def test_export_cli_refuses_a_non_empty_folder_and_keeps_it(beit_export, tmp_path, capsys):
  workdir, _ = beit_export
  out = tmp_path / "taken"
  out.mkdir()
  (out / "mine.txt").write_text("keep me")
  assert export.main([f"--from={workdir}", f"--out={out}"]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: --out=") and "not empty" in err and "\n" not in err
  assert os.listdir(out) == ["mine.txt"]


def test_a_failed_check_writes_nothing(beit_export, tmp_path, torch_ref, monkeypatch):
  """A wrong mapping (here: one block's q bias corrupted on the way out) is caught by the
  forward comparison, and the output folder does not appear."""
  from mim_jax.models import timm_layout  # pylint: disable=g-import-not-at-top

  workdir, _ = beit_export
  real = timm_layout.to_timm

  def wrong(params, spec, image_size):
    t = real(params, spec, image_size)
    t["blocks.0.attn.q_bias"] = t["blocks.0.attn.q_bias"] + 1.0
    return t

  monkeypatch.setattr(timm_layout, "to_timm", wrong)
  out = tmp_path / "never"
  with pytest.raises(exported.ExportError, match="differs from mim_jax's tokens"):
    export.export_timm(workdir, str(out))
  assert not out.exists() and not [p for p in os.listdir(tmp_path) if "partial" in p]


# ----------------------------------------------------------------------------- official
def _save_official(torch, path, checkpoint):
  torch.save(checkpoint, path)
  return str(path)


def _perturb_torch(torch, model, seed=0):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(torch.randn(p.shape, generator=gen) * (0.5 if "relative_position" in name else 0.05))


def _mapet_vit(torch, global_pool):
  """MaPeT's encoder as aimagelab/MaPeT:models/vision_transformer/vision_transformer.py
  defines it: timm's ViT (learned positions with the cls slot, layer scale ls1/ls2) whose
  attention has separate `q` (D -> D) and `kv` (D -> 2D, keys first) layers with biases.
  Written here from that description; the forward is what the parameters must reproduce."""
  from timm.models.vision_transformer import VisionTransformer  # pylint: disable=g-import-not-at-top

  class QKVSplitAttention(torch.nn.Module):
    def __init__(self, dim, heads):
      super().__init__()
      self.heads, self.scale = heads, (dim // heads) ** -0.5
      self.q = torch.nn.Linear(dim, dim)
      self.kv = torch.nn.Linear(dim, 2 * dim)
      self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None, is_causal=False):
      del attn_mask, is_causal
      b, n, d = x.shape
      q = self.q(x).reshape(b, n, self.heads, d // self.heads).permute(0, 2, 1, 3)
      kv = self.kv(x).reshape(b, n, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
      attn = (q @ kv[0].transpose(-2, -1)) * self.scale
      out = attn.softmax(dim=-1) @ kv[1]
      return self.proj(out.transpose(1, 2).reshape(b, n, d))

  torch.manual_seed(0)
  model = VisionTransformer(
    img_size=SIZE,
    patch_size=4,
    embed_dim=32,
    depth=2,
    num_heads=2,
    init_values=0.1,
    num_classes=10 if global_pool == "avg" else 0,
    global_pool=global_pool,
  )
  for block in model.blocks:
    block.attn = QKVSplitAttention(32, 2)
  _perturb_torch(torch, model)
  return model.eval()


@pytest.mark.parametrize("released", [False, True], ids=["pretraining", "finetuned_avg_pool"])
def test_official_mapet_checkpoint_loads_with_equal_features(tmp_path, torch_ref, released):
  """Pre-training layout (final norm, plus the query stream's mask_positional_token and the
  decoder) and the released classifier layout (fc_norm + head, no final norm), both in a
  timm CheckpointSaver file ({'state_dict', 'args' Namespace, ...})."""
  torch = torch_ref
  model = _mapet_vit(torch, "avg" if released else "token")
  sd = model.state_dict()
  if not released:
    sd["mask_positional_token"] = torch.randn(1, 1, 32)
    sd["decoder.weight"], sd["decoder.bias"] = torch.randn(8192, 32), torch.randn(8192)
  assert "blocks.0.attn.q.weight" in sd and "blocks.0.attn.kv.bias" in sd
  assert ("norm.weight" in sd) != released and ("fc_norm.weight" in sd) == released
  path = _save_official(
    torch,
    tmp_path / "mapet.pth.tar",
    {
      "epoch": 799,
      "arch": "vit_custom_patch4",
      "state_dict": sd,
      "optimizer": {},
      "version": 2,
      "args": argparse.Namespace(model="vit_custom_patch4", lr=1.5e-3),
    },
  )
  images = np.random.default_rng(1).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
  with torch.no_grad():
    ref = model.forward_features(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  # A MaPeT file names its model ('vit_base_patch16_224' -> 12 heads); this width-32 model
  # has no such name, so its 2 heads are given.
  with pytest.raises(ValueError, match="head count is not stored"):
    mim_jax.load_encoder(path)
  enc = mim_jax.load_encoder(path, heads=2)
  assert enc.spec.k_bias and enc.spec.abs_pos == "learned" and enc.spec.final_norm != released
  assert _rel(enc.tokens(images), ref) <= 1e-5
  # The official file exports to timm's VisionTransformer (q / kv fused into one qkv with
  # its k bias), and timm's forward of the export is the official forward.
  import timm  # pylint: disable=g-import-not-at-top

  out = str(tmp_path / "export")
  export.export_timm(path, out, heads=2)
  assert _rel(_timm_forward(torch, timm, out, images), ref) <= 1e-5


def test_head_count_from_an_official_checkpoints_model_name():
  from mim_jax.evaluation import backbones  # pylint: disable=g-import-not-at-top

  names = backbones.heads_from_checkpoint_names
  assert names({"arch": "vit_base_patch16_224", "state_dict": {}}) == 12
  assert names({"args": argparse.Namespace(model="vit_small_patch16_224")}) == 6
  assert names({"args": argparse.Namespace(model="beit_large_patch16_224")}) == 16
  assert names({"arch": "vit_custom_patch4"}) is None and names({"model": {}}) is None


def test_official_ccvit_checkpoint_loads_with_equal_features(tmp_path, torch_ref):
  """Cakeyan/CCViT_Public's pre-training model is BEiT v2's layout (shared relative position
  table with its index buffer, q/v biases, gamma_1/gamma_2, final norm) plus mask_token,
  lm_head, the cls_pt_layers blocks, cls_pt_norm and the pixel head cls_pt_lm_head; the file
  is utils.save_model's {'model', 'optimizer', 'epoch', 'args', 'scaler'}. timm's Beit has
  the encoder's exact names and is the reference forward."""
  from timm.models.beit import Beit  # pylint: disable=g-import-not-at-top

  torch = torch_ref
  torch.manual_seed(0)
  model = Beit(
    img_size=SIZE,
    patch_size=4,
    embed_dim=32,
    depth=3,
    num_heads=2,
    num_classes=0,
    init_values=0.1,
    global_pool="token",
    use_abs_pos_emb=False,
    use_shared_rel_pos_bias=True,
  ).eval()
  _perturb_torch(torch, model)
  sd = dict(model.state_dict())
  sd["rel_pos_bias.relative_position_index"] = torch.zeros(17, 17, dtype=torch.int64)
  sd["mask_token"] = torch.randn(1, 1, 32)
  sd["lm_head.weight"], sd["lm_head.bias"] = torch.randn(8192, 32), torch.randn(8192)
  for k, v in list(sd.items()):
    if k.startswith("blocks.0."):
      sd["cls_pt_layers.0." + k[len("blocks.0.") :]] = torch.randn_like(v.float())
  sd["cls_pt_norm.weight"], sd["cls_pt_norm.bias"] = torch.ones(32), torch.zeros(32)
  sd["cls_pt_lm_head.weight"], sd["cls_pt_lm_head.bias"] = torch.randn(48, 32), torch.randn(48)
  path = _save_official(
    torch,
    tmp_path / "checkpoint-299.pth",
    {
      "model": sd,
      "optimizer": {},
      "epoch": 299,
      "args": argparse.Namespace(model="ccvit"),
      "scaler": {},
    },
  )
  images = np.random.default_rng(2).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
  with torch.no_grad():
    ref = model.forward_features(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  enc = mim_jax.load_encoder(path)
  assert enc.spec.rel_pos == "shared" and enc.spec.depth == 3
  assert _rel(enc.tokens(images), ref) <= 1e-5


# ----------------------------------------------------------------------------- full export
@pytest.mark.slow
def test_full_export_continues_pretraining_with_the_same_next_loss(tmp_path, tiny_npz):
  """Train 4 steps, export every trained tensor, then (a) resume the workdir and (b) start a
  new workdir with config.init_from=EXPORT (scanned layers this time): step 5's loss and
  gradient norm are the same; the export also loads as an encoder."""
  from train_util import logged_rows  # pylint: disable=g-import-not-at-top
  from train_util import run_train
  from train_util import tiny_flags

  first = str(tmp_path / "first")
  r = run_train(first, tiny_flags(tiny_npz, total_steps=4))
  assert r.returncode == 0, r.stderr[-3000:]
  full = str(tmp_path / "full")
  assert export.main([f"--from={first}", f"--out={full}", "--format=full"]) == 0
  with open(os.path.join(full, "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["step"] == 4 and manifest["method"] == "ccvit"
  names = set(manifest["tensors"])
  heads = {n.split("/")[1] for n in names if not n.startswith("params/backbone/")}
  assert "params/backbone/cls_token" in names and heads  # the heads travel too

  r = run_train(first, tiny_flags(tiny_npz, total_steps=6))
  assert r.returncode == 0, r.stderr[-3000:]
  second = str(tmp_path / "second")
  r = run_train(
    second,
    tiny_flags(tiny_npz, total_steps=6, init_from=full) + ["--config.model.scan_layers=True"],
  )
  assert r.returncode == 0, r.stderr[-3000:]
  resumed, started = logged_rows(first), logged_rows(second)
  assert sorted(started) == [5, 6]
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(started[5][key], resumed[5][key], rtol=2e-6, err_msg=key)

  enc_full, enc_run = mim_jax.load_encoder(full), mim_jax.load_encoder(first, step=4)
  images = np.random.default_rng(3).standard_normal((2, 16, 16, 3)).astype(np.float32)
  np.testing.assert_array_equal(enc_full.tokens(images), enc_run.tokens(images))


def test_init_from_is_checked_before_anything_is_built(tmp_path, tiny_npz):
  from train_util import assert_one_line_error  # pylint: disable=g-import-not-at-top
  from train_util import run_train
  from train_util import tiny_flags

  r = run_train(str(tmp_path / "w"), tiny_flags(tiny_npz, init_from=str(tmp_path)))
  assert_one_line_error(r, "config.init_from", "--format=full")
