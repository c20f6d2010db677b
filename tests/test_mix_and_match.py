"""Mix and match: every token objective (BEiT v2, PeCo MIM, PeCo-MAE, MaPeT) trains with every
tokenizer kind (VQ-KD, PeCo, k-CLIP, pixel centroids) by changing the config only. Each
pairing runs two real trainer steps on a 4 x 4 patch grid (16 px, patch 4)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import checkpoint as ckpt_lib
from mim_jax import config_lib
from mim_jax import methods
from mim_jax import sharding
from mim_jax import train
from mim_jax.teachers import clip
from mim_jax.tokenizers import base as tok_base
from mim_jax.tokenizers import centroids as centroid_lib
from mim_jax.tokenizers import kclip
from mim_jax.tokenizers import peco
from mim_jax.tokenizers import vqkd

SIZE, PATCH, CODES = 16, 4, 16


def _save_workdir(workdir, config, params, codebook):
  method = None
  del method
  ckpt_lib.write_config(workdir, config.to_json_best_effort(), {"method": config.method.name})
  saver = ckpt_lib.Checkpointer(workdir, async_save=False)
  saver.save(1, {"params": params, "extra": {"codebook": codebook}}, None)
  saver.close()
  return workdir


def _vqkd(tmp):
  c = config_lib.load_config("vqkd_vitb", "runlocal")
  c.data.image_size = SIZE
  c.model.variant, c.model.width, c.model.depth, c.model.heads = "T/4", 16, 1, 2
  c.vqkd.update(num_codes=CODES, decoder_width=16, decoder_heads=2)
  model = vqkd.model_from_config(c)
  v = nn.unbox(vqkd.init_variables(model, jax.random.PRNGKey(0), SIZE))
  codes = np.random.default_rng(0).normal(size=(CODES, 32)).astype(np.float32)
  book = {"quantize": dict(v["codebook"]["quantize"],
                           embedding=codes / np.linalg.norm(codes, axis=-1, keepdims=True),
                           initted=np.asarray(True))}
  return _save_workdir(str(tmp / "vqkd"), c, v["params"], book)


def _peco(tmp):
  c = config_lib.load_config("peco_vqvae", "runlocal")
  c.data.image_size = SIZE
  c.vqvae.update(ch=8, ch_mult=(1, 2, 4), num_res_blocks=1, z_channels=16, embed_dim=8,
                 num_groups=4, num_codes=CODES)
  model = peco.vqvae_from_config(c.vqvae)
  v = nn.unbox(peco.init_variables(model, jax.random.PRNGKey(1), SIZE))
  return _save_workdir(str(tmp / "peco"), c, {"vqvae": v["params"]}, v["codebook"])


def _kclip(tmp):
  teacher = clip.CLIPTeacher("random:RN50,width=8,layers=1-1-1-1,image_size=128")
  rng = np.random.default_rng(2)
  centroids = rng.normal(size=(CODES, teacher.layer4_channels)).astype(np.float32)
  out = str(tmp / "kclip")
  kclip.KClipTokenizer(teacher, centroids, view=tok_base.View(128, 128)).save(out)
  return out


def _centroids(tmp):
  tok = centroid_lib.CentroidTokenizer(
      np.random.default_rng(3).random((CODES, 3 * PATCH * PATCH)).astype(np.float32), PATCH,
      metadata={"image_size": SIZE})
  path = str(tmp / "centroids")
  tok.save(path)
  return path


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("tokenizers")
  return {"vqkd": (_vqkd(tmp), SIZE), "peco": (_peco(tmp), SIZE),
          "kclip": (_kclip(tmp), 128), "centroids": (_centroids(tmp), SIZE)}


OBJECTIVES = {
    "beitv2": ("beitv2_vitb", {"method.num_masked": 6, "method.min_block": 2,
                               "method.early_layers": 1}),
    "peco_mim": ("peco_vitb", {"method.num_masked": 6, "method.min_block": 2}),
    "mapet": ("mapet_vitb", {"method.least_number": 6}),
    "peco_mae": ("peco_mae_vitb", {"method.num_masked": 12, "method.decoder_dim": 16,
                                   "method.decoder_depth": 1, "method.decoder_heads": 2}),
}


def _set(c, key, value):
  node = c
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value


@pytest.mark.parametrize("kind", ["vqkd", "peco", "kclip", "centroids"])
@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_objective_trains_with_tokenizer(tokenizers, objective, kind):
  module, over = OBJECTIVES[objective]
  c = config_lib.load_config(module, "runlocal")
  path, view = tokenizers[kind]
  c.data.image_size, c.data.second_image_size = SIZE, view
  c.model.variant, c.model.width, c.model.depth, c.model.heads = "T/4", 32, 2, 2
  c.tokenizer.update(kind=kind, path=path, build_if_missing=False)
  for k, v in over.items():
    _set(c, k, v)
  c.optim.warmup_steps = 0
  method = methods.build(c)
  assert method.targets.vocab_size == CODES and method.targets.online
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
  views = rng.integers(0, 256, (4, view, view, 3), dtype=np.uint8)
  examples = [method.prepare({"image": images[i], "image2": views[i]},
                             np.random.default_rng(i)) for i in range(4)]
  local = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  trainer = train.Trainer(c, mesh, method)
  sample = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in local.items()}
  _, state_sh = trainer.abstract_state(sample)
  state = trainer.init_state(sample, state_sh)
  before = jax.device_get(state["params"])
  step = trainer.make_step(state_sh)
  batch = sharding.global_batch(local, mesh)
  losses = []
  for _ in range(2):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses)) and 0 < losses[0] < 2 * np.log(CODES) + 1
  after = jax.device_get(state["params"])
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), before, after))
  assert max(moved) > 0
  # The targets are the tokenizer's ids of the second view, in the objective's order.
  ids = np.asarray(method.targets(method.consts(), {"image2": jnp.asarray(views)}))
  assert ids.shape == (4, 16) and ids.min() >= 0 and ids.max() < CODES
