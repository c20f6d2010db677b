r"""Pre-trained encoders for evaluation: loading, architecture inference, rel-pos expansion.

`load(init, model_cfg)` returns (params, BackboneSpec) for any of:
  * a mim_jax pre-training workdir: the encoder is `params['backbone']` of the newest
    checkpoint (heads, MaPeT's query stream, CAE v2's regressor, BEiT v2's aggregation head
    live outside it and are dropped); stacked (scanned) layers are unstacked;
  * an official PyTorch checkpoint (.pth/.pt/.bin, needs torch): BEiT v2 (timm `Beit` key
    layout, shared `rel_pos_bias.*` table) or a CAE v2 encoder (`encoder.*` keys, fixed 2-D
    sin-cos `pos_embed`, no relative position bias), docs/reference_details.md#beit-v2-backbone
    and #cae-v2-encoder;
  * a folder written by `python -m mim_jax.export` (timm safetensors + config.json, or the
    full export's safetensors + manifest), checked against what it declares first;
  * a converted `.npz` (`python -m mim_jax.evaluation.backbones --checkpoint=X.pth
    --out=X.npz`, which needs torch once; the .npz carries its own spec);
  * 'random': a randomly initialised encoder of config.model's architecture (the baseline).

The architecture is read from the parameters where they determine it (patch size, width,
depth, MLP ratio, layer scale, k bias, shared / per-layer / no rel-pos, learned pos_embed);
the head count and a fixed sin-cos position embedding leave no trace in the weights and come
from the checkpoint's config.json or the evaluation config (config.model).

Fine-tuning (docs/reference_details.md#beit-fine-tuning, microsoft/unilm:beit2/
run_class_finetuning.py): the shared relative position
table is copied into every block's own table and, when the patch grid changes, resized by
the reference's geometric-progression + bicubic spline interpolation (`resize_rel_pos_table`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re

import jax
import numpy as np

from mim_jax import checkpoint
from mim_jax import torch_io
from mim_jax.models import convert
from mim_jax.models import exported
from mim_jax.models import vit

_BLOCK = re.compile(r"^blocks_(\d+)$")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar")


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """The encoder architecture, enough to build `vit.VisionTransformer` for its params."""

  patch_size: int
  embed_dim: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  rel_pos: str = "shared"  # 'shared' | 'per_layer' | 'none'
  abs_pos: str = "none"  # 'none' | 'learned' | 'sincos'
  layer_scale: bool = True
  k_bias: bool = False
  use_mask_token: bool = False
  grid: tuple[int, int] | None = None  # the pre-training grid (rel-pos / pos_embed), if known
  # False for a fine-tuned classifier that pools with its own fc_norm (timm global_pool='avg',
  # MaPeT's released models): the tokens then leave the last block without a norm.
  final_norm: bool = True
  source: str = ""

  def vit_kwargs(self, **over) -> dict:
    kw = dict(
      patch_size=self.patch_size,
      embed_dim=self.embed_dim,
      depth=self.depth,
      num_heads=self.num_heads,
      mlp_ratio=self.mlp_ratio,
      rel_pos=self.rel_pos,
      abs_pos=self.abs_pos,
      layer_scale_init=0.1 if self.layer_scale else None,
      k_bias=self.k_bias,
      use_mask_token=self.use_mask_token,
      final_norm=self.final_norm,
    )
    kw.update(over)
    return kw

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self))

  @classmethod
  def from_json(cls, text: str) -> "BackboneSpec":
    d = json.loads(text)
    d["grid"] = tuple(d["grid"]) if d.get("grid") else None
    return cls(**d)


# ----------------------------------------------------------------------------- inference
def _blocks(params) -> list[str]:
  return sorted((k for k in params if _BLOCK.match(k)), key=lambda k: int(k.split("_")[1]))


def _square_grid(n: int, what: str) -> tuple[int, int]:
  side = int(round(n**0.5))
  if side * side != n:
    raise ValueError(f"{what}: {n} positions are not a square grid")
  return side, side


def infer_spec(
  params: dict, *, num_heads: int | None = None, abs_pos: str | None = None, source: str = ""
) -> BackboneSpec:
  """Reads the architecture off an (unstacked) encoder params tree."""
  if "patch_embed" not in params or not _blocks(params):
    raise ValueError(
      f"{source or 'params'}: not a ViT encoder (needs patch_embed and "
      f"blocks_<i>; has {sorted(params)[:8]})"
    )
  kernel = params["patch_embed"]["kernel"]
  patch, dim = int(kernel.shape[0]), int(kernel.shape[-1])
  blocks = _blocks(params)
  depth = len(blocks)
  if [int(b.split("_")[1]) for b in blocks] != list(range(depth)):
    raise ValueError(f"{source}: blocks are not 0..{depth - 1}: {blocks}")
  b0 = params[blocks[0]]
  mlp_ratio = float(b0["mlp"]["fc1"]["kernel"].shape[1]) / dim
  table, grid = None, None
  if "rel_pos_bias" in params:
    rel_pos, table = "shared", params["rel_pos_bias"]["relative_position_bias_table"]
  elif "rel_pos_bias" in b0:
    rel_pos, table = "per_layer", b0["rel_pos_bias"]["relative_position_bias_table"]
  else:
    rel_pos = "none"
  if table is not None:
    heads_from_table = int(table.shape[1])
    if num_heads and num_heads != heads_from_table:
      raise ValueError(
        f"{source}: config.model heads={num_heads} but the relative position "
        f"table has {heads_from_table} heads"
      )
    num_heads = heads_from_table
    side = int(round(((int(table.shape[0]) - 3) ** 0.5 + 1) / 2))
    grid = (side, side)
  if not num_heads:
    raise ValueError(
      f"{source}: the head count is not stored in these weights; set "
      f"config.model.heads (or config.model.variant; load_encoder(..., heads=H))"
    )
  if dim % num_heads:
    raise ValueError(f"{source}: width {dim} is not divisible by {num_heads} heads")
  if "pos_embed" in params:
    if abs_pos == "sincos":
      raise ValueError(f"{source}: has a learned pos_embed but config.model.abs_pos='sincos'")
    abs_pos = "learned"
    grid = grid or _square_grid(int(params["pos_embed"].shape[1]) - 1, f"{source} pos_embed")
  abs_pos = abs_pos if abs_pos not in (None, "", "auto") else "none"
  return BackboneSpec(
    patch_size=patch,
    embed_dim=dim,
    depth=depth,
    num_heads=int(num_heads),
    mlp_ratio=mlp_ratio,
    rel_pos=rel_pos,
    abs_pos=abs_pos,
    layer_scale="gamma_1" in b0,
    k_bias="k_bias" in b0["attn"],
    use_mask_token="mask_token" in params,
    grid=grid,
    source=source,
    final_norm="norm" in params,
  )


def spec_from_config(model_cfg, source: str = "random") -> BackboneSpec:
  """The architecture config.model describes (for 'random' and as a fallback)."""
  kw = vit.vit_kwargs(model_cfg.variant)
  for field, key in (("width", "embed_dim"), ("depth", "depth"), ("heads", "num_heads")):
    if model_cfg.get(field, 0):
      kw[key] = int(model_cfg[field])
  abs_pos = model_cfg.get("abs_pos", "none")
  return BackboneSpec(
    patch_size=kw["patch_size"],
    embed_dim=kw["embed_dim"],
    depth=kw["depth"],
    num_heads=kw["num_heads"],
    rel_pos=model_cfg.get("rel_pos", "shared"),
    abs_pos="none" if abs_pos == "auto" else abs_pos,
    layer_scale=bool(model_cfg.get("layer_scale_init", 0.1)),
    source=source,
  )


def _heads_from_config(model_cfg) -> int | None:
  if model_cfg is None:
    return None
  if model_cfg.get("heads", 0):
    return int(model_cfg["heads"])
  if model_cfg.get("variant"):
    return vit.vit_kwargs(model_cfg["variant"])["num_heads"]
  return None


# ----------------------------------------------------------------------------- loaders
def _unstack_if_scanned(params: dict) -> dict:
  return convert.unstack_layers(params) if "blocks" in params else params


def _to_numpy_tree(tree):
  return jax.tree.map(lambda x: np.asarray(x), tree)


def load_workdir(workdir: str, model_cfg=None, step: int | None = None):
  """(encoder params, spec) from a mim_jax pre-training workdir (host numpy, any topology;
  `checkpoint.read_trained_state` skips a damaged newest step)."""
  try:
    params, _, step = checkpoint.read_trained_state(workdir, step)
  except FileNotFoundError as e:
    field = "config.init_step" if step is not None else "config.init"
    raise FileNotFoundError(f"{field}: {e}") from None
  try:
    saved = checkpoint.saved_config(workdir)
  except (OSError, KeyError, json.JSONDecodeError):
    logging.warning(
      "%s has no readable config.json; the head count comes from config.model", workdir
    )
    saved = {}
  return encoder_from_trained(params, saved, model_cfg, source=workdir, step=step)


def encoder_from_trained(params: dict, saved: dict, model_cfg=None, *, source: str, step: int):
  """(encoder params, spec) from every trained parameter of a method and its saved config."""
  saved_model = saved.get("model", {})
  method = saved.get("method", {}).get("name", "")
  # The method knows where its encoder is (and drops MaPeT's query stream, CAE v2's
  # regressor, BEiT v2's aggregation head); without a config, 'backbone' is the convention.
  from mim_jax import methods  # pylint: disable=g-import-not-at-top

  if method in methods.names():
    encoder = methods.encoder_params(method, params)
  else:
    encoder = params.get("backbone")
  if encoder is None:
    raise ValueError(
      f"{source}: the checkpoint has no 'backbone' parameters (top-level keys {sorted(params)})"
    )
  encoder = _unstack_if_scanned(_to_numpy_tree(encoder))
  heads = _heads_from_config(saved_model) or _heads_from_config(model_cfg)
  abs_pos = saved_model.get("abs_pos") or (model_cfg.get("abs_pos") if model_cfg else None)
  spec = infer_spec(
    encoder,
    num_heads=heads,
    abs_pos=abs_pos,
    source=f"{source} ({method or 'mim_jax'} step {step})",
  )
  return encoder, spec


def load_timm_export(path: str, model_cfg=None):
  """(params, spec) of a `mim_jax.export --format=timm` folder (checked against its
  config.json first)."""
  tensors, cfg = exported.read_timm(path)
  heads = {"heads": int(cfg["model_args"]["num_heads"])}
  return from_torch_state_dict(tensors, heads, source=path)


def load_full_export(path: str, model_cfg=None):
  """(encoder params, spec) of a `mim_jax.export --format=full` folder."""
  state, manifest = exported.read_full(path)
  return encoder_from_trained(
    state["params"], manifest.get("config", {}), model_cfg, source=path, step=manifest.get("step")
  )


# Head counts of the timm / official model names a checkpoint may carry (MaPeT's timm
# CheckpointSaver stores 'arch' and the argparse 'args'; its weights do not fix the heads).
_SIZE_HEADS = {"tiny": 3, "small": 6, "base": 12, "large": 16, "huge": 16}


def heads_from_checkpoint_names(obj) -> int | None:
  """The head count a checkpoint's model name implies ('vit_base_patch16_224' -> 12)."""
  if not isinstance(obj, dict):
    return None
  names = [obj.get("arch")]
  args = obj.get("args")
  names += [getattr(args, "model", None), getattr(args, "arch", None)]
  for name in names:
    if isinstance(name, str):
      for size, heads in _SIZE_HEADS.items():
        if re.search(rf"(^|_){size}(_|$)", name):
          return heads
  return None


def load_torch_state_dict(path: str) -> dict:
  """torch.load on CPU (weights only first), unwrapping {'model': ...} / {'module': ...}."""
  return _read_torch(path)[0]


def _read_torch(path: str) -> tuple[dict, int | None]:
  """(state dict, head count implied by the checkpoint's model name or None)."""
  sd = torch_io.load_file(
    path,
    what="checkpoint (config.init)",
    convert_hint=f"convert it once elsewhere with `python -m "
    f"mim_jax.evaluation.backbones --checkpoint={path} "
    f"--out=X.npz` and pass the .npz",
  )
  heads = heads_from_checkpoint_names(sd)
  for wrapper in ("model", "module", "state_dict"):
    if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
      sd = sd[wrapper]
  return sd, heads


def from_torch_state_dict(sd: dict, model_cfg=None, source: str = ""):
  """(params, spec) from a BEiT v2 or CAE v2 encoder state dict (tensors or arrays)."""
  prefix = "encoder." if any(k.startswith("encoder.") for k in sd) else ""
  block_ids = {
    int(m.group(1)) for m in (re.match(rf"^{re.escape(prefix)}blocks\.(\d+)\.", k) for k in sd) if m
  }
  if not block_ids:
    raise ValueError(
      f"{source}: no '{prefix}blocks.<i>.*' keys; not a BEiT v2 / CAE v2 encoder checkpoint"
    )
  params, unused = convert.beit_from_torch(
    sd, depth=max(block_ids) + 1, prefix=prefix, return_unused=True
  )
  if unused:
    logging.info(
      "%s: %d keys outside the encoder are dropped (e.g. %s)", source, len(unused), unused[:4]
    )
  abs_pos = None
  if "pos_embed" in params:
    pos = np.asarray(params["pos_embed"], np.float32)
    grid = _square_grid(pos.shape[1] - 1, f"{source} pos_embed")
    if np.allclose(pos[0], vit.sincos_2d_pos_embed(grid, pos.shape[-1]), atol=1e-4):
      del params["pos_embed"]  # CAE v2's fixed table (docs/reference_details.md#cae-v2-encoder)
      abs_pos = "sincos"
  spec = infer_spec(params, num_heads=_heads_from_config(model_cfg), abs_pos=abs_pos, source=source)
  if abs_pos == "sincos":
    spec = dataclasses.replace(spec, grid=grid)
  return params, spec


def save_npz(path: str, params: dict, spec: BackboneSpec) -> None:
  tmp = path + ".tmp.npz"
  np.savez(tmp, __spec__=np.asarray(spec.to_json()), **exported.flatten(params))
  os.replace(tmp, path)


def load_npz(path: str, model_cfg=None):
  with np.load(path, allow_pickle=False) as f:
    flat = {k: f[k] for k in f.files}
  spec_text = flat.pop("__spec__", None)
  params = _unstack_if_scanned(exported.unflatten(flat))
  if spec_text is not None:
    return params, BackboneSpec.from_json(str(spec_text))
  return params, infer_spec(
    params,
    num_heads=_heads_from_config(model_cfg),
    abs_pos=model_cfg.get("abs_pos") if model_cfg else None,
    source=path,
  )


def load(init: str, model_cfg=None, step: int | None = None):
  """(params or None, spec) for config.init; see the module docstring. `step` picks a
  checkpoint of a workdir (None: the latest)."""
  if init == "random":
    return None, spec_from_config(model_cfg)
  if not init:
    raise ValueError(
      "config.init is empty: pass a pre-training workdir, a .pth/.npz "
      "checkpoint, or 'random' for the random-init baseline"
    )
  if os.path.isdir(init):
    kind = exported.kind(init)
    if kind == "timm":
      return load_timm_export(init, model_cfg)
    if kind == "full":
      return load_full_export(init, model_cfg)
    return load_workdir(init, model_cfg, step)
  if not os.path.exists(init):
    raise FileNotFoundError(f"config.init: {init} does not exist")
  if init.endswith(".npz"):
    return load_npz(init, model_cfg)
  if init.endswith(TORCH_SUFFIXES):
    sd, heads = _read_torch(init)
    if heads and not _heads_from_config(model_cfg):
      model_cfg = {"heads": heads}
    return from_torch_state_dict(sd, model_cfg, source=init)
  raise ValueError(
    f"config.init: {init} is neither a workdir nor a .npz / {'/'.join(TORCH_SUFFIXES)} checkpoint"
  )


# ----------------------------------------------------------------------------- fine-tuning
def _geometric_coords(src: int, dst: int) -> np.ndarray:
  """BEiT's source coordinates: offsets spaced by a geometric progression whose half-length
  sum reaches dst // 2 (q found by bisection in [1.01, 1.5] to 1e-6)."""
  left, right = 1.01, 1.5
  while right - left > 1e-6:
    q = (left + right) / 2.0
    if (1.0 - q ** (src // 2)) / (1.0 - q) > dst // 2:
      right = q
    else:
      left = q
  dis, cur = [], 1.0
  for i in range(src // 2):
    dis.append(cur)
    cur += q ** (i + 1)
  return np.asarray([-d for d in reversed(dis)] + [0.0] + dis, np.float64)


def resize_rel_pos_table(
  table: np.ndarray, dst_grid: tuple[int, int], method: str = "cubic"
) -> np.ndarray:
  """((2h-1)(2w-1) + 3, heads) table resized to dst_grid (square grids).

  'cubic' is the reference (scipy interp2d kind='cubic' on a rectangular grid, i.e. the
  s=0 bicubic spline RectBivariateSpline fits); 'linear' is timm's default
  (`resize_rel_pos_bias_table` without scipy). The 3 cls entries are kept as they are.
  """
  table = np.asarray(table, np.float32)
  src_side = int(round((table.shape[0] - 3) ** 0.5))
  if src_side * src_side != table.shape[0] - 3 or dst_grid[0] != dst_grid[1]:
    raise ValueError(
      f"relative position tables can be resized between square grids only "
      f"(table rows {table.shape[0]}, grid {dst_grid})"
    )
  dst_side = 2 * dst_grid[0] - 1
  if src_side == dst_side:
    return table
  from scipy import interpolate  # pylint: disable=g-import-not-at-top

  coords = _geometric_coords(src_side, dst_side)
  t = dst_side // 2
  # The progression's sum stops just short of t: the outermost targets may lie past the
  # last source offset. interp2d (FITPACK) clamps them to the border, and so does timm's
  # linear interpolator; clamping here does the same for both methods.
  target = np.clip(np.arange(-t, t + 0.1, 1.0), coords[0], coords[-1])
  out = []
  for head in range(table.shape[1]):
    z = table[:-3, head].reshape(src_side, src_side).astype(np.float64)  # [d_row, d_col]
    if method == "cubic":
      values = interpolate.RectBivariateSpline(coords, coords, z, kx=3, ky=3, s=0)(target, target)
    elif method == "linear":
      ty, tx = np.meshgrid(target, target, indexing="ij")
      values = interpolate.RegularGridInterpolator((coords, coords), z)(np.stack([ty, tx], -1))
    else:
      raise ValueError(f"config.rel_pos_interpolation must be 'cubic' or 'linear', got {method!r}")
    out.append(values.reshape(-1))
  return np.concatenate([np.stack(out, 1), table[-3:]], 0).astype(np.float32)


def finetune_params(
  params: dict,
  spec: BackboneSpec,
  grid: tuple[int, int],
  *,
  method: str = "cubic",
  keep_norm: bool = False,
) -> dict:
  """Encoder params for the fine-tuning model (per-layer rel-pos tables, no mask token).

  With mean pooling (keep_norm False) the final `norm` is dropped: BEiT / MAE replace it by
  a fresh `fc_norm` on the pooled features (MAE's main_finetune asserts exactly that).

  A shared table is copied into every block (BEiT `run_class_finetuning.py`); per-layer
  tables are kept; either is resized when `grid` differs from the pre-training grid.
  Encoders without relative position bias (CAE v2) get none here: the model's own
  zero-initialised per-layer tables are used
  (docs/reference_details.md#cae-v2-recipe-and-evaluation).
  """
  dropped = ("mask_token", "rel_pos_bias") + (() if keep_norm else ("norm",))
  out = {k: v for k, v in params.items() if k not in dropped}
  key = "relative_position_bias_table"
  if spec.rel_pos == "shared":
    shared = resize_rel_pos_table(params["rel_pos_bias"][key], grid, method)
    for b in _blocks(out):
      out[b] = dict(out[b], rel_pos_bias={key: shared.copy()})
  elif spec.rel_pos == "per_layer":
    for b in _blocks(out):
      out[b] = dict(
        out[b], rel_pos_bias={key: resize_rel_pos_table(out[b]["rel_pos_bias"][key], grid, method)}
      )
  if "pos_embed" in out and spec.grid and tuple(spec.grid) != tuple(grid):
    raise ValueError(
      f"the learned pos_embed was trained on a {spec.grid} grid; resizing it to "
      f"{grid} is not implemented (config.data.image_size)"
    )
  return out


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def merge_into(init_params, loaded: dict, where: str = "backbone", place=None):
  """Every leaf of `init_params` that `loaded` (nested numpy) has, replaced by it.

  `init_params` may hold arrays or ShapeDtypeStructs (then every leaf must be loaded).
  With `place` (a matching tree of shardings) loaded leaves become global jax Arrays built
  shard by shard from host memory (multi-host safe). Shapes must agree. Returns (params,
  names of the leaves left at their initial values).
  """
  flat_loaded = exported.flatten(loaded)
  init_names = {_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(init_params)[0]}
  extra = sorted(set(flat_loaded) - init_names)
  if extra:
    raise ValueError(f"{len(extra)} loaded parameters have no place in the model, e.g. {extra[:3]}")
  fresh = []
  prefix = f"{where}/" if where else ""

  def pick(path, leaf, shard=None):
    name = _path_name(path)
    if name not in flat_loaded:
      fresh.append(prefix + name)
      return leaf
    value = flat_loaded[name]
    if value.shape != tuple(leaf.shape):
      raise ValueError(
        f"{prefix}{name}: checkpoint shape {value.shape} != model shape {tuple(leaf.shape)}"
      )
    value = value.astype(leaf.dtype)
    if shard is None:
      return value
    return jax.make_array_from_callback(value.shape, shard, lambda index: value[index])

  if place is None:
    out = jax.tree_util.tree_map_with_path(pick, init_params)
  else:
    out = jax.tree_util.tree_map_with_path(pick, init_params, place)
  return out, fresh


# ----------------------------------------------------------------------------- CLI
def _main(argv=None) -> None:
  import argparse  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(
    prog="python -m mim_jax.evaluation.backbones",
    description="Convert an official BEiT v2 / PeCo / CCViT / CAE v2 / MaPeT encoder "
    "checkpoint (.pth) to a mim_jax .npz, so that evaluation runs without torch.",
    epilog="example: python -m mim_jax.evaluation.backbones --checkpoint=beitv2_base.pth "
    "--out=beitv2_base.npz",
  )
  parser.add_argument("--checkpoint", required=True, help="the official .pth / .pth.tar")
  parser.add_argument("--out", required=True, help="the .npz to write")
  parser.add_argument(
    "--heads",
    type=int,
    default=0,
    help="head count, needed when the checkpoint has no rel-pos table",
  )
  args = parser.parse_args(argv)
  model_cfg = {"heads": args.heads} if args.heads else None
  sd, heads = _read_torch(args.checkpoint)
  if heads and not model_cfg:
    model_cfg = {"heads": heads}
  params, spec = from_torch_state_dict(sd, model_cfg, source=args.checkpoint)
  save_npz(args.out, params, spec)
  print(f"wrote {args.out}: {spec}")


if __name__ == "__main__":
  _main()
