"""Pieces several methods share. A neutral module: it is not a method, it imports no method
module, and every method imports only neutral modules (this one, `token_targets`), never
another method (tests/test_mix_and_match.py checks it).

  backbone_kwargs, patch_grid        the student ViT of config.model, its patch grid
  transformer_blocks                 vit.Block layers honouring model.scan_layers / remat
  aggregation_blocks                 BEiT v2's cls-pt blocks (CCViT's pixel block)
  selected_positions,                index helpers over boolean (B, N) masks
  visible_and_masked
  xavier_dense                       a Linear layer with CAE / MAE's xavier init
  build_clip_teacher,                the frozen CLIP teacher of VQ-KD and CAE v2 and its loss
  cosine_rec_loss
  build_codebook_from_source         pixel centroids of small training data (`:runlocal`)
  file_fingerprint,                  fingerprints of frozen inputs (`frozen_fingerprint()`)
  codebook_fingerprint,
  array_fingerprint,
  clip_teacher_fingerprint
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import quantizers
from mim_jax import reductions
from mim_jax.models import vit
from mim_jax.teachers import clip
from mim_jax.tokenizers import build_centroids
from mim_jax.tokenizers import centroids as centroid_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_CHUNK = 1 << 20  # bytes read at a time when hashing frozen inputs


# ------------------------------------------------------------------------------ backbone
def backbone_kwargs(model_cfg, dtype: str = "float32") -> dict:
  """VisionTransformer kwargs from config.model (variant + optional width/depth/heads)."""
  kw = vit.vit_kwargs(model_cfg.variant)
  for field, key in (("width", "embed_dim"), ("depth", "depth"), ("heads", "num_heads")):
    if model_cfg.get(field, 0):
      kw[key] = int(model_cfg[field])
  kw.update(
    layer_scale_init=model_cfg.layer_scale_init,
    drop_path_rate=model_cfg.drop_path_rate,
    scan_layers=model_cfg.scan_layers,
    remat=model_cfg.remat,
    dtype=DTYPES[dtype],
  )
  return kw


def patch_grid(config) -> tuple[int, tuple[int, int]]:
  """(patch size, patch grid) of the student, with the image size checked against it."""
  patch = vit.vit_kwargs(config.model.variant)["patch_size"]
  size = config.data.image_size
  if size % patch:
    raise ValueError(
      f"config.data.image_size={size} is not a multiple of the "
      f"patch size {patch} (config.model.variant)"
    )
  return patch, (size // patch, size // patch)


def transformer_blocks(
  x,
  *,
  depth: int,
  block_kw: dict,
  drop_path_rate: float,
  scan: bool,
  remat: bool,
  train: bool,
  attn_mask=None,
  rel_pos_bias=None,
  name: str = "blocks",
):
  """`depth` vit.Block layers without the depth rescale, drop path linspace(0, rate, depth),
  laid out as vit.VisionTransformer lays out its blocks: unrolled in scopes '{name}_{i}', or
  with `scan` one scope '{name}' whose params carry a leading 'layers' axis
  (convert.stack_layers / unstack_layers map one layout to the other); `remat` recomputes
  each block's activations in the backward pass. Call inside a compact method: the blocks
  join its scope."""
  rates = vit.drop_path_rates(drop_path_rate, depth)
  layer_step = vit._LayerStep  # pylint: disable=protected-access
  if scan:
    step = nn.remat(layer_step, prevent_cse=False) if remat else layer_step
    scanned = nn.scan(
      step,
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(0, nn.broadcast, nn.broadcast),
      length=depth,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )
    layer_args = (jnp.arange(1, depth + 1, dtype=jnp.float32), jnp.asarray(rates, jnp.float32))
    x, _ = scanned(
      **block_kw, train=train, depth_rescale=False, use_drop_path=drop_path_rate > 0, name=name
    )(x, layer_args, rel_pos_bias, attn_mask)
    return x
  for i in range(depth):
    if remat:
      step = nn.remat(layer_step, prevent_cse=True)(
        **block_kw, train=train, depth_rescale=False, use_drop_path=rates[i] > 0, name=f"{name}_{i}"
      )
      x, _ = step(x, (None, rates[i]), rel_pos_bias, attn_mask)
    else:
      x = vit.Block(**block_kw, drop_path=rates[i], name=f"{name}_{i}")(
        x, rel_pos_bias, attn_mask, train=train
      )
      x = nn.with_logical_constraint(x, vit.ACT_AXES)
  return x


def aggregation_blocks(
  x,
  kw: dict,
  rel_pos_bias,
  *,
  early_layers: int,
  head_layers: int,
  prefix: str,
  train: bool,
  outputs_at=None,
):
  """BEiT v2's cls-pt blocks (CCViT's pixel block): `head_layers` blocks after layer
  `early_layers`, drop path rates continuing the backbone's, PyTorch-default init with the
  depth rescale only (the cls-pt layers are built after `self.apply(self._init_weights)` in
  microsoft/unilm:beit2/modeling_pretrain.py and only get `fix_init_weight`'s rescale). Call
  inside a compact method: the blocks join its scope. outputs_at: optional (B, R) token
  indices, the only outputs the caller reads: the last block computes those alone (B, R, D)."""
  dpr = np.linspace(
    0.0, kw.get("drop_path_rate", 0.0), max(kw["depth"], early_layers + head_layers)
  )
  for i in range(head_layers):
    x = vit.Block(
      dim=kw["embed_dim"],
      num_heads=kw["num_heads"],
      layer_scale_init=kw.get("layer_scale_init", 0.1),
      drop_path=float(dpr[early_layers + i]),
      weight_init="torch_default",
      depth_rescale_layer_id=early_layers + i + 1,
      dtype=kw.get("dtype", jnp.float32),
      name=f"{prefix}_{i}",
    )(
      x,
      rel_pos_bias=rel_pos_bias,
      train=train,
      outputs_at=outputs_at if i == head_layers - 1 else None,
    )
  if outputs_at is not None and not head_layers:
    x = jnp.take_along_axis(x, outputs_at[..., None], axis=1)
  return x


def xavier_dense(features: int, names: tuple, name: str, dtype, use_bias: bool = True):
  """Linear with xavier_uniform weights and zero bias (CAE's and MAE's `_init_weights`)."""
  return vit.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    name=name,
    kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), names),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]),
  )


# ------------------------------------------------------------------------------ indices
def selected_positions(select_mask: jax.Array, count: int) -> jax.Array:
  """Indices (B, count) of the True entries of a (B, N) mask with exactly `count` Trues."""
  order = jnp.argsort(jnp.logical_not(select_mask), axis=1, stable=True)
  return order[:, :count]


def visible_and_masked(mask: jax.Array, num_masked: int) -> tuple[jax.Array, jax.Array]:
  """(visible (B, N - M), masked (B, M)) patch indices, each in raster order."""
  order = jnp.argsort(jnp.logical_not(mask), axis=1, stable=True)  # masked first, raster
  return jnp.sort(order[:, num_masked:], axis=1), order[:, :num_masked]


# ------------------------------------------------------------------------------ token losses
def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Cross-entropy per position of integer targets, (..., K) -> (...), equal in value to
  optax.softmax_cross_entropy_with_integer_labels (logsumexp minus the target's logit).

  The target's logit is picked by a one-hot product rather than a gather, so the gradient
  reaching the LM head is one dense fused softmax - one_hot instead of a scatter into the
  (positions, K) gradient (BENCHMARKS.md §11). Computed in fp32 whatever the logits' dtype.
  """
  logits = logits.astype(jnp.float32)
  one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)
  return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(logits * one_hot, axis=-1)


def token_accuracy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Fraction of positions whose highest logit is the target."""
  return jnp.mean(reductions.argmax(logits) == targets)


# ------------------------------------------------------------------------------ teachers
MISSING_CLIP_TEACHER = (
  "config.teacher.path is empty: the teacher is the OpenAI CLIP ViT-B/16 vision tower. "
  "Download ViT-B-16.pt (the URL is in openai/CLIP:clip/clip.py, _MODELS['ViT-B/16']), "
  "convert it once with `python -m mim_jax.teachers.clip --checkpoint=ViT-B-16.pt "
  "--out=clip_vitb16.npz` and pass --config.teacher.path=clip_vitb16.npz (the .pt works "
  "too, with torch installed); for smoke runs set config.teacher.random_init, e.g. "
  "'random:ViT-B/16,width=64,layers=2,patch_size=4,image_size=32'"
)


def build_clip_teacher(config) -> clip.CLIPTeacher:
  """The frozen CLIP ViT teacher of config.teacher (path, else random_init)."""
  t = config.teacher
  if t.get("kind", "clip") != "clip":
    raise ValueError(f"config.teacher.kind must be 'clip', got {t.kind!r}")
  if t.path:
    if not os.path.exists(t.path):
      raise FileNotFoundError(
        f"config.teacher.path: {t.path} does not exist. " + MISSING_CLIP_TEACHER.split(": ", 1)[1]
      )
    spec = t.path
  else:
    spec = t.get("random_init", "")
    if not spec:
      raise ValueError(MISSING_CLIP_TEACHER)
    if not spec.startswith("random:"):
      raise ValueError(
        f"config.teacher.random_init must look like 'random:ViT-B/16,...', got {spec!r}"
      )
  teacher = clip.CLIPTeacher(spec, dtype=DTYPES[config.dtype])
  if teacher.kind != "vit":
    raise ValueError(
      f"config.teacher ({spec}): the targets are CLIP ViT patch tokens; got a {teacher.kind} tower"
    )
  return teacher


def cosine_rec_loss(rec: jax.Array, target: jax.Array) -> jax.Array:
  """Mean over tokens of 1 - cos(rec, target), fp32 (`calculate_rec_loss` in
  microsoft/unilm:beit2/modeling_vqkd.py; CAE v2's cosine embedding loss with target 1)."""
  rec = quantizers.l2norm(rec.astype(jnp.float32))
  target = quantizers.l2norm(target.astype(jnp.float32))
  return jnp.mean(1.0 - jnp.sum(rec * target, axis=-1))


# ------------------------------------------------------------------------------ codebooks
def build_codebook_from_source(
  source, *, k, images_per_class, iters, patch_size, image_size, seed
) -> centroid_lib.CentroidTokenizer:
  """The codebook command's k-means over up to `images_per_class` centre crops per label of
  `source` (the training data), for small data sets that ship without a codebook."""
  t0 = time.time()
  order = np.random.default_rng(seed).permutation(len(source))
  per_class, picked = {}, []
  for i in order:
    ex = source[int(i)]
    label = int(ex.get("label", 0))
    if per_class.get(label, 0) >= images_per_class:
      continue
    per_class[label] = per_class.get(label, 0) + 1
    picked.append(build_centroids.resize_center_crop(ex["image"], image_size))
  images = np.stack(picked)
  k_eff = min(k, len(images) * (image_size // patch_size) ** 2)
  tok = build_centroids.fit_codebook(
    images,
    k=k_eff,
    iters=iters,
    patch_size=patch_size,
    seed=seed,
    images_per_class=images_per_class,
    description=repr(source),
    log=logging.info,
  )
  logging.info(
    "built a %d-centroid codebook from %d images in %.1fs", k_eff, len(images), time.time() - t0
  )
  return tok


# ------------------------------------------------------------------------------ fingerprints
# `frozen_fingerprint()` of a method maps each config field naming a frozen input (a teacher,
# a tokenizer, a token cache, a codebook built into the workdir) to one of these strings. The
# runner records them in the workdir instead of checkpointing the frozen tensors, and refuses
# a resume whose strings differ, naming the field.
def _hash_file(path: str, digest) -> None:
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)


def file_fingerprint(path: str, *, suffixes: Sequence[str] = ()) -> str:
  """f"{abspath} sha256:{hex}" of what `path` names.

  A file: the sha256 of its bytes (what `sha256sum` prints). A directory: the sha256 of the
  manifest "relative path NUL sha256 of the file NL" of every file below it in sorted order,
  so content, names and layout all count. A prefix (`path` itself absent, e.g. the centroid
  tokenizer's <path>.npy + <path>.json): the manifest of path + each of `suffixes` that
  exists. Files are streamed in 1 MiB chunks."""
  path = os.fspath(path)
  shown = os.path.abspath(path)
  if os.path.isfile(path):
    digest = hashlib.sha256()
    _hash_file(path, digest)
    return f"{shown} sha256:{digest.hexdigest()}"
  if os.path.isdir(path):
    files = []
    for root, dirs, names in os.walk(path):
      dirs.sort()
      files += [os.path.join(root, n) for n in names]
    members = sorted((os.path.relpath(f, path), f) for f in files)
  else:
    members = [(os.path.basename(path + s), path + s) for s in suffixes if os.path.isfile(path + s)]
    if not members:
      raise FileNotFoundError(f"{path}: no such file or directory to fingerprint")
  manifest = hashlib.sha256()
  for rel, full in members:
    digest = hashlib.sha256()
    _hash_file(full, digest)
    manifest.update(f"{rel}\0{digest.hexdigest()}\n".encode())
  return f"{shown} sha256:{manifest.hexdigest()}"


def codebook_fingerprint(path: str) -> str:
  """`file_fingerprint` of a centroid codebook <path>.npy + <path>.json (`path` may carry
  either suffix, as `centroids.CentroidTokenizer.load` accepts)."""
  for suffix in (".npy", ".json"):
    if path.endswith(suffix):
      path = path[: -len(suffix)]
  return file_fingerprint(path, suffixes=(".npy", ".json"))


def array_fingerprint(array) -> str:
  """'sha256:{hex}' of an array's dtype, shape and bytes (a codebook built in memory)."""
  a = np.ascontiguousarray(np.asarray(array))
  digest = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
  digest.update(a.tobytes())
  return f"sha256:{digest.hexdigest()}"


def random_teacher_fingerprint(spec: str, arch: dict, seed: int, **built_with) -> str:
  """The config values a random-weight stand-in teacher is built from."""
  extra = "".join(f", {k}={v}" for k, v in sorted(built_with.items()))
  return (
    f"random(spec={spec!r}, seed={seed}, "
    f"arch={json.dumps(dict(arch), sort_keys=True, default=str)}{extra})"
  )


def clip_teacher_fingerprint(config, teacher: clip.CLIPTeacher) -> dict[str, str]:
  """{'teacher.path': file fingerprint} or, for a random teacher, {'teacher.random_init':
  the spec, seed and architecture it is built from}."""
  if config.teacher.path:
    return {"teacher.path": file_fingerprint(config.teacher.path)}
  _, seed = clip.parse_random_spec(teacher.spec)
  return {"teacher.random_init": random_teacher_fingerprint(teacher.spec, teacher.arch, seed)}
