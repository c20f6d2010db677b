"""mim_jax encoder params <-> timm state dicts, and the timm model that holds them.

Two timm classes cover every method's encoder (timm 1.0.31, `timm/models/beit.py` and
`timm/models/vision_transformer.py`):

  * encoders with a relative position bias (BEiT v2, PeCo, CCViT: one table shared by the
    blocks, or one per block after fine-tuning) -> `Beit` (`beit_*_patch16_224`): one bias-free
    `attn.qkv` with `q_bias` / `v_bias`, `gamma_1` / `gamma_2` layer scale, the shared table
    as `rel_pos_bias.relative_position_bias_table`;
  * encoders without one (MaPeT's timm ViT with learned positions and a k bias, CAE v2 with
    fixed sin-cos positions) -> `VisionTransformer` (`vit_*_patch16_224`): one `attn.qkv` with
    a full (q, k, v) bias, `ls1.gamma` / `ls2.gamma`, and a `pos_embed` that holds the learned
    table or the sin-cos values (a parameter in timm, equal to mim_jax's fixed table).

A learned k bias has no counterpart in `Beit` (its k bias is a zero buffer) and is dropped
there: it adds q.b_k to every logit of a query row, which the softmax cancels exactly. Both
models run with `global_pool='token'` and `num_classes=0`, so `forward_features` ends with
the final LayerNorm over every token, which is what `mim_jax.load_encoder(...).tokens` gives.
"""

from __future__ import annotations

import re

import numpy as np

from mim_jax.models import vit

# Names timm registers per width; model_args override every size field, so any width works.
_VIT_NAMES = {
  192: "vit_tiny_patch16_224",
  384: "vit_small_patch16_224",
  1024: "vit_large_patch16_224",
}
_BEIT_NAMES = {1024: "beit_large_patch16_224"}


def uses_beit(spec) -> bool:
  return spec.rel_pos in ("shared", "per_layer")


def _blocks(params: dict) -> list[str]:
  names = [k for k in params if re.match(r"^blocks_\d+$", k)]
  return sorted(names, key=lambda k: int(k.split("_")[1]))


def timm_model_config(spec, image_size: int, *, qkv_bias: bool = True) -> dict:
  """`architecture` and `model_args` for `timm.create_model` (config.json of an export)."""
  common = dict(
    img_size=int(image_size),
    patch_size=int(spec.patch_size),
    embed_dim=int(spec.embed_dim),
    depth=int(spec.depth),
    num_heads=int(spec.num_heads),
    mlp_ratio=float(spec.mlp_ratio),
    qkv_bias=bool(qkv_bias),
    # Any non-None value creates the layer-scale vectors; the exported values replace it.
    init_values=0.1 if spec.layer_scale else None,
    num_classes=0,
    global_pool="token",
  )
  if uses_beit(spec):
    args = dict(
      common,
      use_abs_pos_emb=spec.abs_pos != "none",
      use_rel_pos_bias=spec.rel_pos == "per_layer",
      use_shared_rel_pos_bias=spec.rel_pos == "shared",
    )
    return {
      "architecture": _BEIT_NAMES.get(spec.embed_dim, "beit_base_patch16_224"),
      "model_args": args,
    }
  args = dict(common, class_token=True, pos_embed="none" if spec.abs_pos == "none" else "learn")
  return {
    "architecture": _VIT_NAMES.get(spec.embed_dim, "vit_base_patch16_224"),
    "model_args": args,
  }


def spec_fields_from_model_args(architecture: str, args: dict) -> dict:
  """The BackboneSpec fields a config.json's model_args determine (the loader's check)."""
  beit = architecture.startswith("beit")
  if beit:
    rel_pos = (
      "shared"
      if args.get("use_shared_rel_pos_bias")
      else ("per_layer" if args.get("use_rel_pos_bias") else "none")
    )
    abs_pos = "learned" if args.get("use_abs_pos_emb", True) else "none"
  else:
    rel_pos = "none"
    abs_pos = "none" if args.get("pos_embed", "learn") == "none" else "learned"
  return dict(
    patch_size=int(args["patch_size"]),
    embed_dim=int(args["embed_dim"]),
    depth=int(args["depth"]),
    num_heads=int(args["num_heads"]),
    mlp_ratio=float(args.get("mlp_ratio", 4.0)),
    rel_pos=rel_pos,
    abs_pos=abs_pos,
    layer_scale=args.get("init_values") is not None,
    final_norm=bool(args.get("final_norm", True)),
  )


def _f32(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x, np.float32))


def to_timm(params: dict, spec, image_size: int) -> dict[str, np.ndarray]:
  """timm state dict (numpy, fp32) of an unstacked mim_jax encoder; `image_size` fixes the
  sin-cos table of an encoder with fixed positions."""
  beit = uses_beit(spec)
  d = spec.embed_dim
  out = {"cls_token": _f32(params["cls_token"])}
  kernel = np.asarray(params["patch_embed"]["kernel"])  # (p, p, C, D)
  out["patch_embed.proj.weight"] = _f32(kernel.transpose(3, 2, 0, 1))
  out["patch_embed.proj.bias"] = _f32(params["patch_embed"]["bias"])
  if spec.abs_pos == "learned":
    out["pos_embed"] = _f32(params["pos_embed"])
  elif spec.abs_pos == "sincos":
    grid = (image_size // spec.patch_size,) * 2
    out["pos_embed"] = _f32(vit.sincos_2d_pos_embed(grid, d)[None])
  if spec.rel_pos == "shared":
    table = params["rel_pos_bias"]["relative_position_bias_table"]
    out["rel_pos_bias.relative_position_bias_table"] = _f32(table)
  for name in _blocks(params):
    b, i = params[name], int(name.split("_")[1])
    pre = f"blocks.{i}."
    for norm in ("norm1", "norm2"):
      out[pre + f"{norm}.weight"] = _f32(b[norm]["scale"])
      out[pre + f"{norm}.bias"] = _f32(b[norm]["bias"])
    attn = b["attn"]
    out[pre + "attn.qkv.weight"] = _f32(np.asarray(attn["qkv"]["kernel"]).T)
    if "q_bias" in attn:
      if beit:
        out[pre + "attn.q_bias"] = _f32(attn["q_bias"])
        out[pre + "attn.v_bias"] = _f32(attn["v_bias"])
      else:
        k_bias = attn.get("k_bias", np.zeros((d,), np.float32))
        out[pre + "attn.qkv.bias"] = _f32(np.concatenate([attn["q_bias"], k_bias, attn["v_bias"]]))
    out[pre + "attn.proj.weight"] = _f32(np.asarray(attn["proj"]["kernel"]).T)
    out[pre + "attn.proj.bias"] = _f32(attn["proj"]["bias"])
    if spec.rel_pos == "per_layer":
      table = b["rel_pos_bias"]["relative_position_bias_table"]
      out[pre + "attn.relative_position_bias_table"] = _f32(table)
    for fc in ("fc1", "fc2"):
      out[pre + f"mlp.{fc}.weight"] = _f32(np.asarray(b["mlp"][fc]["kernel"]).T)
      out[pre + f"mlp.{fc}.bias"] = _f32(b["mlp"][fc]["bias"])
    if spec.layer_scale:
      names = ("gamma_1", "gamma_2") if beit else ("ls1.gamma", "ls2.gamma")
      out[pre + names[0]] = _f32(b["gamma_1"])
      out[pre + names[1]] = _f32(b["gamma_2"])
  if "norm" in params:  # absent in a classifier that pools with its own fc_norm
    out["norm.weight"] = _f32(params["norm"]["scale"])
    out["norm.bias"] = _f32(params["norm"]["bias"])
  return out


def expected_shapes(spec, image_size: int, *, qkv_bias: bool = True) -> dict[str, tuple]:
  """Every tensor name and shape the timm model of `spec` holds (the export's contract)."""
  d, p, depth = spec.embed_dim, spec.patch_size, spec.depth
  hidden = int(d * spec.mlp_ratio)
  grid = image_size // p
  beit = uses_beit(spec)
  shapes = {
    "cls_token": (1, 1, d),
    "patch_embed.proj.weight": (d, 3, p, p),
    "patch_embed.proj.bias": (d,),
  }
  if getattr(spec, "final_norm", True):
    shapes["norm.weight"] = shapes["norm.bias"] = (d,)
  if spec.abs_pos != "none":
    shapes["pos_embed"] = (1, grid * grid + 1, d)
  table = (vit.num_relative_distances((grid, grid)), spec.num_heads)
  if spec.rel_pos == "shared":
    shapes["rel_pos_bias.relative_position_bias_table"] = table
  for i in range(depth):
    pre = f"blocks.{i}."
    for name, shape in (
      ("norm1.weight", (d,)),
      ("norm1.bias", (d,)),
      ("norm2.weight", (d,)),
      ("norm2.bias", (d,)),
      ("attn.qkv.weight", (3 * d, d)),
      ("attn.proj.weight", (d, d)),
      ("attn.proj.bias", (d,)),
      ("mlp.fc1.weight", (hidden, d)),
      ("mlp.fc1.bias", (hidden,)),
      ("mlp.fc2.weight", (d, hidden)),
      ("mlp.fc2.bias", (d,)),
    ):
      shapes[pre + name] = shape
    if qkv_bias:
      if beit:
        shapes[pre + "attn.q_bias"] = shapes[pre + "attn.v_bias"] = (d,)
      else:
        shapes[pre + "attn.qkv.bias"] = (3 * d,)
    if spec.rel_pos == "per_layer":
      shapes[pre + "attn.relative_position_bias_table"] = table
    if spec.layer_scale:
      for name in ("gamma_1", "gamma_2") if beit else ("ls1.gamma", "ls2.gamma"):
        shapes[pre + name] = (d,)
  return shapes


def contract_mismatch(tensors: dict, expected: dict[str, tuple]) -> str | None:
  """None when `tensors` has exactly the expected names and shapes, else one line."""
  missing = sorted(set(expected) - set(tensors))
  extra = sorted(set(tensors) - set(expected))
  wrong = sorted(
    k for k in set(expected) & set(tensors) if tuple(np.shape(tensors[k])) != tuple(expected[k])
  )
  if not (missing or extra or wrong):
    return None
  parts = []
  if missing:
    parts.append(
      f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
    )
  if extra:
    parts.append(
      f"{len(extra)} unexpected ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})"
    )
  if wrong:
    k = wrong[0]
    parts.append(
      f"{len(wrong)} of the wrong shape ({k}: {tuple(np.shape(tensors[k]))} != {expected[k]})"
    )
  return "; ".join(parts)
