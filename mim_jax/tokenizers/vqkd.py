r"""BEiT v2's VQ-KD tokenizer in Flax (`microsoft/unilm:beit2/modeling_vqkd.py`).

See docs/reference_details.md#vq-kd-tokenizer for the details the paper leaves out.

  encoder   ViT (`modeling_finetune.VisionTransformer`): q/v bias, learned absolute
            positions + cls token, NO layer scale (init_values=0), no relative position
            bias, no final norm; `fc_norm` (LN, eps 1e-6) on the patch tokens
            (use_mean_pooling=True). Init: timm trunc_normal(0.02) with the absolute +-2
            cut-off, depth rescale of attn.proj / mlp.fc2, patch conv at PyTorch's default.
  encode_task_layer   Linear(D, D) -> Tanh -> Linear(D, 32), in fp32 (autocast disabled).
  quantize  `quantizers.NormEMAQuantizer` (8192 x 32, l2-normalised, EMA 0.99, beta 1,
            spherical k-means init on the first training batch); codebook in the
            'codebook' collection.
  decoder   the same ViT class with patch size 1 over the (H/p, W/p, 32) code map, its own
            cls token and learned positions, depth 3 (or 1), fc_norm on the patch tokens.
  decode_task_layer   Linear(D, D) -> Tanh -> Linear(D, 512): the CLIP target's width.

Inputs to the module are images in [-1, 1] (the official `pre_process`: [0, 1] * 2 - 1);
`VQKDTokenizer` takes uint8 images. Flax names mirror the PyTorch keys
(`encoder/*`, `encode_task_layer/{fc1,fc2}` = `encode_task_layer.{0,2}`, ...), see
`convert_official_state_dict`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import quantizers
from mim_jax import torch_io
from mim_jax.models import convert
from mim_jax.models import vit
from mim_jax.tokenizers.base import Tokenizer
from mim_jax.tokenizers.base import View

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Defaults of config.vqkd: `vqkd_encoder_base_decoder_3x768x12_clip` (modeling_vqkd.py).
DEFAULTS = dict(
  num_codes=8192,
  code_dim=32,
  decoder_depth=3,
  decoder_width=0,
  decoder_heads=0,
  target_dim=512,
  decay=0.99,
  beta=1.0,
  kmeans_init=True,
  kmeans_iters=10,
  restart_dead_codes=False,
  dead_code_threshold=1e-3,
)

# The official get_code pipeline (test_get_code.py): Resize(256) -> CenterCrop(224), bicubic.
VIEW_RESIZE_RATIO = 256 / 224


# ----------------------------------------------------------------------------- model
class PatchTokenViT(vit.VisionTransformer):
  """`modeling_finetune.VisionTransformer(use_mean_pooling=True)` with
  `forward(x, return_patch_tokens=True)`: the patch tokens of the last block through
  `fc_norm` (the final `norm` is Identity there, so build it with final_norm=False)."""

  @nn.compact
  def __call__(self, images, *, train: bool = False):  # pylint: disable=arguments-differ
    out = super().__call__(images, train=train)
    fc_norm = vit.layer_norm(self.ln_eps, self.param_dtype, "fc_norm")
    return vit._apply_norm(fc_norm, out["last"][:, 1:])  # pylint: disable=protected-access


class TaskLayer(nn.Module):
  """Linear(D, hidden) -> Tanh -> Linear(hidden, out) with trunc_normal(0.02) weights and
  zero biases (modeling_vqkd.py `_init_weights`); torch indices 0 and 2 = fc1 and fc2."""

  hidden_dim: int
  out_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = vit.trunc_normal_init(0.02, "abs2")
    dense = lambda n, names, name: nn.Dense(
      n,
      dtype=self.dtype,
      name=name,
      kernel_init=nn.with_logical_partitioning(init, names),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), names[1:]),
    )
    x = dense(self.hidden_dim, ("embed", "mlp"), "fc1")(x.astype(self.dtype))
    return dense(self.out_dim, ("mlp", None), "fc2")(jnp.tanh(x))


class VQKD(nn.Module):
  """Encoder -> task layer -> NormEMA quantizer -> decoder -> task layer.

  `microsoft/unilm:beit2/modeling_vqkd.py`, class `VQKD`.

  `__call__(x, train=...)` returns (reconstruction (B, N, target_dim) fp32,
  QuantizerOutput); x is (B, H, W, 3) in [-1, 1]. Call with mutable=['codebook'] when
  training so that the EMA / k-means updates are kept. decoder_depth=0 builds the
  tokenizing half only (a checkpoint without a decoder).
  """

  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  decoder_embed_dim: int = 768
  decoder_depth: int = 3
  decoder_num_heads: int = 12
  code_dim: int = 32
  num_codes: int = 8192
  target_dim: int = 512
  decay: float = 0.99
  beta: float = 1.0
  kmeans_init: bool = True
  kmeans_iters: int = 10
  restart_dead_codes: bool = False
  dead_code_threshold: float = 1e-3
  dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def setup(self):
    # modeling_vqkd.get_model_default_params: init_values=0 (no layer scale), learned abs
    # pos, no rel pos, use_mean_pooling (fc_norm, norm = Identity), qkv_bias, eps 1e-6.
    common = dict(
      qkv_bias=True,
      layer_scale_init=None,
      rel_pos="none",
      abs_pos="learned",
      final_norm=False,
      weight_init="timm",
      depth_rescale=True,
      ln_eps=1e-6,
      dtype=self.dtype,
      scan_layers=self.scan_layers,
      remat=self.remat,
    )
    self.encoder = PatchTokenViT(
      patch_size=self.patch_size,
      embed_dim=self.embed_dim,
      depth=self.depth,
      num_heads=self.num_heads,
      **common,
    )
    # The encode task layer runs with autocast disabled (modeling_vqkd.py:155-156).
    self.encode_task_layer = TaskLayer(self.embed_dim, self.code_dim, dtype=jnp.float32)
    self.quantize = quantizers.NormEMAQuantizer(
      self.num_codes,
      self.code_dim,
      decay=self.decay,
      beta=self.beta,
      kmeans_init=self.kmeans_init,
      kmeans_iters=self.kmeans_iters,
      restart_dead_codes=self.restart_dead_codes,
      dead_code_threshold=self.dead_code_threshold,
    )
    if self.decoder_depth > 0:
      self.decoder = PatchTokenViT(
        patch_size=1,
        in_chans=self.code_dim,
        embed_dim=self.decoder_embed_dim,
        depth=self.decoder_depth,
        num_heads=self.decoder_num_heads,
        **common,
      )
      self.decode_task_layer = TaskLayer(self.decoder_embed_dim, self.target_dim, dtype=self.dtype)

  def encode(self, x, *, train: bool = False) -> jax.Array:
    """(B, H, W, 3) in [-1, 1] -> unnormalised codes (B, H/p, W/p, code_dim), fp32."""
    b, h, w, _ = x.shape
    p = self.patch_size
    tokens = self.encoder(x.astype(self.dtype), train=train)
    z = self.encode_task_layer(tokens.astype(jnp.float32))
    return z.reshape(b, h // p, w // p, self.code_dim)

  def decode(self, z_q, *, train: bool = False) -> jax.Array:
    """(B, h, w, code_dim) quantised codes -> (B, h*w, target_dim) fp32."""
    if self.decoder_depth <= 0:
      raise ValueError("this VQ-KD has no decoder (decoder_depth=0): it can only tokenize")
    tokens = self.decoder(z_q.astype(self.dtype), train=train)
    return self.decode_task_layer(tokens).astype(jnp.float32)

  def __call__(self, x, *, train: bool = False):
    q = self.quantize(self.encode(x, train=train), train=train)
    return self.decode(q.z_q, train=train), q

  def tokenize(self, x) -> jax.Array:
    """Nearest-code ids (B, N) int32; never changes the codebook."""
    q = self.quantize(self.encode(x), train=False)
    return q.ids.reshape(q.ids.shape[0], -1).astype(jnp.int32)

  def codes(self, x) -> jax.Array:
    """The l2-normalised continuous codes the lookup sees, (B, N, code_dim)."""
    z = quantizers.l2norm(self.encode(x))
    return z.reshape(z.shape[0], -1, self.code_dim)


def to_model_range(images_uint8: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> [-1, 1] (reference `pre_process`, 'default' type: x*255/127.5 - 1)."""
  return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def _get(section: Mapping[str, Any] | None, key: str, default=None):
  if section is None:
    return default
  value = section.get(key, default)
  return default if value is None else value


def model_from_config(config: Mapping[str, Any]) -> VQKD:
  """The VQKD module of a config (ConfigDict or its config.json dict): encoder from
  config.model (variant + width/depth/heads), the rest from config.vqkd."""
  m = config["model"]
  q = dict(DEFAULTS, **{k: v for k, v in dict(config.get("vqkd", {}) or {}).items()})
  kw = vit.vit_kwargs(m["variant"])
  for field, key in (("width", "embed_dim"), ("depth", "depth"), ("heads", "num_heads")):
    if _get(m, field, 0):
      kw[key] = int(m[field])
  dtype = str(config.get("dtype", "float32"))
  if dtype not in _DTYPES:
    raise ValueError(f"config.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
  return VQKD(
    patch_size=kw["patch_size"],
    embed_dim=kw["embed_dim"],
    depth=kw["depth"],
    num_heads=kw["num_heads"],
    decoder_embed_dim=int(q["decoder_width"] or kw["embed_dim"]),
    decoder_depth=int(q["decoder_depth"]),
    decoder_num_heads=int(q["decoder_heads"] or kw["num_heads"]),
    code_dim=int(q["code_dim"]),
    num_codes=int(q["num_codes"]),
    target_dim=int(q["target_dim"]),
    decay=float(q["decay"]),
    beta=float(q["beta"]),
    kmeans_init=bool(q["kmeans_init"]),
    kmeans_iters=int(q["kmeans_iters"]),
    restart_dead_codes=bool(q["restart_dead_codes"]),
    dead_code_threshold=float(q["dead_code_threshold"]),
    dtype=_DTYPES[dtype],
    scan_layers=bool(_get(m, "scan_layers", False)),
    remat=bool(_get(m, "remat", False)),
  )


def init_variables(model: VQKD, rng: jax.Array, image_size: int) -> dict:
  """Boxed {'params', 'codebook'} of a fresh model (codebook zeros until k-means init)."""
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  if model.decoder_depth > 0:
    return model.init({"params": rng}, x, train=False)
  return model.init({"params": rng}, x, method=VQKD.tokenize)


# ----------------------------------------------------------------------------- converter
# Key prefixes the official loader drops (`microsoft/unilm:beit2/modeling_vqkd.py`).
_DROPPED_PREFIXES = ("loss", "teacher", "scaling")
# Norm-EMA buffers the JAX quantizer does not keep: `embedding.cluster_size` and
# `embedding.embed_avg` belong to the unused `weight_update` path
# (docs/reference_details.md#vq-kd-quantizer).
_IGNORED_KEYS = ("quantize.embedding.cluster_size", "quantize.embedding.embed_avg")


def _np(value) -> np.ndarray:
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def _vit_half(sd: dict, prefix: str, num_heads: int | None) -> tuple[dict, dict]:
  """(params, arch) of `encoder.` / `decoder.`: beit_from_torch + fc_norm."""
  block_ids = {int(k[len(prefix) :].split(".")[1]) for k in sd if k.startswith(prefix + "blocks.")}
  depth = len(block_ids)
  if depth == 0 or f"{prefix}patch_embed.proj.weight" not in sd:
    raise ValueError(f"VQ-KD checkpoint has no {prefix}blocks.* / {prefix}patch_embed.* keys")
  params, unused = convert.beit_from_torch(
    {k: sd[k] for k in sd if k.startswith(prefix)}, depth=depth, prefix=prefix, return_unused=True
  )
  fc_norm = {f"{prefix}fc_norm.weight": "scale", f"{prefix}fc_norm.bias": "bias"}
  for key, name in fc_norm.items():
    if key not in sd:
      raise ValueError(
        f"VQ-KD checkpoint has no {key}: the VQ-KD ViTs use mean-pooling "
        "models whose patch tokens go through fc_norm"
      )
    params.setdefault("fc_norm", {})[name] = sd[key].astype(np.float32)
  others = sorted(set(unused) - set(fc_norm))
  unexpected = sorted(set(params) & {"norm", "gamma_1", "rel_pos_bias", "mask_token"})
  if others or unexpected or "pos_embed" not in params:
    raise ValueError(
      f"{prefix[:-1]}: not the VQ-KD ViT layout (learned pos_embed, no final "
      f"norm, no layer scale, no relative position bias): unexpected "
      f"{others + unexpected}, "
      f"pos_embed {'present' if 'pos_embed' in params else 'missing'}"
    )
  if any("gamma_1" in blk for name, blk in params.items() if name.startswith("blocks_")):
    raise ValueError(f"{prefix[:-1]}: has layer scale (gamma_1/gamma_2); VQ-KD ViTs have none")
  kernel = params["patch_embed"]["kernel"]  # (p, p, in, D)
  dim = int(kernel.shape[-1])
  heads = int(num_heads or max(1, dim // 64))  # 64-d heads in every released model
  if dim % heads:
    raise ValueError(f"{prefix[:-1]}: width {dim} is not divisible by {heads} heads")
  n = params["pos_embed"].shape[1] - 1
  side = math.isqrt(n)
  if side * side != n:
    raise ValueError(f"{prefix[:-1]}: pos_embed has {n} patch positions, not a square grid")
  arch = dict(
    patch_size=int(kernel.shape[0]),
    in_chans=int(kernel.shape[2]),
    embed_dim=dim,
    depth=depth,
    num_heads=heads,
    grid=side,
  )
  return params, arch


def _task_layer(sd: dict, prefix: str) -> dict:
  out = {}
  for idx, name in (("0", "fc1"), ("2", "fc2")):
    w, b = f"{prefix}.{idx}.weight", f"{prefix}.{idx}.bias"
    if w not in sd or b not in sd:
      raise ValueError(f"VQ-KD checkpoint has no {w} / {b}")
    out[name] = {
      "kernel": np.ascontiguousarray(sd[w].T.astype(np.float32)),
      "bias": sd[b].astype(np.float32),
    }
  return out


def convert_official_state_dict(
  state_dict: Mapping[str, Any],
  *,
  num_heads: int | None = None,
  decoder_num_heads: int | None = None,
) -> tuple[VQKD, dict, dict, int]:
  """The released BEiT v2 tokenizer (`vqkd_encoder_base_decoder_*_clip.pth`) ->
  (VQKD module, 'params', 'codebook' collection, image size).

  The state dict may be wrapped under 'model'; keys starting with loss / teacher /
  scaling are dropped, as `modeling_vqkd.py` does when loading. Every other key must
  have a home (a layout surprise is an error, not a silent skip). Head counts are not
  stored in the weights: 64-d heads are assumed unless given.
  """
  if "model" in state_dict and isinstance(state_dict["model"], Mapping):
    state_dict = state_dict["model"]
  sd = {k: _np(v) for k, v in state_dict.items() if not k.startswith(_DROPPED_PREFIXES)}
  enc_params, enc = _vit_half(sd, "encoder.", num_heads)
  params = {"encoder": enc_params, "encode_task_layer": _task_layer(sd, "encode_task_layer")}
  consumed = {k for k in sd if k.startswith(("encoder.", "encode_task_layer."))}

  weight = sd.get("quantize.embedding.weight")
  if weight is None:
    raise ValueError("VQ-KD checkpoint has no quantize.embedding.weight (the codebook)")
  num_codes, code_dim = weight.shape
  if params["encode_task_layer"]["fc2"]["kernel"].shape[1] != code_dim:
    got_dim = params["encode_task_layer"]["fc2"]["kernel"].shape[1]
    raise ValueError(
      f"encode_task_layer outputs {got_dim}-d codes but the codebook is {code_dim}-d"
    )
  cluster = sd.get("quantize.cluster_size", np.zeros((num_codes,), np.float32))
  initted = sd.get("quantize.embedding.initted", np.asarray(True))
  codebook = {
    "quantize": {
      "embedding": weight.astype(np.float32),
      "cluster_size": np.asarray(cluster, np.float32).reshape(num_codes),
      "initted": np.asarray(bool(np.asarray(initted).reshape(-1)[0])),
    }
  }
  consumed |= {
    "quantize.embedding.weight",
    "quantize.cluster_size",
    "quantize.embedding.initted",
    *_IGNORED_KEYS,
  }

  dec = None
  if any(k.startswith("decoder.") for k in sd):
    dec_params, dec = _vit_half(sd, "decoder.", decoder_num_heads)
    if dec["patch_size"] != 1 or dec["in_chans"] != code_dim or dec["grid"] != enc["grid"]:
      raise ValueError(
        f"decoder: expected a patch-1 ViT over the {enc['grid']}x{enc['grid']}x"
        f"{code_dim} code map, got patch {dec['patch_size']}, "
        f"{dec['in_chans']} input channels, grid {dec['grid']}"
      )
    params["decoder"] = dec_params
    params["decode_task_layer"] = _task_layer(sd, "decode_task_layer")
    consumed |= {k for k in sd if k.startswith(("decoder.", "decode_task_layer."))}
  leftover = sorted(set(sd) - consumed)
  if leftover:
    raise ValueError(f"VQ-KD checkpoint keys with no home in the Flax model: {leftover}")

  model = VQKD(
    patch_size=enc["patch_size"],
    embed_dim=enc["embed_dim"],
    depth=enc["depth"],
    num_heads=enc["num_heads"],
    decoder_embed_dim=dec["embed_dim"] if dec else enc["embed_dim"],
    decoder_depth=dec["depth"] if dec else 0,
    decoder_num_heads=dec["num_heads"] if dec else enc["num_heads"],
    code_dim=int(code_dim),
    num_codes=int(num_codes),
    target_dim=(
      int(params["decode_task_layer"]["fc2"]["kernel"].shape[1]) if dec else DEFAULTS["target_dim"]
    ),
  )
  return model, params, codebook, enc["grid"] * enc["patch_size"]


def load_torch_checkpoint(path: str) -> Mapping[str, Any]:
  """The released tokenizer's .pth on CPU (torch needed for this only)."""
  return torch_io.load_file(
    path,
    what="VQ-KD checkpoint",
    convert_hint="training and tokenizing from a mim_jax workdir do not",
  )


# ----------------------------------------------------------------------------- tokenizer
class VQKDTokenizer:
  """A trained VQ-KD as a frozen tokenizer.

  View (the official get_code pipeline, test_get_code.py): Resize(shorter side = 256/224 x
  image size, bicubic) -> CenterCrop(image size), uint8 RGB, no normalisation (the model
  maps [0, 1] to [-1, 1] itself). `tokenize_fn()` is a pure, jittable
  `(params, images_uint8) -> (B, N) int32` with params = {'params', 'codebook'}.
  """

  def __init__(
    self,
    model: VQKD,
    params: Any,
    codebook: Any,
    *,
    image_size: int,
    provenance: dict | None = None,
  ):
    self.model = model
    self.params = {
      "params": jax.tree.map(jnp.asarray, nn.unbox(params)),
      "codebook": jax.tree.map(jnp.asarray, nn.unbox(codebook)),
    }
    self.image_size = int(image_size)
    if self.image_size % model.patch_size:
      raise ValueError(
        f"VQ-KD tokenizer: image size {self.image_size} is not a multiple of "
        f"the patch size {model.patch_size}"
      )
    self.provenance = dict(provenance or {})
    self._tokenize = jax.jit(self.tokenize_fn())
    self._codes = jax.jit(self.codes_fn())

  # ---- construction
  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None) -> "VQKDTokenizer":
    """Params + 'codebook' collection of a configs/vqkd_vitb.py training run."""
    from mim_jax import checkpoint  # pylint: disable=g-import-not-at-top

    if not os.path.exists(os.path.join(workdir, "config.json")):
      raise FileNotFoundError(f"{workdir} has no config.json: not a mim_jax training workdir")
    config = checkpoint.saved_config(workdir)
    name = (config.get("method") or {}).get("name")
    if name != "vqkd":
      raise ValueError(f"{workdir} was trained with method {name!r}, not 'vqkd'")
    params, extra, step = checkpoint.read_trained_state(workdir, step)
    if "encoder" not in params or "codebook" not in extra:
      raise ValueError(
        f"{workdir}: checkpoint has no 'encoder' params or 'codebook' "
        f"collection (params {sorted(params)}, collections {sorted(extra)})"
      )
    model = model_from_config(config)
    return cls(
      model,
      params,
      extra["codebook"],
      image_size=int(config["data"]["image_size"]),
      provenance={
        "workdir": os.path.abspath(workdir),
        "step": int(step),
        "model": config["model"],
        "vqkd": config.get("vqkd", {}),
      },
    )

  @classmethod
  def from_torch(
    cls, path_or_state_dict, *, num_heads: int | None = None, decoder_num_heads: int | None = None
  ) -> "VQKDTokenizer":
    """The official released tokenizer (.pth, state dict under 'model'), or its dict."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
      path = os.fspath(path_or_state_dict)
      sd, where = load_torch_checkpoint(path), {"checkpoint": os.path.abspath(path)}
    else:
      sd, where = path_or_state_dict, {"checkpoint": "<state dict>"}
    model, params, codebook, size = convert_official_state_dict(
      sd, num_heads=num_heads, decoder_num_heads=decoder_num_heads
    )
    arch = {
      f: getattr(model, f)
      for f in (
        "patch_size",
        "embed_dim",
        "depth",
        "num_heads",
        "decoder_depth",
        "num_codes",
        "code_dim",
      )
    }
    return cls(model, params, codebook, image_size=size, provenance={**where, **arch})

  # ---- what a token cache / report needs
  @property
  def codebook_size(self) -> int:
    return int(self.model.num_codes)

  @property
  def grid(self) -> tuple[int, int]:
    side = self.image_size // self.model.patch_size
    return side, side

  @property
  def view(self) -> View:
    return View(self.image_size, int(round(self.image_size * VIEW_RESIZE_RATIO)), "bicubic")

  def tokenize_fn(self):
    model = self.model

    def fn(params, images_uint8):
      return model.apply(params, to_model_range(images_uint8), method=VQKD.tokenize)

    return fn

  def codes_fn(self):
    model = self.model

    def fn(params, images_uint8):
      return model.apply(params, to_model_range(images_uint8), method=VQKD.codes)

    return fn

  def _check(self, images) -> jax.Array:
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(
        f"VQ-KD tokenizer expects (B, {self.image_size}, {self.image_size}, 3) "
        f"uint8 images (view {self.view}), got {images.shape}"
      )
    return images

  def tokenize(self, images_uint8) -> jax.Array:
    """(B, H, W, 3) uint8 -> (B, N) int32 nearest-code ids."""
    return self._tokenize(self.params, self._check(images_uint8))

  def codes(self, images_uint8) -> jax.Array:
    """(B, N, code_dim) l2-normalised continuous codes (before the lookup)."""
    return self._codes(self.params, self._check(images_uint8))

  def as_tokenizer(self) -> Tokenizer:
    # No decode_fn: VQ-KD reconstructs teacher features, not pixels (unilm#854).
    return Tokenizer(
      "vqkd",
      self.tokenize_fn(),
      self.params,
      codebook_size=self.codebook_size,
      grid=self.grid,
      view=self.view,
      provenance=self.provenance,
    )


def load(path: str) -> VQKDTokenizer:
  """A VQ-KD training workdir (has config.json) or an official PyTorch checkpoint file."""
  if os.path.isdir(path):
    return VQKDTokenizer.from_workdir(path)
  return VQKDTokenizer.from_torch(path)


def load_as_tokenizer(path: str) -> Tokenizer:
  """`config.tokenizer.kind='vqkd'` (mim_jax.tokenizers.base.load_tokenizer)."""
  return load(path).as_tokenizer()
