r"""PeCo's tokenizer: a convolutional VQ-VAE with an EMA codebook (PeCo paper, Appendix).

The PeCo code is not public (docs/reference_details.md#peco): this follows the paper's
description, and VQGAN (taming-transformers, Esser et al. 2021, which the paper cites for its
GroupNorm) where the paper is silent:
  * encoder: 64 channels at the first stage, "doubled in every downsample operation", two
    residual blocks per resolution, GroupNorm (32 groups, eps 1e-6, VQGAN), swish, and one
    self-attention block at the smallest resolution (VQGAN's mid block: res-attn-res);
    16x down-sampling (four stride-2 convs: ch_mult = (1, 2, 4, 8, 16)) -> 14 x 14 codes at
    224 px. (The appendix also says "16 x 16" latents at 224, which 16x down-sampling cannot
    give; we follow the 16x factor and the issue's 14 x 14.) The paper's tokenizer sizes
    (37.5M parameters, Table 2) cannot be reproduced from its text; see `param_count`.
  * decoder: the inverse (conv_in, mid res-attn-res, two residual blocks per resolution,
    nearest x2 up-sampling + conv, GroupNorm, swish, conv_out to RGB);
  * VQGAN conventions: stride-2 3x3 down-sampling convs with (0, 1) padding, 1x1 quant_conv /
    post_quant_conv around the quantizer, PyTorch default init;
  * quantizer: `mim_jax.quantizers.EMAQuantizer` (8192 codes, decay 0.99, beta 0.25);
    code dimension 256 (VQGAN f16's embed_dim; the paper does not give it);
  * input normalisation: images in [-1, 1] (VQGAN's; the paper does not say), so the
    decoder's output is in [-1, 1] as well.

`PeCoTokenizer` wraps a trained workdir (configs/peco_vqvae.py): `tokenize(uint8 images) ->
(B, h*w) int32`, `decode(ids) -> [0, 1] images`; its `View` is Resize(shorter side) ->
CenterCrop at the training image size.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax import quantizers
from mim_jax.models import vit
from mim_jax.tokenizers.base import Tokenizer
from mim_jax.tokenizers.base import View

GN_EPS = 1e-6  # taming `Normalize`: GroupNorm(32, eps=1e-6, affine=True)

# Defaults of config.vqvae (the paper's tokenizer).
DEFAULTS = dict(
  ch=64,
  ch_mult=(1, 2, 4, 8, 16),
  num_res_blocks=2,
  z_channels=256,
  embed_dim=256,
  num_groups=32,
  num_codes=8192,
  decay=0.99,
  beta=0.25,
  eps=1e-5,
  codebook_init="uniform",
  restart_dead_codes=False,
  dead_code_threshold=1e-3,
)
CODEBOOK_INITS = ("uniform", "normal", "kmeans")


def _conv(
  features: int,
  kernel: int,
  fan_in: int,
  *,
  stride: int = 1,
  padding: Any = "SAME",
  name: str | None = None,
) -> nn.Conv:
  """A Conv with PyTorch's default init (taming leaves its convs at the default)."""
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=padding,
    kernel_init=vit.torch_default_init(),
    bias_init=vit.torch_default_bias_init(fan_in * kernel * kernel),
    name=name,
  )


def _norm(num_groups: int, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(
    num_groups=num_groups, epsilon=GN_EPS, dtype=jnp.float32, use_fast_variance=False, name=name
  )


def swish(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(x)


class ResnetBlock(nn.Module):
  """taming ResnetBlock without time embedding or dropout: GN-swish-conv3 twice, 1x1
  shortcut when the width changes."""

  out_ch: int
  num_groups: int = 32

  @nn.compact
  def __call__(self, x):
    in_ch = x.shape[-1]
    h = _conv(self.out_ch, 3, in_ch, name="conv1")(swish(_norm(self.num_groups, "norm1")(x)))
    h = _conv(self.out_ch, 3, self.out_ch, name="conv2")(swish(_norm(self.num_groups, "norm2")(h)))
    if in_ch != self.out_ch:
      x = _conv(self.out_ch, 1, in_ch, padding="VALID", name="nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """taming AttnBlock: single-head self-attention over the H*W positions (1x1 q/k/v/proj
  convs), softmax in fp32, residual."""

  num_groups: int = 32

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    h = _norm(self.num_groups, "norm")(x)
    q, k, v = (
      _conv(c, 1, c, padding="VALID", name=n)(h).reshape(b, hgt * wid, c) for n in ("q", "k", "v")
    )
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * c**-0.5
    probs = vit.softmax(logits).astype(v.dtype)
    h = jnp.einsum("bqk,bkc->bqc", probs, v).reshape(b, hgt, wid, c)
    return x + _conv(c, 1, c, padding="VALID", name="proj_out")(h)


class Downsample(nn.Module):
  """taming Downsample(with_conv=True): pad right/bottom by 1, 3x3 conv, stride 2."""

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(c, 3, c, stride=2, padding="VALID", name="conv")(x)


class Upsample(nn.Module):
  """taming Upsample(with_conv=True): nearest x2, then a 3x3 conv."""

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(x.shape[-1], 3, x.shape[-1], name="conv")(x)


class Encoder(nn.Module):
  ch: int = 64
  ch_mult: Sequence[int] = (1, 2, 4, 8, 16)
  num_res_blocks: int = 2
  z_channels: int = 256
  num_groups: int = 32

  @nn.compact
  def __call__(self, x):
    h = _conv(self.ch, 3, x.shape[-1], name="conv_in")(x)
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = ResnetBlock(self.ch * mult, self.num_groups, name=f"down_{level}_block_{i}")(h)
      if level != len(self.ch_mult) - 1:
        h = Downsample(name=f"down_{level}_downsample")(h)
    # The one self-attention block, at the smallest resolution (paper; VQGAN's mid block).
    h = ResnetBlock(h.shape[-1], self.num_groups, name="mid_block_1")(h)
    h = AttnBlock(self.num_groups, name="mid_attn_1")(h)
    h = ResnetBlock(h.shape[-1], self.num_groups, name="mid_block_2")(h)
    h = swish(_norm(self.num_groups, "norm_out")(h))
    return _conv(self.z_channels, 3, h.shape[-1], name="conv_out")(h)


class Decoder(nn.Module):
  """The encoder inverted: same widths per resolution, up-sampling instead of down."""

  ch: int = 64
  ch_mult: Sequence[int] = (1, 2, 4, 8, 16)
  num_res_blocks: int = 2
  out_ch: int = 3
  num_groups: int = 32

  @nn.compact
  def __call__(self, z):
    top = self.ch * self.ch_mult[-1]
    h = _conv(top, 3, z.shape[-1], name="conv_in")(z)
    h = ResnetBlock(top, self.num_groups, name="mid_block_1")(h)
    h = AttnBlock(self.num_groups, name="mid_attn_1")(h)
    h = ResnetBlock(top, self.num_groups, name="mid_block_2")(h)
    for level in reversed(range(len(self.ch_mult))):
      for i in range(self.num_res_blocks):
        h = ResnetBlock(
          self.ch * self.ch_mult[level], self.num_groups, name=f"up_{level}_block_{i}"
        )(h)
      if level != 0:
        h = Upsample(name=f"up_{level}_upsample")(h)
    h = swish(_norm(self.num_groups, "norm_out")(h))
    return _conv(self.out_ch, 3, h.shape[-1], name="conv_out")(h)


class VQVAE(nn.Module):
  """Encoder -> quant_conv -> EMA quantizer -> post_quant_conv -> Decoder, on [-1, 1] NHWC.

  Params: encoder, quant_conv, post_quant_conv, decoder. The codebook lives in the
  'codebook' collection (scope 'quantizer'); apply with mutable=['codebook'] to train it.
  """

  ch: int = 64
  ch_mult: Sequence[int] = (1, 2, 4, 8, 16)
  num_res_blocks: int = 2
  z_channels: int = 256
  embed_dim: int = 256
  num_groups: int = 32
  num_codes: int = 8192
  decay: float = 0.99
  beta: float = 0.25
  eps: float = 1e-5
  codebook_init: str = "uniform"
  restart_dead_codes: bool = False
  dead_code_threshold: float = 1e-3

  def setup(self):
    if self.codebook_init not in CODEBOOK_INITS:
      raise ValueError(
        f"vqvae.codebook_init must be one of {CODEBOOK_INITS}, got {self.codebook_init!r}"
      )
    for mult in self.ch_mult:
      if (self.ch * mult) % self.num_groups:
        raise ValueError(
          f"vqvae: width ch * ch_mult = {self.ch * mult} is not divisible by "
          f"num_groups={self.num_groups}"
        )
    if self.z_channels % self.num_groups:
      raise ValueError(
        f"vqvae: z_channels={self.z_channels} is not divisible by num_groups={self.num_groups}"
      )
    arch = dict(
      ch=self.ch,
      ch_mult=tuple(self.ch_mult),
      num_res_blocks=self.num_res_blocks,
      num_groups=self.num_groups,
    )
    self.encoder = Encoder(z_channels=self.z_channels, **arch)
    self.quant_conv = _conv(self.embed_dim, 1, self.z_channels, padding="VALID")
    self.quantizer = quantizers.EMAQuantizer(
      num_codes=self.num_codes,
      dim=self.embed_dim,
      decay=self.decay,
      beta=self.beta,
      eps=self.eps,
      kmeans_init=self.codebook_init == "kmeans",
      restart_dead_codes=self.restart_dead_codes,
      dead_code_threshold=self.dead_code_threshold,
    )
    self.post_quant_conv = _conv(self.z_channels, 1, self.embed_dim, padding="VALID")
    self.decoder = Decoder(**arch)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  def encode(self, x: jax.Array, *, train: bool = False) -> quantizers.QuantizerOutput:
    """x in [-1, 1] -> QuantizerOutput with ids (B, h, w) and z_q (B, h, w, embed_dim)."""
    return self.quantizer(self.quant_conv(self.encoder(x)), train=train)

  def decode(self, z_q: jax.Array) -> jax.Array:
    return self.decoder(self.post_quant_conv(z_q))

  def decode_ids(self, ids: jax.Array) -> jax.Array:
    """Code ids (B, h, w) -> reconstruction in [-1, 1] (unclipped)."""
    return self.decode(self.quantizer.lookup(ids))

  def __call__(self, x: jax.Array, *, train: bool = False):
    """(reconstruction in [-1, 1], QuantizerOutput)."""
    q = self.encode(x, train=train)
    return self.decode(q.z_q), q


def init_variables(model: VQVAE, rng: jax.Array, image_size: int) -> dict:
  """{'params', 'codebook'} of `model`, with the codebook initialised as
  `model.codebook_init` says:
    'uniform': U(-1/K, 1/K) (taming's VectorQuantizer). With codes near the origin the
      first assignments follow the direction of z (the -2 z.w term), so they spread over
      the codebook; with 'normal' codes (N(0, 1), EMAQuantizer's own init) the ||w||^2
      term dominates for small encoder outputs and a handful of codes take everything.
    'normal': EMAQuantizer's N(0, 1). 'kmeans': k-means of the first training batch.
  embed_avg = codes and cluster_size = 1, EMAQuantizer's consistent start either way."""
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  r_init, r_codes = jax.random.split(rng)
  variables = dict(model.init({"params": r_init}, x, train=False))
  if model.codebook_init == "uniform":
    book = dict(variables["codebook"]["quantizer"])
    k = model.num_codes
    codes = jax.random.uniform(r_codes, book["embedding"].shape, jnp.float32, -1.0 / k, 1.0 / k)
    book.update(embedding=codes, embed_avg=codes * book["cluster_size"][:, None])
    variables["codebook"] = {"quantizer": book}
  return variables


def vqvae_from_config(cfg: Mapping[str, Any]) -> VQVAE:
  """A VQVAE from a `config.vqvae` section (ConfigDict or the dict saved in config.json)."""
  kw = {k: cfg.get(k, v) for k, v in DEFAULTS.items()}
  kw["ch_mult"] = tuple(int(m) for m in kw["ch_mult"])
  unknown = set(cfg) - set(DEFAULTS)
  if unknown:
    raise ValueError(f"config.vqvae: unknown fields {sorted(unknown)}; known {sorted(DEFAULTS)}")
  return VQVAE(**kw)


def to_model_range(images_uint8: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1], the VQ-VAE's input convention."""
  return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def to_unit_range(x: jax.Array) -> jax.Array:
  """[-1, 1] -> [0, 1], without clipping (losses keep their gradient)."""
  return (x + 1.0) * 0.5


# ----------------------------------------------------------------------------- discriminator
class PatchDiscriminator(nn.Module):
  """VQGAN's `NLayerDiscriminator` (pix2pix PatchGAN): 4x4 convs, LeakyReLU 0.2, BatchNorm.

  conv(ndf, s2, bias) -> lrelu; for n in 1..n_layers-1: conv(ndf * min(2^n, 8), s2, no bias)
  -> BN -> lrelu; conv(ndf * min(2^n_layers, 8), s1, no bias) -> BN -> lrelu; conv(1, s1).
  Init (taming `weights_init`): conv weights N(0, 0.02), BN scale N(1, 0.02), bias 0.
  BatchNorm always uses the statistics of the batch it sees (the discriminator is only ever
  run in training mode); under jit over a sharded batch they are global (SyncBN-like).
  Input: images in [-1, 1]; output: (B, h', w') patch logits.
  """

  ndf: int = 64
  n_layers: int = 3

  @nn.compact
  def __call__(self, x):
    conv_init = nn.initializers.normal(0.02)

    def conv(h, features, stride, bias, name):
      return nn.Conv(
        features,
        (4, 4),
        strides=(stride, stride),
        padding=((1, 1), (1, 1)),
        use_bias=bias,
        kernel_init=conv_init,
        bias_init=vit.torch_default_bias_init(h.shape[-1] * 16),
        name=name,
      )(h)

    def bn(h, name):
      scale = self.param(
        f"{name}_scale", lambda k, s: 1.0 + 0.02 * jax.random.normal(k, s), (h.shape[-1],)
      )
      bias = self.param(f"{name}_bias", nn.initializers.zeros, (h.shape[-1],))
      h32 = h.astype(jnp.promote_types(h.dtype, jnp.float32))
      mean = jnp.mean(h32, axis=(0, 1, 2))
      var = jnp.mean(jnp.square(h32 - mean), axis=(0, 1, 2))  # biased, as torch BN
      return ((h32 - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias).astype(h.dtype)

    lrelu = lambda h: jax.nn.leaky_relu(h, 0.2)
    h = lrelu(conv(x, self.ndf, 2, True, "conv_0"))
    for n in range(1, self.n_layers + 1):
      stride = 2 if n < self.n_layers else 1
      h = conv(h, self.ndf * min(2**n, 8), stride, False, f"conv_{n}")
      h = lrelu(bn(h, f"bn_{n}"))
    return conv(h, 1, 1, True, f"conv_{self.n_layers + 1}")[..., 0]


# ----------------------------------------------------------------------------- sizes
def param_count(cfg: Mapping[str, Any] | None = None, image_size: int = 224) -> dict:
  """{'encoder', 'decoder', 'total'} trainable parameter counts (jax.eval_shape, no
  compute); the codebook (a collection) is not counted. For the paper's text (ch 64,
  ch_mult 1-2-4-8-16) this is far above the 37.5M its Table 2 reports for the tokenizer,
  which the paper's description does not let us reproduce."""
  model = vqvae_from_config(dict(cfg or {}))
  shapes = jax.eval_shape(
    model.init,
    jax.random.PRNGKey(0),
    jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32),
  )
  params = shapes["params"]
  count = lambda tree: int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
  enc = count(params["encoder"]) + count(params["quant_conv"])
  dec = count(params["decoder"]) + count(params["post_quant_conv"])
  return {"encoder": enc, "decoder": dec, "total": enc + dec}


# ----------------------------------------------------------------------------- tokenizer
class PeCoTokenizer:
  """A trained PeCo VQ-VAE as a frozen tokenizer.

  Expected view: Resize(shorter side = image_size) -> CenterCrop(image_size), uint8 RGB;
  the tokenizer maps it to [-1, 1] itself. Pure functions (`tokenize_fn`, `decode_fn`)
  take `params = {'vqvae': ..., 'codebook': ...}` so they can run inside jit.
  """

  def __init__(
    self,
    model: VQVAE,
    params: Any,
    codebook: Any,
    *,
    image_size: int,
    provenance: dict | None = None,
  ):
    self.model = model
    self.params = {
      "vqvae": jax.tree.map(jnp.asarray, params),
      "codebook": jax.tree.map(jnp.asarray, codebook),
    }
    self.image_size = int(image_size)
    self.provenance = dict(provenance or {})
    f = 2 ** (len(model.ch_mult) - 1)
    if self.image_size % f:
      raise ValueError(
        f"PeCo tokenizer: image size {self.image_size} is not a multiple of its {f}x down-sampling"
      )
    self._tokenize = jax.jit(self.tokenize_fn())
    self._decode = jax.jit(self.decode_fn())

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None) -> "PeCoTokenizer":
    """Restores params + the 'codebook' collection of a configs/peco_vqvae.py run."""
    from mim_jax import checkpoint  # pylint: disable=g-import-not-at-top

    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.exists(cfg_path):
      raise FileNotFoundError(f"{workdir} has no config.json: not a mim_jax training workdir")
    config = checkpoint.saved_config(workdir)
    if config.get("method", {}).get("name") != "peco_vqvae":
      raise ValueError(
        f"{workdir} was trained with method "
        f"{config.get('method', {}).get('name')!r}, not 'peco_vqvae'"
      )
    params, extra, step = checkpoint.read_trained_state(workdir, step)
    if "vqvae" not in params or "codebook" not in extra:
      raise ValueError(
        f"{workdir}: checkpoint has no 'vqvae' params or 'codebook' collection "
        f"(params {sorted(params)}, collections {sorted(extra)})"
      )
    model = vqvae_from_config(config["vqvae"])
    return cls(
      model,
      params["vqvae"],
      extra["codebook"],
      image_size=int(config["data"]["image_size"]),
      provenance={"workdir": os.path.abspath(workdir), "step": int(step), "vqvae": config["vqvae"]},
    )

  @property
  def codebook_size(self) -> int:
    return int(self.model.num_codes)

  def grid(self, image_size: int | None = None) -> tuple[int, int]:
    side = int(image_size or self.image_size) // (2 ** (len(self.model.ch_mult) - 1))
    return side, side

  @property
  def view(self) -> View:
    return View(self.image_size, self.image_size)

  def tokenize_fn(self):
    model = self.model

    def fn(params, images_uint8):
      q = model.apply(
        {"params": params["vqvae"], "codebook": params["codebook"]},
        to_model_range(images_uint8),
        train=False,
        method=VQVAE.encode,
      )
      return q.ids.reshape(q.ids.shape[0], -1).astype(jnp.int32)

    return fn

  def decode_fn(self):
    model = self.model
    grid = self.grid()

    def fn(params, ids):
      ids = jnp.asarray(ids, jnp.int32).reshape((-1,) + grid)
      x = model.apply(
        {"params": params["vqvae"], "codebook": params["codebook"]}, ids, method=VQVAE.decode_ids
      )
      return jnp.clip(to_unit_range(x), 0.0, 1.0)

    return fn

  def tokenize(self, images_uint8) -> jax.Array:
    images = jnp.asarray(images_uint8)
    if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(
        f"PeCo tokenizer expects (B, {self.image_size}, {self.image_size}, 3) "
        f"uint8 images, got {images.shape}"
      )
    return self._tokenize(self.params, images)

  def decode(self, ids) -> jax.Array:
    """(B, h*w) or (B, h, w) ids -> (B, H, W, 3) images in [0, 1]."""
    return self._decode(self.params, ids)

  def as_tokenizer(self) -> Tokenizer:
    return Tokenizer(
      "peco",
      self.tokenize_fn(),
      self.params,
      codebook_size=self.codebook_size,
      grid=self.grid(),
      view=self.view,
      provenance=self.provenance,
      decode_fn=self.decode_fn(),
    )


def load_as_tokenizer(path: str) -> Tokenizer:
  """`config.tokenizer.kind='peco'`: a configs/peco_vqvae.py training workdir."""
  return PeCoTokenizer.from_workdir(path).as_tokenizer()
