"""VQ-KD (BEiT v2 tokenizer): the official checkpoint layout against a PyTorch reference
built from timm's BEiT ViT (the class modeling_vqkd.py's encoder/decoder come from), the
training step (k-means init, EMA codebook in `extra`, teacher frozen), restoring a workdir
as a tokenizer, and the recipe of configs/vqkd_vitb.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_util

from mim_jax import checkpoint as ckpt_lib
from mim_jax import config_lib
from mim_jax import methods
from mim_jax import sharding
from mim_jax import train
from mim_jax.methods import common
from mim_jax.models import convert
from mim_jax.tokenizers import base as tok_base
from mim_jax.tokenizers import vqkd

SIZE, PATCH, WIDTH, CODE_DIM, CODES, TARGET = 32, 4, 64, 8, 32, 16


# ----------------------------------------------------------------------------- reference
class _TorchVQKD:
  """modeling_vqkd.VQKD's forward in PyTorch: timm Beit encoder/decoder (use_mean_pooling:
  norm = Identity, fc_norm on the patch tokens; no layer scale; learned abs pos), the
  Linear-Tanh-Linear task layers, the l2-normalised nearest-code lookup."""

  def __init__(self, torch):
    import timm  # pylint: disable=g-import-not-at-top

    nn = torch.nn
    torch.manual_seed(0)
    common = dict(
      embed_dim=WIDTH,
      num_heads=4,
      num_classes=0,
      global_pool="avg",
      init_values=None,
      use_abs_pos_emb=True,
      use_rel_pos_bias=False,
      use_shared_rel_pos_bias=False,
    )
    self.torch = torch
    self.encoder = timm.models.beit.Beit(img_size=SIZE, patch_size=PATCH, depth=2, **common)
    self.decoder = timm.models.beit.Beit(
      img_size=SIZE // PATCH, patch_size=1, in_chans=CODE_DIM, depth=1, **common
    )
    self.encode_task_layer = nn.Sequential(
      nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, CODE_DIM)
    )
    self.decode_task_layer = nn.Sequential(
      nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, TARGET)
    )
    self.codebook = torch.nn.functional.normalize(torch.randn(CODES, CODE_DIM), dim=-1)
    with torch.no_grad():  # move every weight (zero biases, unit LN) away from its init
      for m in (self.encoder, self.decoder, self.encode_task_layer, self.decode_task_layer):
        m.eval()
        for p in m.parameters():
          p.add_(0.05 * torch.randn_like(p))

  def state_dict(self) -> dict:
    sd = {}
    for name in ("encoder", "decoder", "encode_task_layer", "decode_task_layer"):
      sd.update({f"{name}.{k}": v for k, v in getattr(self, name).state_dict().items()})
    sd["quantize.embedding.weight"] = self.codebook.clone()
    sd["quantize.embedding.initted"] = self.torch.tensor([True])
    sd["quantize.cluster_size"] = self.torch.rand(CODES)
    sd["quantize.embedding.cluster_size"] = self.torch.zeros(CODES)  # unused buffers
    sd["quantize.embedding.embed_avg"] = self.torch.zeros(CODES, CODE_DIM)
    sd["scaling_layer.shift"] = self.torch.zeros(1, 3, 1, 1)  # dropped on load
    sd["teacher_model.visual.proj"] = self.torch.zeros(4, 4)
    return {"model": sd}

  def __call__(self, x11: np.ndarray):
    torch = self.torch
    with torch.no_grad():
      x = torch.from_numpy(x11).permute(0, 3, 1, 2)
      tokens = self.encoder.fc_norm(self.encoder.forward_features(x)[:, 1:])
      z = torch.nn.functional.normalize(self.encode_task_layer(tokens), dim=-1)
      d = z.pow(2).sum(-1, keepdim=True) + self.codebook.pow(2).sum(-1) - 2 * z @ self.codebook.t()
      ids = d.argmin(-1)
      z_q = self.codebook[ids]
      b, n, _ = z_q.shape
      side = int(n**0.5)
      z_q = z_q.transpose(1, 2).reshape(b, CODE_DIM, side, side)
      rec = self.decoder.fc_norm(self.decoder.forward_features(z_q)[:, 1:])
      return ids.numpy(), z.numpy(), self.decode_task_layer(rec).numpy()


@pytest.fixture(scope="module")
def reference(torch_ref):
  return _TorchVQKD(torch_ref)


def _images(n=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def test_official_layout_converts_and_matches_the_reference(reference):
  model, params, codebook, size = vqkd.convert_official_state_dict(
    reference.state_dict(), num_heads=4, decoder_num_heads=4
  )
  assert size == SIZE
  assert (
    model.patch_size,
    model.embed_dim,
    model.depth,
    model.decoder_depth,
    model.code_dim,
    model.num_codes,
    model.target_dim,
  ) == (PATCH, WIDTH, 2, 1, CODE_DIM, CODES, TARGET)
  images = _images()
  ids_ref, z_ref, rec_ref = reference(images.astype(np.float32) / 127.5 - 1.0)

  variables = {"params": params, "codebook": codebook}
  x = vqkd.to_model_range(jnp.asarray(images))
  z = model.apply(variables, x, method=vqkd.VQKD.codes)
  np.testing.assert_allclose(np.asarray(z), z_ref, rtol=1e-4, atol=2e-5)
  rec, q = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(np.asarray(q.ids).reshape(ids_ref.shape), ids_ref)
  scale = np.abs(rec_ref).max()
  np.testing.assert_allclose(np.asarray(rec), rec_ref, atol=1e-4 * scale)

  # The tokenizer face: uint8 in, the same ids out; the view is Resize(256/224) + crop.
  tok = vqkd.VQKDTokenizer.from_torch(
    reference.state_dict(), num_heads=4, decoder_num_heads=4
  ).as_tokenizer()
  assert tok.kind == "vqkd" and tok.codebook_size == CODES and tok.grid == (8, 8)
  assert (tok.view.size, tok.view.resize, tok.view.interpolation) == (32, 37, "bicubic")
  np.testing.assert_array_equal(np.asarray(tok.tokenize(images)), ids_ref)


def test_converter_names_what_does_not_fit(reference):
  sd = reference.state_dict()["model"]
  with pytest.raises(ValueError, match=r"unexpected.*encoder\.extra_thing"):
    vqkd.convert_official_state_dict({**sd, "encoder.extra_thing": sd["encoder.cls_token"]})
  with pytest.raises(ValueError, match=r"no home.*quantize\.extra_buffer"):
    vqkd.convert_official_state_dict({**sd, "quantize.extra_buffer": sd["encoder.cls_token"]})
  gamma = {k: v for k, v in sd.items()}
  gamma["encoder.blocks.0.gamma_1"] = sd["encoder.blocks.0.norm1.weight"]
  with pytest.raises(ValueError, match="layer scale|gamma"):
    vqkd.convert_official_state_dict(gamma)
  no_book = {k: v for k, v in sd.items() if k != "quantize.embedding.weight"}
  with pytest.raises(ValueError, match="quantize.embedding.weight"):
    vqkd.convert_official_state_dict(no_book)
  # A tokenizer-only checkpoint (no decoder) converts into a model that can only tokenize.
  enc_only = {k: v for k, v in sd.items() if not k.startswith(("decoder.", "decode_task"))}
  model, params, codebook, _ = vqkd.convert_official_state_dict(enc_only, num_heads=4)
  assert model.decoder_depth == 0 and "decoder" not in params
  ids = model.apply(
    {"params": params, "codebook": codebook},
    vqkd.to_model_range(jnp.asarray(_images(1))),
    method=vqkd.VQKD.tokenize,
  )
  assert ids.shape == (1, 64)


def test_cosine_rec_loss_is_one_minus_cosine_per_token():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(2, 5, 7)), rng.normal(size=(2, 5, 7))
  cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  np.testing.assert_allclose(
    float(common.cosine_rec_loss(jnp.asarray(a), jnp.asarray(b))), np.mean(1 - cos), rtol=1e-5
  )
  assert float(common.cosine_rec_loss(jnp.asarray(a), jnp.asarray(3 * a))) < 1e-6


# ----------------------------------------------------------------------------- training
def _tiny_config():
  c = config_lib.load_config("vqkd_vitb", "runlocal")
  # Fixed geometry: runlocal picks 64 px / patch 8 when ../shared/data is absent.
  c.data.image_size = c.data.second_image_size = SIZE
  c.model.variant = f"T/{PATCH}"
  c.model.width, c.model.depth, c.model.heads = 32, 1, 2
  c.vqkd.update(num_codes=16, decoder_width=32, decoder_heads=2)
  c.teacher.random_init = f"random:ViT-B/16,width=32,layers=1,patch_size={PATCH},image_size={SIZE}"
  c.optim.warmup_steps = 0  # a real update at step 0
  return c


def test_train_step_initialises_the_codebook_and_restores_as_a_tokenizer(tmp_path):
  config = _tiny_config()
  method = methods.build(config)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  trainer = train.Trainer(config, mesh, method)
  images = _images(8)
  batch_np = method.prepare({"image": images, "image2": images}, None)
  assert set(batch_np) == {"image"}
  sample = {"image": jax.ShapeDtypeStruct((8, SIZE, SIZE, 3), jnp.uint8)}
  _, state_sh = trainer.abstract_state(sample)
  # The teacher is a frozen input beside the state, never part of it (nor of checkpoints).
  frozen, frozen_sh = trainer.frozen()
  # The runner's own guarded step (what `python -m mim_jax.train` runs) around the method's.
  compile_step, state = train_util.guarded_step(trainer, sample, state_sh, frozen_sh)
  before = jax.device_get(state)
  assert not bool(before["extra"]["codebook"]["quantize"]["initted"])
  assert set(frozen) == {"teacher"} and "consts" not in before
  assert "teacher" not in before["params"]
  frozen_before = jax.device_get(frozen)
  batch = sharding.global_batch(dict(batch_np, _bad=np.zeros((8,), np.int32)), mesh)
  step, _, _ = compile_step(state, frozen, batch)
  state, m1 = step(state, frozen, batch)
  after = jax.device_get(state)
  book = after["extra"]["codebook"]["quantize"]
  assert bool(book["initted"])
  # k-means init on the batch: unit-norm codes, most of 16 codes used by 8 x 64 tokens.
  np.testing.assert_allclose(np.linalg.norm(book["embedding"], axis=-1), 1.0, rtol=1e-5)
  assert float(m1["codebook_used"]) >= 8
  assert np.isfinite(float(m1["loss"])) and 0.0 < float(m1["rec_loss"]) < 2.0
  np.testing.assert_allclose(
    float(m1["loss"]), float(m1["rec_loss"]) + float(m1["quant_loss"]), rtol=1e-5
  )
  assert not np.allclose(
    before["params"]["encoder"]["patch_embed"]["kernel"],
    after["params"]["encoder"]["patch_embed"]["kernel"],
  )
  jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.device_get(frozen))
  paths = [
    jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(after["params"])[0]
  ]
  assert not any("embedding" in p or "quantize" in p for p in paths)
  # The second step runs the same compiled function and EMA-updates the codebook.
  state, _ = step(state, frozen, batch)
  book2 = jax.device_get(state)["extra"]["codebook"]["quantize"]
  assert not np.allclose(book2["embedding"], book["embedding"])

  workdir = str(tmp_path / "run")
  ckpt_lib.write_config(workdir, config.to_json_best_effort(), method.fingerprint())
  saver = ckpt_lib.Checkpointer(workdir, async_save=False)
  saver.save(2, state, None)
  saver.close()
  tok = tok_base.load_tokenizer(config_lib.mlc.ConfigDict({"kind": "vqkd", "path": workdir}))
  assert tok.codebook_size == 16 and tok.grid == (8, 8) and tok.view.size == SIZE
  final = jax.device_get(state)
  expect = method.model.apply(
    {"params": final["params"], "codebook": final["extra"]["codebook"]},
    vqkd.to_model_range(jnp.asarray(images)),
    method=vqkd.VQKD.tokenize,
  )
  np.testing.assert_array_equal(np.asarray(tok.tokenize(images)), np.asarray(expect))


def test_config_recipe_and_clear_errors():
  c = config_lib.load_config("vqkd_vitb")
  assert c.method.name == "vqkd" and c.model.variant == "B/16" and c.batch_size == 512
  assert c.optim.lr == pytest.approx(5e-5 * 512 / 128)
  assert (c.optim.b1, c.optim.b2, c.optim.clip_grad_norm) == (0.9, 0.99, 0.0)
  assert tuple(c.data.crop_scale) == (0.08, 1.0) and c.data.color_jitter == 0.0
  assert (c.vqkd.num_codes, c.vqkd.code_dim, c.vqkd.decoder_depth, c.vqkd.beta) == (
    8192,
    32,
    3,
    1.0,
  )
  with pytest.raises(ValueError, match=r"config\.teacher\.path is empty.*ViT-B/16"):
    methods.build(c)
  c.teacher.path = "/nonexistent/clip.npz"
  with pytest.raises(FileNotFoundError, match="config.teacher.path: /nonexistent"):
    methods.build(c)
  bad = _tiny_config()
  bad.teacher.random_init = "random:ViT-B/16,width=32,layers=1,patch_size=8,image_size=32"
  with pytest.raises(ValueError, match="grid mismatch"):
    methods.build(bad)
  with pytest.raises(ValueError, match="decoder_depth=2"):
    config_lib.load_config("vqkd_vitb", "decoder_depth=2")


def test_scanned_rematerialised_encoder_and_decoder_give_the_same_loss():
  """model.scan_layers / model.remat act on the tokenizer's encoder and decoder blocks."""
  config = _tiny_config()
  config.model.depth = 2
  method = methods.build(config)
  batch = {"image": jnp.asarray(_images(2))}
  variables = nn.unbox(method.init(jax.random.PRNGKey(0), batch))
  params, extra = variables["params"], {"codebook": variables["codebook"]}
  ref = method.loss(params, extra, method.consts(), batch, None, train=False)[0]
  config.model.scan_layers = config.model.remat = True
  scanned = methods.build(config)
  stacked = {k: convert.stack_layers(v) if "blocks_0" in v else v for k, v in params.items()}
  assert "blocks" in stacked["encoder"] and "blocks" in stacked["decoder"]
  shapes = nn.unbox(jax.eval_shape(scanned.init, jax.random.PRNGKey(0), batch))["params"]
  assert jax.tree.structure(shapes) == jax.tree.structure(stacked)
  got = scanned.loss(stacked, extra, scanned.consts(), batch, None, train=False)[0]
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)
