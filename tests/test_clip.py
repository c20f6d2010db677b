"""CLIP vision towers (mim_jax.teachers.clip) against open_clip's OpenAI-architecture models.

open_clip builds the same ViT / ModifiedResNet as openai/CLIP with the same parameter names;
every reference model has random weights (fixed seed), with LayerNorm/BatchNorm affine
parameters, biases and BN running statistics randomised so each of them is exercised.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax.teachers import clip

TOL = 1e-4  # the bound: max |flax - torch| / max |torch|, fp32


def rel_err(a, b):
  """max |a - b| / max |b| (printed: `pytest -s` shows every measured error)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  err = float(np.abs(a - b).max() / np.abs(b).max())
  print(f'max relative error {a.shape}: {err:.2e}')
  return err


def nhwc(x):
  return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def randomise_(torch, module):
  """Non-trivial values for what default init leaves at 0/1 (biases, norms, BN statistics)."""
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith('bias'):
        p.copy_(0.1 * torch.randn_like(p))
      elif p.ndim == 1 and ('ln' in name or 'bn' in name or 'downsample.1' in name):
        p.copy_(0.5 + torch.rand_like(p))  # bn3 is zero-initialised by open_clip
    for name, b in module.named_buffers():
      if name.endswith('running_mean'):
        b.copy_(0.1 * torch.randn_like(b))
      elif name.endswith('running_var'):
        b.copy_(0.5 + torch.rand_like(b))
  return module.eval()


@pytest.fixture
def open_clip(torch_ref):
  """The open_clip module, with torch's RNG seeded for each test."""
  import open_clip as oc  # pylint: disable=g-import-not-at-top

  torch_ref.manual_seed(0)
  return oc


def small_clip(open_clip, vision_cfg):
  """A full open_clip CLIP (text tower included) with a small vision tower, QuickGELU."""
  text_cfg = dict(context_length=8, vocab_size=50, width=64, heads=1, layers=1)
  return open_clip.model.CLIP(32, vision_cfg, text_cfg, quick_gelu=True).eval()


# ----------------------------------------------------------------------------- numerics
def test_vit_b16_tokens_pooled_and_blocks_match_open_clip(torch_ref, open_clip):
  """ViT-B/16 width/heads/patch/resolution with 2 blocks (the full depth only repeats them)."""
  torch = torch_ref
  from open_clip.transformer import QuickGELU  # pylint: disable=g-import-not-at-top
  from open_clip.transformer import VisionTransformer  # pylint: disable=g-import-not-at-top

  ref = randomise_(
    torch,
    VisionTransformer(
      image_size=224,
      patch_size=16,
      width=768,
      layers=2,
      heads=12,
      mlp_ratio=4.0,
      output_dim=512,
      act_layer=QuickGELU,
    ),
  )
  x = torch.randn(2, 3, 224, 224)
  with torch.no_grad():
    blocks = [ref._embeds(x)]
    for blk in ref.transformer.resblocks:
      blocks.append(blk(blocks[-1]))
    want_tokens = ref.ln_post(blocks[-1]) @ ref.proj  # ln_post on all tokens, then proj
    want_pooled = ref(x)  # open_clip's own image embedding

  arch, params = clip.convert_openai_state_dict(ref.state_dict())
  assert arch == dict(clip.CLIP_VISION_CONFIGS['ViT-B/16'], layers=2)
  model = clip.build_vision_model(arch)
  out = jax.jit(lambda p, x: model.apply({'params': p}, x, return_intermediates=True))(
    params, nhwc(x)
  )
  errs = {
    'tokens': rel_err(out['tokens'], want_tokens),
    'pooled': rel_err(out['pooled'], want_pooled),
  }
  errs.update({f'block{i}': rel_err(out['layers'][i], blocks[i + 1]) for i in range(2)})
  assert out['tokens'].shape == (2, 197, 512) and out['tokens'].dtype == jnp.float32
  assert max(errs.values()) <= TOL, errs


def test_rn50_layer4_and_attnpool_match_open_clip(torch_ref, open_clip):
  """RN50's stages (3, 4, 6, 3) and width at 64 px (a 2 x 2 layer-4 grid) for speed."""
  torch = torch_ref
  from open_clip.modified_resnet import ModifiedResNet  # pylint: disable=g-import-not-at-top

  ref = randomise_(
    torch, ModifiedResNet(layers=[3, 4, 6, 3], output_dim=1024, heads=32, image_size=64, width=64)
  )
  arch, params = clip.convert_openai_state_dict(ref.state_dict())
  assert arch == dict(clip.CLIP_VISION_CONFIGS['RN50'], image_size=64)
  x = torch.randn(2, 3, 64, 64)
  with torch.no_grad():
    grid = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.stem(x)))))
    want_pooled = ref.attnpool(grid)
  out = jax.jit(clip.build_vision_model(arch).apply)({'params': params}, nhwc(x))
  errs = {
    'layer4': rel_err(out['layer4'], grid.permute(0, 2, 3, 1)),
    'pooled': rel_err(out['pooled'], want_pooled),
  }
  assert out['layer4'].shape == (2, 2, 2, 2048)
  assert max(errs.values()) <= TOL, errs


def test_layer4_rows_follow_kclip_flatten_order(torch_ref, open_clip):
  """k-CLIP flattens (B, C, H, W) with flatten(2).transpose(1, 2); our NHWC grid reshaped to
  (B, h*w, C) must give the same rows. A non-square 96 x 64 input (3 x 2 grid) pins it."""
  torch = torch_ref
  from open_clip.modified_resnet import ModifiedResNet  # pylint: disable=g-import-not-at-top

  ref = randomise_(
    torch, ModifiedResNet(layers=[1, 1, 1, 1], output_dim=32, heads=4, image_size=64, width=16)
  )
  arch, params = clip.convert_openai_state_dict(ref.state_dict())
  x = torch.randn(2, 3, 96, 64)
  with torch.no_grad():
    want = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.stem(x))))).flatten(2).transpose(1, 2)
  got = jax.jit(lambda p, x: clip.resnet_layer4(clip.build_vision_model(arch), p, x))(
    params, nhwc(x)
  )
  assert got.shape == (2, 3, 2, 512)
  assert rel_err(got.reshape(2, 6, 512), want) <= TOL


# ----------------------------------------------------------------------------- checkpoints
def test_torchscript_archive_round_trip_and_cli(torch_ref, open_clip, tmp_path, capsys):
  torch = torch_ref
  model = small_clip(open_clip, dict(layers=2, width=128, patch_size=8, image_size=32))
  randomise_(torch, model.visual)
  model.register_buffer('input_resolution', torch.tensor(32))  # as in OpenAI's JIT archives
  path = str(tmp_path / 'small.pt')
  torch.jit.script(model).save(path)

  arch, params = clip.load_openai_checkpoint(path)
  assert arch == dict(
    kind='vit', image_size=32, patch_size=8, width=128, layers=2, heads=2, output_dim=32
  )
  x = torch.rand(2, 3, 32, 32)
  with torch.no_grad():
    v = model.visual
    want = v.ln_post(v.transformer(v._embeds(x))) @ v.proj
  teacher_in = nhwc(x) * jnp.asarray(clip.CLIP_STD) + jnp.asarray(clip.CLIP_MEAN)
  got = jax.jit(lambda p, x: clip.vit_tokens(clip.build_vision_model(arch), p, x))(params, nhwc(x))
  assert rel_err(got, want) <= TOL

  out = str(tmp_path / 'small.npz')
  assert clip.main([f'--checkpoint={path}', f'--out={out}']) == 0
  assert 'small.npz' in capsys.readouterr().out
  arch2, params2 = clip.load_params(out)
  assert arch2 == arch
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  # The teacher from the .npz takes [0, 1] images and normalises them itself.
  teacher = clip.CLIPTeacher(out)
  assert rel_err(teacher.tokens(teacher_in), want) <= TOL
  assert clip.main([f'--checkpoint={tmp_path / "absent.pt"}', f'--out={out}']) == 2
  assert 'absent.pt' in capsys.readouterr().err


def test_fp16_state_dict_file_converts_to_fp32(torch_ref, open_clip, tmp_path):
  torch = torch_ref
  model = small_clip(open_clip, dict(layers=(1, 1, 1, 1), width=16, image_size=64))
  randomise_(torch, model.visual)
  half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
  path = str(tmp_path / 'rn_fp16.pt')
  torch.save({'state_dict': half}, path)

  arch, params = clip.load_openai_checkpoint(path)
  assert arch == dict(
    kind='resnet', image_size=64, width=16, layers=(1, 1, 1, 1), heads=8, output_dim=32
  )
  assert all(p.dtype == np.float32 for p in jax.tree.leaves(params))
  # Exactly the fp16 values, widened.
  _, want = clip.convert_openai_state_dict({k: v.float() for k, v in half.items()})
  jax.tree.map(np.testing.assert_array_equal, params, want)
  np.testing.assert_array_equal(
    params['layer1_0']['bn3']['var'], half['visual.layer1.0.bn3.running_var'].float().numpy()
  )
  # And the tower computes what the (fp16-rounded) torch tower computes.
  model.visual.load_state_dict(
    {k[len('visual.') :]: v.float() for k, v in half.items() if k.startswith('visual.')}
  )
  x = torch.randn(1, 3, 64, 64)
  with torch.no_grad():
    want_pooled = model.visual(x)
  got = jax.jit(clip.build_vision_model(arch).apply)({'params': params}, nhwc(x))['pooled']
  assert rel_err(got, want_pooled) <= TOL


@pytest.mark.parametrize(
  'name', ['ViT-B-16', 'ViT-L-14', 'RN50', 'RN101', 'RN50x4', 'RN50x16', 'RN50x64']
)
def test_arch_inference_and_conversion_of_full_size_models(torch_ref, open_clip, name):
  """open_clip's OpenAI configs built on the meta device (nothing allocated): the inferred
  arch is our config, and converting zero-copy stubs of those shapes fits the Flax model."""
  torch = torch_ref
  with torch.device('meta'):
    model = open_clip.model.CLIP(**open_clip.get_model_config(name), quick_gelu=True)
  sd = model.state_dict()
  want = clip.CLIP_VISION_CONFIGS[clip.canonical_name(name)]
  assert clip.infer_openai_arch(sd) == clip.validate_arch(want)
  zero = np.zeros((), np.float32)
  stubs = {k: np.broadcast_to(zero, tuple(v.shape)) for k, v in sd.items()}
  arch, params = clip.convert_openai_state_dict(stubs)  # checks every shape vs the model
  assert arch == clip.validate_arch(want)
  if name == 'RN50x64':  # the k-CLIP features: 14 x 14 x 4096 at 448 px
    grid = jax.eval_shape(
      lambda p: clip.resnet_layer4(clip.build_vision_model(arch), p, jnp.zeros((1, 448, 448, 3))),
      params,
    )
    assert grid.shape == (1, 14, 14, 4096)


# ----------------------------------------------------------------------------- teacher
def test_teacher_normalises_freezes_and_saves(tmp_path):
  teacher = clip.CLIPTeacher(
    'random:ViT-B/16,width=64,layers=1,image_size=32,patch_size=8,output_dim=16,seed=3'
  )
  assert teacher.arch == dict(
    kind='vit', image_size=32, patch_size=8, width=64, layers=1, heads=1, output_dim=16
  )
  x01 = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3))
  tokens = teacher.tokens(x01)
  assert tokens.shape == (2, 17, 16) and np.std(tokens) > 0.1
  # (That the teacher applies CLIP mean/std is checked against torch in the archive test.)
  grads = jax.jit(jax.grad(lambda p, x: teacher.apply_tokens(p, x).sum(), argnums=(0, 1)))(
    teacher.params, x01
  )
  assert all(not np.any(g) for g in jax.tree.leaves(grads))  # frozen: no gradient at all
  # bf16 compute stays close to fp32.
  bf16 = clip.CLIPTeacher(teacher.spec, dtype=jnp.bfloat16)
  assert rel_err(bf16.tokens(x01), tokens) < 3e-2
  # .npz round trip: the same arch and params.
  path = str(tmp_path / 't.npz')
  clip.save_params(path, teacher.arch, teacher.params)
  again = clip.CLIPTeacher(path)
  assert again.arch == teacher.arch
  jax.tree.map(np.testing.assert_array_equal, again.params, teacher.params)
  with pytest.raises(ValueError, match='layer4 needs a resnet'):
    teacher.layer4(x01)


def test_resnet_teacher_layer4_and_pooled():
  teacher = clip.CLIPTeacher('random:RN50,width=8,layers=1-1-1-1,image_size=64')
  assert teacher.layer4_channels == 256 and teacher.arch['heads'] == 4
  x01 = jax.random.uniform(jax.random.PRNGKey(1), (2, 96, 64, 3))
  grid = np.asarray(teacher.layer4(x01))  # any resolution for layer 4 alone
  assert grid.shape == (2, 3, 2, 256) and np.all(np.isfinite(grid)) and np.all(grid >= 0)
  assert np.std(grid[0] - grid[1]) > 0.01 * np.std(grid)  # image-dependent
  pooled = teacher.pooled(x01[:, :64])  # attention pooling needs the model's 64 px
  assert pooled.shape == (2, teacher.output_dim) and np.all(np.isfinite(pooled))
  with pytest.raises(ValueError, match='tokens needs a vit'):
    teacher.tokens(x01)


# ----------------------------------------------------------------------------- bad input
def test_missing_files_are_named(tmp_path):
  for fn in (clip.load_openai_checkpoint, clip.load_params, clip.CLIPTeacher):
    with pytest.raises(FileNotFoundError, match='nowhere'):
      fn(str(tmp_path / 'nowhere.pt'))
  with pytest.raises(FileNotFoundError, match='nowhere.npz'):
    clip.CLIPTeacher(str(tmp_path / 'nowhere.npz'))


def test_bad_files_and_specs(tmp_path, monkeypatch):
  junk = tmp_path / 'junk.pt'
  junk.write_bytes(b'not a checkpoint')
  with pytest.raises(ValueError, match='neither a TorchScript archive nor'):
    clip.load_openai_checkpoint(str(junk))
  other = str(tmp_path / 'other.npz')
  np.savez(other, w=np.zeros(3))
  with pytest.raises(ValueError, match='not a converted CLIP file'):
    clip.load_params(other)
  for spec, msg in (
    ('random:RN51', 'Unknown CLIP vision model'),
    ('random:RN50,depth=3', 'bad override'),
    ('random:RN50,layers=1-1', '4 stage depths'),
    ('random:ViT-B/16,width=100,heads=3', 'width'),
  ):
    with pytest.raises(ValueError, match=msg):
      clip.parse_random_spec(spec)
  teacher = clip.CLIPTeacher('random:ViT-B/16,width=64,layers=1,image_size=32,patch_size=8')
  with pytest.raises(ValueError, match=r'\(B, 32, 32, 3\)'):
    teacher.tokens(jnp.zeros((1, 48, 48, 3)))
  monkeypatch.setitem(sys.modules, 'torch', None)  # as if torch were not installed
  with pytest.raises(ImportError, match='needs PyTorch'):
    clip.load_openai_checkpoint(str(junk))


def test_unexpected_missing_and_misshapen_keys(torch_ref, open_clip):
  sd = small_clip(open_clip, dict(layers=1, width=64, patch_size=8, image_size=16)).state_dict()
  arch, _ = clip.convert_openai_state_dict(sd)  # text tower and logit_scale ignored
  assert arch['layers'] == 1
  bad = dict(sd)
  del bad['visual.ln_post.bias']
  bad['visual.transformer.resblocks.0.attn.extra'] = sd['visual.ln_post.bias']
  with pytest.raises(
    ValueError,
    match=r"missing \['ln_post.bias'\], unexpected "
    r"\['transformer.resblocks.0.attn.extra'\]",
  ):
    clip.convert_openai_state_dict(bad)
  misshapen = dict(sd, **{'visual.ln_pre.weight': sd['visual.ln_pre.weight'][:10]})
  with pytest.raises(ValueError, match=r'ln_pre/scale: shape \(10,\), the model needs \(64,\)'):
    clip.convert_openai_state_dict(misshapen)
  with pytest.raises(ValueError, match="neither 'visual.proj'"):
    clip.convert_openai_state_dict({'token_embedding.weight': sd['token_embedding.weight']})
  # Without the 'visual.' prefix every key must be a vision key.
  bare = {k[len('visual.') :]: v for k, v in sd.items() if k.startswith('visual.')}
  assert clip.convert_openai_state_dict(bare)[0] == arch
  with pytest.raises(ValueError, match=r"unexpected \['logit_scale'\]"):
    clip.convert_openai_state_dict(dict(bare, logit_scale=sd['logit_scale']))
