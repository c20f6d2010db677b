"""Mix and match: every token objective (BEiT v2, PeCo MIM, PeCo-MAE, MaPeT) trains with every
tokenizer kind (VQ-KD, PeCo, k-CLIP, pixel centroids) by changing the config only. Each
pairing runs two real trainer steps on a 4 x 4 patch grid (16 px, patch 4).

Also the plug-in contract every method keeps: no method module imports another (shared
pieces live in neutral modules), model.scan_layers / model.remat are honoured, and
`frozen_fingerprint()` follows the content of the frozen inputs."""

import ast
import hashlib
import os

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
from mim_jax.teachers import clip
from mim_jax.teachers import clip_convert
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
  book = {
    "quantize": dict(
      v["codebook"]["quantize"],
      embedding=codes / np.linalg.norm(codes, axis=-1, keepdims=True),
      initted=np.asarray(True),
    )
  }
  return _save_workdir(str(tmp / "vqkd"), c, v["params"], book)


def _peco(tmp):
  c = config_lib.load_config("peco_vqvae", "runlocal")
  c.data.image_size = SIZE
  c.vqvae.update(
    ch=8,
    ch_mult=(1, 2, 4),
    num_res_blocks=1,
    z_channels=16,
    embed_dim=8,
    num_groups=4,
    num_codes=CODES,
  )
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


def _centroids(tmp, seed=3):
  tok = centroid_lib.CentroidTokenizer(
    np.random.default_rng(seed).random((CODES, 3 * PATCH * PATCH)).astype(np.float32),
    PATCH,
    metadata={"image_size": SIZE},
  )
  path = str(tmp / "centroids")
  tok.save(path)
  return path


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("tokenizers")
  return {
    "vqkd": (_vqkd(tmp), SIZE),
    "peco": (_peco(tmp), SIZE),
    "kclip": (_kclip(tmp), 128),
    "centroids": (_centroids(tmp), SIZE),
  }


OBJECTIVES = {
  "beitv2": (
    "beitv2_vitb",
    {"method.num_masked": 6, "method.min_block": 2, "method.early_layers": 1},
  ),
  "peco_mim": ("peco_vitb", {"method.num_masked": 6, "method.min_block": 2}),
  "mapet": ("mapet_vitb", {"method.least_number": 6}),
  "peco_mae": (
    "peco_mae_vitb",
    {
      "method.num_masked": 12,
      "method.decoder_dim": 16,
      "method.decoder_depth": 1,
      "method.decoder_heads": 2,
    },
  ),
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
  examples = [
    method.prepare({"image": images[i], "image2": views[i]}, np.random.default_rng(i))
    for i in range(4)
  ]
  local = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  trainer = train.Trainer(c, mesh, method)
  sample = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in local.items()}
  _, state_sh = trainer.abstract_state(sample)
  frozen, frozen_sh = trainer.frozen()
  # The runner's own guarded step (what `python -m mim_jax.train` runs) around the method's.
  compile_step, state = train_util.guarded_step(trainer, sample, state_sh, frozen_sh)
  before = jax.device_get(state["params"])
  batch = sharding.global_batch(dict(local, _bad=np.zeros((4,), np.int32)), mesh)
  step, _, _ = compile_step(state, frozen, batch)
  losses = []
  for _ in range(2):
    state, metrics = step(state, frozen, batch)
    losses.append(float(metrics["loss"]))
  assert int(state["guard"]["nonfinite_steps"]) == 0 and int(state["step"]) == 2
  assert all(np.isfinite(losses)) and 0 < losses[0] < 2 * np.log(CODES) + 1
  after = jax.device_get(state["params"])
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), before, after))
  assert max(moved) > 0
  # The targets are the tokenizer's ids of the second view, in the objective's order.
  ids = np.asarray(method.targets(method.consts(), {"image2": jnp.asarray(views)}))
  assert ids.shape == (4, 16) and ids.min() >= 0 and ids.max() < CODES


# ----------------------------------------------------------------------------- plug-in contract
def _imported_method_modules(source: str, own: str, method_names: set) -> list[str]:
  """'line: module' for every import of a method module other than `own` in `source`."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # from . import x / from .x import y inside mim_jax/methods
        base = "mim_jax.methods" + (f".{base}" if base else "")
      names = [base] + [f"{base}.{a.name}" for a in node.names]
    else:
      continue
    for name in names:
      parts = name.split(".")
      if parts[:2] == ["mim_jax", "methods"] and len(parts) > 2:
        if parts[2] in method_names and parts[2] != own:
          found.append(f"{node.lineno}: {parts[2]}")
  return found


def test_no_method_imports_another_method():
  directory = os.path.dirname(methods.__file__)
  method_names = {v.split(":")[0].rsplit(".", 1)[1] for v in methods._METHODS.values()}  # pylint: disable=protected-access
  files = sorted(f for f in os.listdir(directory) if f.endswith(".py"))
  assert {f"{m}.py" for m in method_names} <= set(files)
  # The check itself can fail: each spelling of an import of another method is caught.
  for line in (
    "from mim_jax.methods import ccvit",
    "import mim_jax.methods.vqkd as v",
    "from mim_jax.methods.caev2 import x",
    "from . import beitv2",
    "def f():\n  from .mapet import MaPeT",
  ):
    assert _imported_method_modules(line, "peco_mae", method_names), line
  assert not _imported_method_modules("from mim_jax.methods import common", "ccvit", method_names)
  offenders = {}
  for f in files:
    if f == "__init__.py":  # the registry, which loads the methods by name
      continue
    with open(os.path.join(directory, f)) as fh:
      found = _imported_method_modules(fh.read(), f[:-3], method_names)
    if found:
      offenders[f] = found
  assert not offenders, f"method modules imported outside their own file: {offenders}"


def test_every_method_has_a_frozen_fingerprint():
  for name in methods.names():
    module, cls = methods._METHODS[name].split(":")  # pylint: disable=protected-access
    method_cls = getattr(__import__(module, fromlist=[cls]), cls)
    assert callable(getattr(method_cls, "frozen_fingerprint", None)), name


def _stack_blocks(tree):
  """The scanned layout of a params tree: every 'blocks_<i>' group stacked into 'blocks'."""
  if not isinstance(tree, dict):
    return tree
  tree = {k: _stack_blocks(v) for k, v in tree.items()}
  return convert.stack_layers(tree) if "blocks_0" in tree else tree


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_scan_layers_and_remat_are_honoured(tokenizers, objective):
  """The same weights in the scanned layout, with remat, give the same loss."""
  module, over = OBJECTIVES[objective]
  c = config_lib.load_config(module, "runlocal")
  path, _ = tokenizers["centroids"]
  c.data.image_size = c.data.second_image_size = SIZE
  c.model.variant, c.model.width, c.model.depth, c.model.heads = "T/4", 32, 2, 2
  c.tokenizer.update(kind="centroids", path=path, build_if_missing=False)
  for k, v in over.items():
    _set(c, k, v)
  method = methods.build(c)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
  examples = [
    method.prepare({"image": images[i], "image2": images[i]}, np.random.default_rng(i))
    for i in range(2)
  ]
  batch = {k: jnp.asarray(np.stack([e[k] for e in examples])) for k in examples[0]}
  params = nn.unbox(method.init(jax.random.PRNGKey(0), batch))["params"]
  ref = method.loss(params, {}, method.consts(), batch, None, train=False)[0]
  c.model.scan_layers = c.model.remat = True
  scanned = methods.build(c)
  stacked = _stack_blocks(params)
  shapes = nn.unbox(jax.eval_shape(scanned.init, jax.random.PRNGKey(0), batch))["params"]
  assert jax.tree.structure(shapes) == jax.tree.structure(stacked)
  got = scanned.loss(stacked, {}, scanned.consts(), batch, None, train=False)[0]
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)


def _caev2_config(teacher_path="", random_init=""):
  c = config_lib.load_config("caev2_vitb", "runlocal")
  c.data.image_size = c.data.second_image_size = SIZE
  c.model.variant, c.model.width, c.model.depth, c.model.heads = "T/4", 32, 1, 2
  c.method.update(num_masked=6, min_block=2, regressor_dim=32, regressor_heads=2, regressor_depth=1)
  c.teacher.update(path=teacher_path, random_init=random_init)
  return c


def _random_clip_spec(seed):
  return f"random:ViT-B/16,width=32,layers=1,patch_size={PATCH},image_size={SIZE},seed={seed}"


def test_frozen_fingerprint_follows_the_teacher_file(tmp_path):
  path = str(tmp_path / "clip.npz")

  def write_teacher(seed):
    teacher = clip.CLIPTeacher(_random_clip_spec(seed))
    clip_convert.save_params(path, teacher.arch, jax.device_get(teacher.params))

  write_teacher(0)
  first = methods.build(_caev2_config(teacher_path=path)).frozen_fingerprint()
  assert set(first) == {"teacher.path"}
  assert first["teacher.path"].startswith(os.path.abspath(path) + " sha256:")
  assert methods.build(_caev2_config(teacher_path=path)).frozen_fingerprint() == first
  write_teacher(1)  # same file name, other weights
  assert methods.build(_caev2_config(teacher_path=path)).frozen_fingerprint() != first
  # A random stand-in teacher is fingerprinted by the config values that build it.
  rand = methods.build(_caev2_config(random_init=_random_clip_spec(0))).frozen_fingerprint()
  assert set(rand) == {"teacher.random_init"} and "seed=0" in rand["teacher.random_init"]
  assert methods.build(_caev2_config(random_init=_random_clip_spec(0))).frozen_fingerprint() == rand
  assert methods.build(_caev2_config(random_init=_random_clip_spec(1))).frozen_fingerprint() != rand


def test_frozen_fingerprint_follows_the_tokenizer_files(tmp_path):
  def build():
    module, over = OBJECTIVES["beitv2"]
    c = config_lib.load_config(module, "runlocal")
    c.data.image_size = c.data.second_image_size = SIZE
    c.model.variant, c.model.width, c.model.depth, c.model.heads = "T/4", 32, 2, 2
    c.tokenizer.update(kind="centroids", path=path, build_if_missing=False)
    for k, v in over.items():
      _set(c, k, v)
    return methods.build(c).frozen_fingerprint()

  path = _centroids(tmp_path, seed=3)
  first = build()
  assert first["tokenizer.kind"] == "centroids"
  assert first["tokenizer.path"].startswith(os.path.abspath(path) + " sha256:")
  assert build() == first
  _centroids(tmp_path, seed=4)  # same prefix, other centroids
  assert build() != first


def test_file_fingerprint_hashes_content_names_and_layout(tmp_path):
  d = tmp_path / "workdir"
  (d / "sub").mkdir(parents=True)
  (d / "a.bin").write_bytes(b"x" * (3 << 20))  # several 1 MiB chunks
  (d / "sub" / "b.json").write_text("{}")
  fp = common.file_fingerprint(str(d))
  assert fp.startswith(f"{d} sha256:") and common.file_fingerprint(str(d)) == fp
  os.utime(d / "a.bin", (0, 0))  # times do not count
  assert common.file_fingerprint(str(d)) == fp
  (d / "a.bin").write_bytes(b"x" * ((3 << 20) - 1) + b"y")  # one byte differs
  changed = common.file_fingerprint(str(d))
  assert changed != fp
  (d / "sub" / "b.json").rename(d / "sub" / "c.json")
  assert common.file_fingerprint(str(d)) not in (fp, changed)
  one = common.file_fingerprint(str(d / "a.bin"))
  assert one.endswith("sha256:" + hashlib.sha256((d / "a.bin").read_bytes()).hexdigest())
  with pytest.raises(FileNotFoundError, match="missing"):
    common.file_fingerprint(str(tmp_path / "missing"))
