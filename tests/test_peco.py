"""PeCo: perceptual ViT teacher (vs timm), checkpoint layouts, Eq. 4 loss, VQ-VAE shapes and
size, GAN gradient separation, one training step, tokenizer restore from a workdir."""

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_util

from mim_jax import checkpoint as ckpt_lib
from mim_jax import config_lib
from mim_jax import methods
from mim_jax import sharding
from mim_jax import train
from mim_jax.methods import peco_vqvae
from mim_jax.teachers import perceptual
from mim_jax.tokenizers import base as tok_base
from mim_jax.tokenizers import peco

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


# ----------------------------------------------------------------------------- teacher
@pytest.fixture(scope="module")
def timm_vit(torch_ref):
  """A small timm ViT with every weight (biases, LN) perturbed away from its init."""
  torch = torch_ref
  import timm  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  model = timm.models.vision_transformer.VisionTransformer(
    img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10
  ).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def _timm_block_outputs(model, images01, torch):
  x = torch.from_numpy(((images01 - MEAN) / STD).astype(np.float32)).permute(0, 3, 1, 2)
  outs = []
  with torch.no_grad():
    h = model._pos_embed(model.patch_embed(x))
    for blk in model.blocks:
      h = blk(h)
      outs.append(h[:, 1:].numpy())
  return outs


def test_perceptual_vit_matches_timm_block_features(timm_vit, torch_ref):
  arch, params = perceptual.convert_timm_vit(timm_vit.state_dict(), num_heads=4)
  assert arch == perceptual.arch_dict(
    embed_dim=64, depth=4, num_heads=4, patch_size=8, image_size=32
  )
  images = np.random.default_rng(0).random((2, 32, 32, 3), np.float32)
  ref = _timm_block_outputs(timm_vit, images, torch_ref)
  model = perceptual.build_model(arch, (1, 2, 3, 4))
  raw = model.apply(
    {"params": params},
    jnp.asarray(images),
    normalize=False,
    method=perceptual.PerceptualViT.features,
  )
  normed = model.apply(
    {"params": params}, jnp.asarray(images), method=perceptual.PerceptualViT.features
  )
  for ours, theirs, unit in zip(raw, ref, normed):
    assert ours.shape == theirs.shape == (2, 16, 64)
    assert np.abs(np.asarray(ours) - theirs).max() <= 1e-4 * np.abs(theirs).max()
    # LPIPS channel-wise unit normalisation of the same features.
    expect = theirs / (np.sqrt((theirs**2).sum(-1, keepdims=True)) + 1e-10)
    np.testing.assert_allclose(np.asarray(unit), expect, atol=1e-5)


def test_pos_embed_is_resampled_like_timm(timm_vit, torch_ref):
  import timm  # pylint: disable=g-import-not-at-top

  sd = timm_vit.state_dict()
  arch, params = perceptual.convert_timm_vit(sd, num_heads=4, image_size=48)
  assert arch["image_size"] == 48 and params["pos_embed"].shape == (1, 1 + 36, 64)
  ref = timm.layers.resample_abs_pos_embed(sd["pos_embed"], [6, 6]).numpy()
  np.testing.assert_allclose(params["pos_embed"], ref, atol=1e-6)


def test_vit_b16_layout_is_fully_covered_and_gaps_are_named(torch_ref):
  import timm  # pylint: disable=g-import-not-at-top

  with torch_ref.device("meta"):
    shapes = {
      k: tuple(v.shape)
      for k, v in timm.create_model("vit_base_patch16_224", pretrained=False).state_dict().items()
    }
  sd = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  arch, params = perceptual.convert_timm_vit(sd)  # checks every parameter and shape
  assert arch == perceptual.arch_dict(embed_dim=768, depth=12, num_heads=12, patch_size=16)
  assert sum(x.size for x in jax.tree.leaves(params)) == sum(
    math.prod(s) for k, s in shapes.items() if not k.startswith("head.")
  )
  broken = {k: v for k, v in sd.items() if k != "blocks.5.mlp.fc2.weight"}
  with pytest.raises(ValueError, match=r"myckpt.*blocks_5.*fc2"):
    perceptual.convert_timm_vit(broken, source="myckpt")
  with pytest.raises(ValueError, match=r"gamma_1.*layer scale"):
    perceptual.convert_timm_vit(dict(sd, **{"blocks.0.ls1.gamma": np.ones(768)}))


def test_moco_v3_and_dino_layouts_load_the_same_params(timm_vit, torch_ref, tmp_path):
  torch = torch_ref
  sd = timm_vit.state_dict()
  _, want = perceptual.convert_timm_vit(sd, num_heads=4)
  noise = lambda v: torch.randn_like(v)
  moco = {
    "epoch": 100,
    "arch": "vit_base",
    "optimizer": {"state": {}},
    "state_dict": {
      **{f"module.base_encoder.{k}": v for k, v in sd.items()},
      **{f"module.momentum_encoder.{k}": noise(v) for k, v in sd.items()},
      "module.base_encoder.head.0.weight": torch.zeros(8, 64),
      "module.predictor.0.weight": torch.zeros(8, 8),
    },
  }
  dino_plain = {k: v for k, v in sd.items() if not k.startswith("head.")}
  dino_full = {
    "epoch": 10,
    "args": argparse.Namespace(arch="vit_small"),
    "teacher": {
      **{f"backbone.{k}": v for k, v in sd.items()},
      "head.last_layer.weight_g": torch.ones(16, 1),
    },
    "student": {
      **{f"module.backbone.{k}": noise(v) for k, v in sd.items()},
      "module.head.mlp.0.weight": torch.zeros(8, 64),
    },
  }
  paths = {}
  for name, obj in (("moco", moco), ("dino_plain", dino_plain), ("dino_full", dino_full)):
    paths[name] = str(tmp_path / f"{name}.pth")
    torch.save(obj, paths[name])
  loaded = [
    perceptual.load_moco_v3(paths["moco"], num_heads=4),
    perceptual.load_dino(paths["dino_plain"], num_heads=4),
    perceptual.load_dino(paths["dino_full"], num_heads=4),
  ]
  loaded += [perceptual.load_checkpoint(p, num_heads=4) for p in paths.values()]
  for arch, params in loaded:
    assert arch["depth"] == 4 and arch["num_heads"] == 4
    jax.tree.map(np.testing.assert_array_equal, params, want)
  # The student differs from the teacher, so `which` matters.
  _, student = perceptual.load_dino(paths["dino_full"], which="student", num_heads=4)
  assert not np.array_equal(student["cls_token"], want["cls_token"])
  with pytest.raises(ValueError, match=r"dino_plain\.pth.*module\.base_encoder"):
    perceptual.load_moco_v3(paths["dino_plain"])
  # A converted .npz round-trips (training then needs no torch).
  npz = str(tmp_path / "teacher.npz")
  perceptual.save_npz(npz, loaded[0][0], loaded[0][1])
  arch, params = perceptual.load_npz(npz)
  assert arch == loaded[0][0]
  jax.tree.map(np.testing.assert_array_equal, params, want)


def test_perceptual_loss_is_eq4_zero_for_identical_and_grows_with_distortion():
  teacher = perceptual.PerceptualTeacher(
    "random:T/8,width=32,depth=3,heads=2", image_size=32, layers=(1, 2, 3)
  )
  rng = np.random.default_rng(0)
  x = rng.random((3, 32, 32, 3), np.float32)
  loss = jax.jit(teacher.loss_fn())
  assert abs(float(loss(teacher.params, x, x))) < 1e-12  # two traced passes: rounding only
  values = [
    float(loss(teacher.params, x, np.clip(x + s * rng.standard_normal(x.shape), 0, 1)))
    for s in (0.02, 0.1, 0.4)
  ]
  assert 0 < values[0] < values[1] < values[2]
  # NumPy Eq. 4 from the raw block features: unit-normalise over channels, mean over
  # batch x tokens x channels per layer, sum over layers.
  y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
  raw = teacher.features_fn(normalize=False)
  fa, fb = raw(teacher.params, x), raw(teacher.params, y)
  unit = lambda f: np.asarray(f) / (np.sqrt((np.asarray(f) ** 2).sum(-1, keepdims=True)) + 1e-10)
  expect = sum(np.mean((unit(a) - unit(b)) ** 2) for a, b in zip(fa, fb))
  np.testing.assert_allclose(float(loss(teacher.params, x, y)), expect, rtol=1e-5)


# ----------------------------------------------------------------------------- VQ-VAE
def _conv(k, cin, cout):
  return k * k * cin * cout + cout


def _res(cin, cout):
  return (
    2 * cin
    + _conv(3, cin, cout)
    + 2 * cout
    + _conv(3, cout, cout)
    + (_conv(1, cin, cout) if cin != cout else 0)
  )


def _attn(c):
  return 2 * c + 4 * _conv(1, c, c)


def expected_param_count(ch, ch_mult, num_res_blocks, z_channels, embed_dim):
  """Closed form of the taming-style encoder/decoder described in peco.py."""
  enc, c = _conv(3, 3, ch), ch
  for i, m in enumerate(ch_mult):
    for _ in range(num_res_blocks):
      enc, c = enc + _res(c, ch * m), ch * m
    enc += _conv(3, c, c) if i != len(ch_mult) - 1 else 0
  enc += 2 * _res(c, c) + _attn(c) + 2 * c + _conv(3, c, z_channels)
  top = ch * ch_mult[-1]
  dec, c = _conv(3, z_channels, top) + 2 * _res(top, top) + _attn(top), top
  for i in reversed(range(len(ch_mult))):
    for _ in range(num_res_blocks):
      dec, c = dec + _res(c, ch * ch_mult[i]), ch * ch_mult[i]
    dec += _conv(3, c, c) if i else 0
  dec += 2 * c + _conv(3, c, 3)
  return enc + _conv(1, z_channels, embed_dim), dec + _conv(1, embed_dim, z_channels)


def test_vqvae_gives_14x14_codes_at_224_and_the_expected_size():
  cfg = config_lib.load_config("peco_vqvae").vqvae
  model = peco.vqvae_from_config(cfg)
  (rec, q), variables = jax.eval_shape(
    lambda x: model.init_with_output(jax.random.PRNGKey(0), x, train=False),
    jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32),
  )
  assert rec.shape == (2, 224, 224, 3)
  assert q.ids.shape == (2, 14, 14) and q.z_q.shape == (2, 14, 14, 256)
  assert variables["codebook"]["quantizer"]["embedding"].shape == (8192, 256)
  assert "quantizer" not in variables["params"]  # the codebook is not a parameter
  for kw in (
    dict(cfg),
    dict(cfg, ch_mult=(1, 2, 4, 8, 16)),
    dict(ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, z_channels=32, embed_dim=8, num_groups=8),
  ):
    counts = peco.param_count(kw)
    enc, dec = expected_param_count(
      kw["ch"], kw["ch_mult"], kw["num_res_blocks"], kw["z_channels"], kw["embed_dim"]
    )
    assert (counts["encoder"], counts["decoder"]) == (enc, dec)
  # Encoder + 8192 x 256 codebook = PeCo Table 2's 37.5M tokenizer (see the config).
  assert abs(peco.param_count(cfg)["encoder"] + 8192 * 256 - 37.5e6) < 0.2e6
  with pytest.raises(ValueError, match="num_groups"):
    peco.param_count(dict(ch=24, num_groups=32))


# ----------------------------------------------------------------------------- method
SIZE = 16


def _tiny_config(gan: bool):
  c = config_lib.load_config("peco_vqvae", "gan" if gan else "")
  c.data.source, c.data.image_size, c.data.second_image_size = "embedded", SIZE, SIZE
  c.vqvae.update(
    ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, embed_dim=4, num_groups=4, num_codes=16
  )
  c.perceptual.path = "random:T/8,width=16,depth=2,heads=2"
  c.perceptual.layers = (1, 2)
  c.gan.update(ndf=8, n_layers=1, start=3)
  c.batch_size, c.total_steps = 4, 10
  return c


def _images(b=4, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (b, SIZE, SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def gan_method():
  return methods.build(_tiny_config(gan=True))


def test_gan_gradients_reach_each_network_only_from_its_own_loss(gan_method):
  """grad(one scalar loss) = (grad of the generator objective w.r.t. the VQ-VAE with D
  frozen, grad of the discriminator's own loss w.r.t. D with x_hat frozen)."""
  m = gan_method
  variables = m.init(jax.random.PRNGKey(0), None)
  params = variables["params"]
  extra = {k: v for k, v in variables.items() if k != "params"}
  consts = m.consts()
  batch = {"image": _images()}
  rng = jax.random.PRNGKey(1)
  x = peco.to_model_range(batch["image"])

  @jax.jit
  def method_grads(p, step):  # the trainer's gradient (one compile for both steps)
    ex = dict(extra, counters={"step": step})
    return jax.grad(lambda p: m.loss(p, ex, consts, batch, rng)[0])(p)

  def rec_fn(vae):  # the same straight-through forward, codebook state as in the loss
    _, rec, q, _ = m.reconstruct({"vqvae": vae}, extra, batch["image"], train=True, rng=rng)
    return rec, q

  def generator_objective(vae, disc, gan_weight):  # pixel + perceptual + commit + w * L_G
    rec, q = rec_fn(vae)
    f = m.teacher_features
    percep = perceptual.perceptual_loss(
      f(consts["perceptual"], peco.to_unit_range(x)),
      f(consts["perceptual"], peco.to_unit_range(rec)),
    )
    base = jnp.mean(jnp.abs(x - rec)) + percep + q.loss
    return base + gan_weight * peco_vqvae.generator_loss(
      m.disc.apply({"params": disc}, rec), "vanilla"
    )

  def disc_objective(disc, x, rec):
    return peco_vqvae.discriminator_loss(
      m.disc.apply({"params": disc}, x), m.disc.apply({"params": disc}, rec), "vanilla"
    )

  rec_fn = jax.jit(rec_fn)

  @jax.jit
  def separate_grads(vae, disc, gan_weight):  # each network's own objective, separately
    rec = jax.lax.stop_gradient(rec_fn(vae)[0])
    return (
      jax.grad(generator_objective)(vae, disc, gan_weight),
      jax.grad(disc_objective)(disc, x, rec),
    )

  close = lambda a, b: np.testing.assert_allclose(
    np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7
  )
  g = method_grads(params, jnp.asarray(5, jnp.int32))  # the GAN is on (gan.start = 3)
  want_vae, want_disc = separate_grads(
    params["vqvae"], params["discriminator"], m.config.gan.weight
  )
  jax.tree.map(close, g["vqvae"], want_vae)
  jax.tree.map(close, g["discriminator"], want_disc)

  # Numerically: the discriminator's gradient in the method is the slope of its own loss
  # alone (central difference in float64 with a step small enough not to cross leaky-ReLU
  # kinks; in fp32 rounding and kinks blur it).
  leaves, tree = jax.tree.flatten(params["discriminator"])
  dirs = [np.random.default_rng(i).standard_normal(l.shape) for i, l in enumerate(leaves)]
  along = sum(
    float(np.vdot(np.asarray(a, np.float64), d))
    for a, d in zip(jax.tree.leaves(g["discriminator"]), dirs)
  )
  rec = rec_fn(params["vqvae"])[0]
  with jax.enable_x64(True):
    to64 = lambda a: jnp.asarray(a, jnp.float64)
    shifted = lambda s: jax.tree.unflatten(tree, [to64(l) + s * d for l, d in zip(leaves, dirs)])
    eps = 1e-7
    slope = float(
      (
        disc_objective(shifted(eps), to64(x), to64(rec))
        - disc_objective(shifted(-eps), to64(x), to64(rec))
      )
      / (2 * eps)
    )
  np.testing.assert_allclose(along, slope, rtol=1e-4)

  # The generator term does reach the VQ-VAE; before gan.start nothing reaches D and the
  # VQ-VAE gets the plain reconstruction gradient.
  without_g, _ = separate_grads(params["vqvae"], params["discriminator"], 0.0)
  assert not np.allclose(
    np.asarray(g["vqvae"]["decoder"]["conv_out"]["kernel"]),
    np.asarray(without_g["decoder"]["conv_out"]["kernel"]),
  )
  before = method_grads(params, jnp.asarray(2, jnp.int32))
  assert all(float(jnp.abs(l).max()) == 0.0 for l in jax.tree.leaves(before["discriminator"]))
  jax.tree.map(close, before["vqvae"], without_g)


def test_one_trainer_step_updates_the_codebook_collection_not_params(tmp_path):
  config = _tiny_config(gan=False)  # the GAN's wiring has its own test above
  config.optim.warmup_steps = 0  # a real update at step 0
  method = methods.build(config)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  trainer = train.Trainer(config, mesh, method)
  batch_np = method.prepare({"image": _images(), "image2": _images()}, None)
  assert set(batch_np) == {"image"}
  sample = {"image": jax.ShapeDtypeStruct((4, SIZE, SIZE, 3), jnp.uint8)}
  _, state_sh = trainer.abstract_state(sample)
  frozen, frozen_sh = trainer.frozen()
  # The runner's own guarded step (what `python -m mim_jax.train` runs) around the method's.
  compile_step, state = train_util.guarded_step(trainer, sample, state_sh, frozen_sh)
  before = jax.device_get(state)
  batch = sharding.global_batch(dict(batch_np, _bad=np.zeros((4,), np.int32)), mesh)
  step, _, _ = compile_step(state, frozen, batch)
  state, metrics = step(state, frozen, batch)
  assert int(state["guard"]["nonfinite_steps"]) == 0
  after = jax.device_get(state)
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert float(metrics["psnr"]) > 0 and 1 <= float(metrics["codebook_used"]) <= 16
  paths = [
    jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(after["params"])[0]
  ]
  assert not any("quantizer" in p or "embedding" in p for p in paths)
  book0, book1 = before["extra"]["codebook"], after["extra"]["codebook"]
  assert not np.allclose(book0["quantizer"]["embedding"], book1["quantizer"]["embedding"])
  assert int(after["extra"]["counters"]["step"]) == 1
  assert not np.allclose(
    before["params"]["vqvae"]["decoder"]["conv_out"]["kernel"],
    after["params"]["vqvae"]["decoder"]["conv_out"]["kernel"],
  )

  # The workdir a training run leaves restores as a tokenizer (params + 'codebook').
  workdir = str(tmp_path / "run")
  ckpt_lib.write_config(workdir, config.to_json_best_effort(), method.fingerprint())
  saver = ckpt_lib.Checkpointer(workdir, async_save=False)
  saver.save(1, state, None)
  saver.close()
  tok = tok_base.load_tokenizer(config_lib.mlc.ConfigDict({"kind": "peco", "path": workdir}))
  assert tok.codebook_size == 16 and tok.grid == (8, 8) and tok.view.size == SIZE
  ids = np.asarray(tok.tokenize(batch_np["image"]))
  q = method.vqvae.apply(
    {"params": after["params"]["vqvae"], "codebook": book1},
    peco.to_model_range(batch_np["image"]),
    method=peco.VQVAE.encode,
  )
  np.testing.assert_array_equal(ids, np.asarray(q.ids).reshape(4, -1))
  images = tok.decode_fn(tok.params, ids)
  assert images.shape == (4, SIZE, SIZE, 3) and 0 <= float(images.min()) <= float(images.max()) <= 1


def test_config_recipe_and_missing_teacher_error():
  c = config_lib.load_config("peco_vqvae")
  assert (c.optim.lr, c.optim.b1, c.optim.b2, c.optim.warmup_steps) == (5e-5, 0.5, 0.95, 5000)
  assert c.batch_size == 128 and c.vqvae.num_codes == 8192 and c.vqvae.beta == 0.25
  assert tuple(c.perceptual.layers) == (3, 6, 9, 12) and c.gan.weight == 0.4
  with pytest.raises(ValueError, match=r"config\.perceptual\.path.*MoCo v3"):
    methods.build(c)
  # AdamW with weight decay 0 and no clipping is Adam with the recipe's betas (checked after
  # the warm-up: the lr is then the constant 5e-5).
  from mim_jax import optim  # pylint: disable=g-import-not-at-top

  opt = c.optim.copy_and_resolve_references()
  opt.warmup_steps = 0
  tx, _ = optim.make_optimizer(opt, total_steps=100)
  ref_tx = optax.adam(5e-5, b1=0.5, b2=0.95, eps=1e-8)
  p = {"w": jnp.ones((3, 3)), "b": jnp.ones(3)}
  ours, ref = p, p
  s_ours, s_ref = tx.init(p), ref_tx.init(p)
  for i in range(3):
    g = jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)) + 0.3 * x, ours)
    u, s_ours = tx.update(g, s_ours, ours)
    ours = optax.apply_updates(ours, u)
    u, s_ref = ref_tx.update(g, s_ref, ref)
    ref = optax.apply_updates(ref, u)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ours, ref)
  assert not np.allclose(ours["w"], 1.0)


@pytest.mark.parametrize("field", ["scan_layers", "remat"])
def test_layer_options_are_refused_with_the_field_name(field):
  """The VQ-VAE is convolutional: model.scan_layers / model.remat would silently do nothing."""
  c = config_lib.load_config("peco_vqvae", "runlocal")
  c.model[field] = True
  with pytest.raises(ValueError, match=rf"^config\.model\.{field}=True: [^\n]*$"):
    methods.check(c)
  with pytest.raises(ValueError, match=rf"config\.model\.{field}"):
    methods.build(c)
