r"""PeCo's perceptual teacher: a frozen self-supervised timm-style ViT (MoCo v3 / DINO).

The PeCo code is not public (docs/reference_details.md#peco), so this follows the paper:
  * "we use the pre-trained 100 epochs ViT-B model from self-supervised method MoCo v3 ...
    and the 3rd, 6th, 9th, and 12nd layer are selected for deep features";
  * Eq. 4: L_percep = sum_{l in S} 1 / (C_l H_l W_l) ||f_l(x) - f_l(x_hat)||^2 with f_l "the
    normalized activations of the l-th layer".
Our reading, stated because the paper leaves it open:
  * "layer l" = the output of transformer block l (1-based, the residual stream before the
    final LayerNorm), patch tokens only (an H_l x W_l map; the cls token is dropped);
  * "normalized" = LPIPS' channel-wise unit normalisation (Zhang et al. 2018, which the
    paper cites as the inspiration): f / (||f||_2 over channels + 1e-10) per token;
  * the 1 / (C_l H_l W_l) factor makes each layer's term a mean over tokens and channels;
    the layer terms are summed. (`channel_reduction='sum'` gives LPIPS' sum over channels
    instead, C_l times larger, for experiments; not the default.)
The teacher sees images in [0, 1] and applies the ImageNet mean/std itself (MoCo v3 and
DINO were trained with it).

Architecture: timm `VisionTransformer` (cls token, learned absolute positions, one qkv
Linear with a full bias, no layer scale, LayerNorm eps 1e-6, exact GELU) =
`vit.VisionTransformer(k_bias=True, layer_scale_init=None, rel_pos='none',
abs_pos='learned', weight_init='timm')`. Checkpoints (torch is imported lazily):
  * `convert_timm_vit(sd)`: a timm-layout state dict -> (arch, params);
  * `load_moco_v3(path)`: MoCo v3 `torch.save({'state_dict': ...})`, keys
    `module.base_encoder.*` (momentum encoder, predictor and projection head dropped;
    MoCo v3 ViT-S has 12 heads, MoCo v3 vits.py);
  * `load_dino(path)`: a plain timm-layout state dict (dino_vitbase16_pretrain.pth) or a
    full training checkpoint ({'teacher', 'student', ...}, prefixes `module.`/`backbone.`);
  * position embeddings of another grid are resized like timm's `resample_abs_pos_embed`
    (bicubic, antialias, cls entry kept).

  python -m mim_jax.teachers.perceptual --checkpoint=/ckpt/vit-b-300ep.pth.tar \
      --out=/ckpt/mocov3_vitb16.npz          # optional: later runs need no torch
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import torch_io
from mim_jax.data import transforms
from mim_jax.models import convert
from mim_jax.models import vit

DEFAULT_LAYERS = (3, 6, 9, 12)
# LPIPS `normalize_tensor`: x / (sqrt(sum x^2 over channels) + eps).
UNIT_NORM_EPS = 1e-10
# Checkpoint keys that are not part of the backbone: classifier / projection heads.
_DROPPED_PREFIXES = ("head.", "head_dist.", "fc_norm.", "pre_logits.")


class PerceptualViT(vit.VisionTransformer):
  """A timm-layout ViT whose `features` are the unit-normalised patch tokens of blocks
  `feature_layers` (1-based). Its params are exactly `vit.VisionTransformer`'s."""

  k_bias: bool = True
  layer_scale_init: Any = None
  rel_pos: str = "none"
  abs_pos: str = "learned"
  weight_init: str = "timm"
  depth_rescale: bool = False  # timm has no BEiT depth rescale (only random init sees it)
  feature_layers: Sequence[int] = DEFAULT_LAYERS

  def features(self, images01: jax.Array, *, normalize: bool = True) -> list[jax.Array]:
    """images01: (B, H, W, 3) in [0, 1]. Returns [(B, N, C) fp32] per feature layer."""
    mean = jnp.asarray(transforms.IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(transforms.IMAGENET_STD, jnp.float32)
    x = (images01.astype(jnp.float32) - mean) / std
    out = self(x.astype(self.dtype), return_layers=tuple(self.feature_layers))
    feats = [out["layers"][l][:, 1:].astype(jnp.float32) for l in self.feature_layers]
    return [unit_normalize(f) for f in feats] if normalize else feats


def unit_normalize(f: jax.Array, eps: float = UNIT_NORM_EPS) -> jax.Array:
  """LPIPS channel-wise unit normalisation (last axis = channels)."""
  return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + eps)


def perceptual_loss(
  feats_a: Sequence[jax.Array], feats_b: Sequence[jax.Array], *, channel_reduction: str = "mean"
) -> jax.Array:
  """PeCo Eq. 4: sum over layers of the mean (over batch, tokens and channels) squared
  difference of (already normalised) features. 'sum' sums over channels (LPIPS)."""
  if len(feats_a) != len(feats_b) or not feats_a:
    raise ValueError(f"perceptual_loss: {len(feats_a)} vs {len(feats_b)} feature layers")
  if channel_reduction not in ("mean", "sum"):
    raise ValueError(f"channel_reduction must be 'mean' or 'sum', got {channel_reduction!r}")
  total = jnp.zeros((), jnp.float32)
  for a, b in zip(feats_a, feats_b):
    sq = jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32))
    per_token = jnp.mean(sq, -1) if channel_reduction == "mean" else jnp.sum(sq, -1)
    total = total + jnp.mean(per_token)
  return total


# ----------------------------------------------------------------------------- arch
def arch_dict(
  *,
  embed_dim: int,
  depth: int,
  num_heads: int,
  patch_size: int,
  mlp_ratio: float = 4.0,
  image_size: int = 224,
) -> dict:
  return dict(
    embed_dim=int(embed_dim),
    depth=int(depth),
    num_heads=int(num_heads),
    patch_size=int(patch_size),
    mlp_ratio=float(mlp_ratio),
    image_size=int(image_size),
  )


def build_model(
  arch: Mapping[str, Any], layers: Sequence[int] = DEFAULT_LAYERS, dtype: Any = jnp.float32
) -> PerceptualViT:
  layers = tuple(int(l) for l in layers)
  bad = [l for l in layers if not 1 <= l <= arch["depth"]]
  if bad or not layers:
    raise ValueError(
      f"perceptual layers {layers} must be 1-based block ids in [1, depth={arch['depth']}]"
    )
  return PerceptualViT(
    patch_size=arch["patch_size"],
    embed_dim=arch["embed_dim"],
    depth=arch["depth"],
    num_heads=arch["num_heads"],
    mlp_ratio=arch["mlp_ratio"],
    feature_layers=layers,
    dtype=dtype,
  )


def abstract_params(arch: Mapping[str, Any]) -> Any:
  """ShapeDtypeStructs of the params of `arch` (no allocation)."""
  model = build_model(arch, (arch["depth"],))
  size = arch["image_size"]
  shapes = jax.eval_shape(
    model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  )
  return nn.unbox(shapes)["params"]


# ----------------------------------------------------------------------------- conversion
def _numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # torch: fp16/bf16 -> fp32 first (numpy has no bf16)
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, np.float32)


def resample_pos_embed(pos_embed: np.ndarray, new_grid: tuple[int, int]) -> np.ndarray:
  """(1, 1 + h*w, D) -> (1, 1 + H*W, D) like timm `resample_abs_pos_embed` (bicubic,
  antialias, align_corners=False, cls entry unchanged). Needs torch."""
  n = pos_embed.shape[1] - 1
  side = int(round(math.sqrt(n)))
  if side * side != n:
    raise ValueError(f"pos_embed has {n} patch entries: not a square grid")
  if (side, side) == tuple(new_grid):
    return pos_embed
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  grid = torch.from_numpy(np.ascontiguousarray(pos_embed[:, 1:]))
  grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
  grid = F.interpolate(
    grid, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=True
  )
  grid = grid.permute(0, 2, 3, 1).reshape(1, -1, pos_embed.shape[-1]).numpy()
  return np.concatenate([pos_embed[:, :1], grid], axis=1).astype(np.float32)


def convert_timm_vit(
  state_dict: Mapping[str, Any],
  *,
  image_size: int | None = None,
  num_heads: int | None = None,
  source: str = "state dict",
) -> tuple[dict, dict]:
  """timm ViT keys -> (arch, params of `PerceptualViT` / `vit.VisionTransformer`).

  `blocks.i.attn.qkv.bias` (3D) becomes q_bias / k_bias / v_bias; heads (`head.*`,
  `fc_norm.*`) are dropped; any other unknown key is an error (e.g. layer scale or
  register tokens: a different architecture). num_heads is not stored in a state dict:
  default embed_dim // 64 (timm's ViT-S/B/L). image_size: resample pos_embed to its grid
  (default: the checkpoint's own grid). `source` names the file in error messages.
  """
  sd = {k: v for k, v in state_dict.items() if not k.startswith(_DROPPED_PREFIXES)}
  for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
    if key not in sd:
      raise ValueError(
        f"{source}: no {key!r}: not a timm-layout ViT (keys start with {sorted(state_dict)[:5]})"
      )
  embed_dim = int(np.shape(sd["cls_token"])[-1])
  patch = int(np.shape(sd["patch_embed.proj.weight"])[-1])
  depth = 1 + max(
    (int(m.group(1)) for m in map(re.compile(r"^blocks\.(\d+)\.").match, sd) if m), default=-1
  )
  if depth == 0:
    raise ValueError(f"{source}: no blocks.<i>.* keys")
  hidden = int(np.shape(sd.get("blocks.0.mlp.fc1.weight", np.zeros((4 * embed_dim, 1))))[0])
  heads = int(num_heads or max(1, embed_dim // 64))
  grid_side = int(round(math.sqrt(np.shape(sd["pos_embed"])[1] - 1)))
  size = int(image_size or grid_side * patch)
  if size % patch:
    raise ValueError(f"image_size={size} is not a multiple of the patch size {patch}")
  arch = arch_dict(
    embed_dim=embed_dim,
    depth=depth,
    num_heads=heads,
    patch_size=patch,
    mlp_ratio=hidden / embed_dim,
    image_size=size,
  )

  # Full qkv bias -> the q_bias/v_bias names beit_from_torch knows; k_bias handled here
  # (beit_from_torch drops '*k_bias' as a derived BEiT buffer).
  torch_like, k_biases = {}, {}
  for key, value in sd.items():
    m = re.match(r"^blocks\.(\d+)\.attn\.qkv\.bias$", key)
    if m:
      b = _numpy(value)
      torch_like[f"blocks.{m.group(1)}.attn.q_bias"] = b[:embed_dim]
      k_biases[int(m.group(1))] = b[embed_dim : 2 * embed_dim]
      torch_like[f"blocks.{m.group(1)}.attn.v_bias"] = b[2 * embed_dim :]
    else:
      torch_like[key] = _numpy(value)
  params, unused = convert.beit_from_torch(torch_like, depth=depth, return_unused=True)
  if unused:
    raise ValueError(
      f"{source}: keys with no place in a timm ViT (another architecture?): "
      f"{unused[:10]}{' ...' if len(unused) > 10 else ''}"
    )
  for i in range(depth):  # a ViT trained without qkv bias == zero biases
    attn = params[f"blocks_{i}"].setdefault("attn", {})
    attn["k_bias"] = k_biases.get(i, np.zeros((embed_dim,), np.float32))
    for name in ("q_bias", "v_bias"):
      attn.setdefault(name, np.zeros((embed_dim,), np.float32))
  params["pos_embed"] = resample_pos_embed(params["pos_embed"], (size // patch,) * 2)
  _check_against_model(params, arch, source)
  return arch, params


def _check_against_model(params: dict, arch: dict, source: str) -> None:
  """Every parameter the model needs is present with its shape, and nothing else."""
  want = {
    jax.tree_util.keystr(p): v.shape
    for p, v in jax.tree_util.tree_flatten_with_path(abstract_params(arch))[0]
  }
  have = {
    jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  missing = sorted(set(want) - set(have))
  if missing:
    raise ValueError(
      f"{source}: missing weights for {missing[:8]}"
      f"{' ...' if len(missing) > 8 else ''} (timm keys blocks.<i>.norm1/attn.qkv/"
      "attn.proj/norm2/mlp.fc1/mlp.fc2, norm.*)"
    )
  extra = sorted(set(have) - set(want))
  wrong = sorted(k for k in set(want) & set(have) if tuple(want[k]) != tuple(have[k]))
  if extra or wrong:
    raise ValueError(
      f"{source}: weights do not fit the inferred ViT {arch}: unexpected "
      f"{extra[:5]} (layer scale? not a plain timm ViT), wrong shapes "
      f"{[(k, have[k], want[k]) for k in wrong[:5]]}"
    )


def _torch_load(path: str) -> Any:
  return torch_io.load_file(
    path,
    what="perceptual teacher checkpoint",
    convert_hint="convert it once elsewhere: python -m mim_jax.teachers.perceptual "
    "--checkpoint=... --out=....npz",
  )


def _strip(sd: Mapping[str, Any], prefixes: Sequence[str]) -> dict:
  """Removes any of `prefixes` from the front of each key, repeatedly."""
  out = {}
  for key, value in sd.items():
    changed = True
    while changed:
      changed = False
      for p in prefixes:
        if key.startswith(p):
          key, changed = key[len(p) :], True
    out[key] = value
  return out


def moco_v3_state_dict(ckpt: Mapping[str, Any], source: str = "checkpoint") -> dict:
  """The base encoder of a MoCo v3 checkpoint, timm keys (momentum encoder, predictor and
  projection head dropped)."""
  sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
  if not isinstance(sd, Mapping):
    raise ValueError(f"{source}: expected a dict with 'state_dict' (MoCo v3 main_moco.py)")
  for prefix in ("module.base_encoder.", "base_encoder."):
    enc = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if enc:
      return enc
  raise ValueError(
    f"{source}: no 'module.base_encoder.*' keys, so not a MoCo v3 "
    f"checkpoint (first keys: {sorted(sd)[:5]})"
  )


def dino_state_dict(
  ckpt: Mapping[str, Any], which: str = "teacher", source: str = "checkpoint"
) -> dict:
  """The backbone of a DINO checkpoint, timm keys: a plain state dict or a full training
  checkpoint's `which` ('teacher', as DINO's own evaluation, or 'student')."""
  if not isinstance(ckpt, Mapping):
    raise ValueError(f"{source}: expected a state dict")
  if "teacher" in ckpt or "student" in ckpt:
    if which not in ckpt:
      raise ValueError(f"{source}: no {which!r} entry (has {sorted(ckpt)})")
    ckpt = ckpt[which]
  elif "state_dict" in ckpt or "model" in ckpt:
    ckpt = ckpt.get("state_dict", ckpt.get("model"))
  sd = _strip(ckpt, ("module.", "backbone."))
  return {k: v for k, v in sd.items() if not k.startswith("head.")}


def load_moco_v3(
  path: str, *, image_size: int | None = None, num_heads: int | None = None
) -> tuple[dict, dict]:
  """(arch, params) of a MoCo v3 ViT checkpoint (e.g. vit-b-300ep.pth.tar)."""
  sd = moco_v3_state_dict(_torch_load(path), source=path)
  if num_heads is None and int(np.shape(sd.get("cls_token", np.zeros(1)))[-1]) == 384:
    num_heads = 12  # MoCo v3's vit_small uses 12 heads (vits.py), not timm's 6
  return convert_timm_vit(sd, image_size=image_size, num_heads=num_heads, source=path)


def load_dino(
  path: str, *, which: str = "teacher", image_size: int | None = None, num_heads: int | None = None
) -> tuple[dict, dict]:
  """(arch, params) of a DINO ViT checkpoint (plain or full training checkpoint)."""
  sd = dino_state_dict(_torch_load(path), which, source=path)
  return convert_timm_vit(sd, image_size=image_size, num_heads=num_heads, source=path)


def load_checkpoint(
  path: str, *, image_size: int | None = None, num_heads: int | None = None
) -> tuple[dict, dict]:
  """Any of: a converted .npz, a MoCo v3 checkpoint, a DINO (or plain timm) one."""
  if path.endswith(".npz"):
    return load_npz(path, image_size=image_size)
  ckpt = _torch_load(path)
  sd = ckpt.get("state_dict") if isinstance(ckpt, Mapping) else None
  if isinstance(sd, Mapping) and any("base_encoder." in k for k in sd):
    sd = moco_v3_state_dict(ckpt, source=path)
    if num_heads is None and int(np.shape(sd["cls_token"])[-1]) == 384:
      num_heads = 12
  else:
    sd = dino_state_dict(ckpt, source=path)
  return convert_timm_vit(sd, image_size=image_size, num_heads=num_heads, source=path)


# ----------------------------------------------------------------------------- npz
def save_npz(path: str, arch: dict, params: Any) -> None:
  flat = {
    jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(v)
    for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  tmp = path + ".tmp.npz"
  np.savez(tmp, __arch__=np.asarray(json.dumps(arch)), **flat)
  os.replace(tmp, path)


def load_npz(path: str, *, image_size: int | None = None) -> tuple[dict, dict]:
  with np.load(path, allow_pickle=False) as z:
    if "__arch__" not in z:
      raise ValueError(
        f"{path}: not a converted perceptual teacher (no __arch__); make one "
        "with python -m mim_jax.teachers.perceptual --checkpoint=... --out=..."
      )
    arch = json.loads(str(z["__arch__"]))
    params: dict = {}
    for key in z.files:
      if key != "__arch__":
        node = params
        *parents, leaf = key.split("/")
        for name in parents:
          node = node.setdefault(name, {})
        node[leaf] = z[key]
  if image_size and image_size != arch["image_size"]:
    params["pos_embed"] = resample_pos_embed(
      params["pos_embed"], (image_size // arch["patch_size"],) * 2
    )
    arch = dict(arch, image_size=int(image_size))
  _check_against_model(params, arch, path)
  return arch, params


# ----------------------------------------------------------------------------- teacher
def parse_random_spec(spec: str, image_size: int | None) -> tuple[dict, int]:
  """'random:B/16' or 'random:T/4,width=64,depth=4,heads=4,seed=0' -> (arch, seed)."""
  body = spec[len("random:") :]
  variant, *opts = [s for s in body.split(",") if s]
  kw = vit.vit_kwargs(variant or "B/16")
  seed = 0
  for opt in opts:
    key, _, value = opt.partition("=")
    if key in ("width", "depth", "heads", "seed") and value.isdigit():
      kw[{"width": "embed_dim", "depth": "depth", "heads": "num_heads", "seed": "seed"}[key]] = int(
        value
      )
    else:
      raise ValueError(
        f"perceptual teacher {spec!r}: unknown option {opt!r} (width=, depth=, heads=, seed=)"
      )
  seed = kw.pop("seed", seed)
  size = int(image_size or 224)
  return arch_dict(
    embed_dim=kw["embed_dim"],
    depth=kw["depth"],
    num_heads=kw["num_heads"],
    patch_size=kw["patch_size"],
    image_size=size,
  ), seed


class PerceptualTeacher:
  """A frozen perceptual ViT and its params, from a checkpoint or `random:<variant>`.

  spec: 'random:<variant>[,width=..,depth=..,heads=..,seed=..]' (random init, smoke runs
  only), a converted .npz, a MoCo v3 checkpoint, or a DINO / plain timm checkpoint
  (detected from the keys). `features_fn()` / `loss_fn()` are pure functions of
  (params, images in [0, 1]) for use inside jit with `params` passed as a const.
  """

  def __init__(
    self,
    spec: str,
    *,
    image_size: int | None = None,
    layers: Sequence[int] = DEFAULT_LAYERS,
    channel_reduction: str = "mean",
    num_heads: int | None = None,
  ):
    if not spec:
      raise ValueError("perceptual teacher: empty spec (a checkpoint path or random:<variant>)")
    self.spec = spec
    if spec.startswith("random:"):
      arch, seed = parse_random_spec(spec, image_size)
      model = build_model(arch, layers)
      size = arch["image_size"]
      params = nn.unbox(
        jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, size, size, 3)))
      )["params"]
    else:
      arch, params = load_checkpoint(spec, image_size=image_size, num_heads=num_heads)
    self.arch = arch
    self.model = build_model(arch, layers)
    self.params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    self.layers = tuple(int(l) for l in layers)
    self.channel_reduction = channel_reduction
    if channel_reduction not in ("mean", "sum"):
      raise ValueError(f"channel_reduction must be 'mean' or 'sum', got {channel_reduction!r}")

  @property
  def image_size(self) -> int:
    return int(self.arch["image_size"])

  def features_fn(self, normalize: bool = True):
    model = self.model

    def fn(params, images01):
      return model.apply(
        {"params": params}, images01, normalize=normalize, method=PerceptualViT.features
      )

    return fn

  def loss_fn(self):
    """(params, a01, b01) -> PeCo Eq. 4 distance between two image batches."""
    features = self.features_fn()
    reduction = self.channel_reduction

    def fn(params, a01, b01):
      return perceptual_loss(
        features(params, a01), features(params, b01), channel_reduction=reduction
      )

    return fn

  def __repr__(self) -> str:
    return f"PerceptualTeacher({self.spec!r}, arch={self.arch}, layers={self.layers})"


def main(argv: Sequence[str]) -> int:
  """Converts a perceptual-teacher checkpoint to a mim_jax .npz once (needs torch)."""
  import argparse  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(
    prog="python -m mim_jax.teachers.perceptual",
    description="Convert the PeCo perceptual teacher's PyTorch checkpoint (a self-supervised "
    "ViT) to a mim_jax .npz, once; needs torch.",
    epilog="example: python -m mim_jax.teachers.perceptual --checkpoint=mocov3_vitb.pth "
    "--out=perceptual_vitb.npz",
  )
  parser.add_argument("--checkpoint", required=True, help="the PyTorch checkpoint")
  parser.add_argument("--out", required=True, help="the .npz to write")
  parser.add_argument("--image_size", type=int, default=0, help="input size (default: 224)")
  parser.add_argument("--num_heads", type=int, default=0, help="head count (default: 12)")
  args = parser.parse_args(list(argv[1:]))
  try:
    arch, params = load_checkpoint(
      args.checkpoint,
      image_size=args.image_size or None,
      num_heads=args.num_heads or None,
    )
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  save_npz(args.out, arch, params)
  print(f"wrote {args.out}: {arch}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
