"""MaPeT: masked + permuted pre-training with two-stream attention (aimagelab/MaPeT:
models/mapet/mapet.py, utils/models.py, engine.py), and the MIM and PIM baselines of MaPeT
Table 1.

  mode='mapet'  per-sample permutation (cls first), the first `least_number` places are the
                context; position-aware mask tokens (one learned vector + the position
                embedding of each predicted token, in ascending token index) are appended to
                the content stream and start the query stream; masks of `two_stream.py`;
                final LN + Linear(D, vocab) on the query stream; CE over the predicted tokens.
  mode='pim'    the same two streams without the mask tokens in the content stream.
  mode='mim'    BERT-style: `num_masked` random patches replaced by a mask token, CE at them.

Layouts (config.method.layout): 'token' keeps every stream in token-index order with the
official code's per-sample masks; 'permuted' (the configs' default, 1.22x faster for
ViT-B/16 on CPU, BENCHMARKS.md §6) gathers the tokens into permutation order, where the masks
become one static prefix/causal pattern shared by the batch. The loss is the same (a mean
over the predictions; tests/test_mapet.py).

All weights are shared between the streams: they are one sequence [h, M, g] through the same
blocks, with a combined mask in which no row attends to g, so keys and values come from the
content stream only (exactly the two attentions of `DoubleAttentionPositionalAugmented` in
aimagelab/MaPeT:models/mapet/mapet.py; g's own keys are computed and masked out, 2P extra key
columns of compute), and one drop-path draw per sample covers both streams. Backbone: the
official timm ViT (q and kv Linear layers with biases = one qkv Linear with q/k/v biases
here, learned absolute positions, layer scale 0.1, LN eps 1e-6, trunc_normal(0.02) Linear
init, PyTorch-default patch conv, cls ~ N(0, 1e-6), no depth rescale). Its params use
mim_jax's ViT names, so the encoder loads into `vit.VisionTransformer(k_bias=True,
abs_pos='learned')` for evaluation. model.scan_layers / model.remat lay out and recompute the
blocks as they do for `vit.VisionTransformer` ('blocks' with a leading layer axis when
scanned; the same loss, tests/test_mapet.py).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mim_jax import masking
from mim_jax import two_stream
from mim_jax import visual
from mim_jax.data import transforms
from mim_jax.methods import common
from mim_jax.methods import token_targets
from mim_jax.models import vit

MODES = ("mapet", "pim", "mim")
# 'token': streams in token-index order with per-sample masks built from the permutation
# (the official code's layout, aimagelab/MaPeT:utils/models.py); 'permuted': streams in
# permutation order with one static prefix/causal mask (benchmarks/method_step_bench.py
# compares them).
LAYOUTS = ("token", "permuted")
_EXTRA_PARAMS = ("mask_positional_token", "mask_token", "decoder")

PREPARE_TOKENS = (
  "MaPeT reads pre-computed tokens (aimagelab/MaPeT:data/kmeans/): 1) prepare ImageNet "
  "(TFDS: `tfds build imagenet2012 --manual_dir=DIR`, or an imagefolder); 2) build the "
  "k-CLIP tokenizer: `python -m mim_jax.tokenizers.kclip --config=configs/kclip_rn50x64.py "
  "--config.clip=RN50x64.pt --config.data.path=... --config.out=$DATA/kclip_rn50x64`; "
  "3) tokenize the training set once: `python -m mim_jax.tokenize "
  "--config=configs/tokenize.py:tokenizer=kclip --config.tokenizer.path=$DATA/kclip_rn50x64 "
  "--config.data.path=... --config.cache.path=$DATA/tokens/kclip_train`; then pass "
  "--config.tokenizer.cache=$DATA/tokens/kclip_train (or --config.tokenizer.path=... for "
  "online tokenization). For a CPU smoke run use configs/mapet_vitb.py:runlocal"
)


class MaPeTModel(nn.Module):
  """The two-stream ViT (or one stream for mode='mim'). Returns fp32 logits (B, P, vocab)."""

  vit_kw: dict
  vocab_size: int
  mode: str = "mapet"

  @nn.compact
  def __call__(
    self,
    images,
    *,
    attn_mask=None,
    pred=None,
    mask=None,
    select=None,
    content_order=None,
    train: bool = False,
  ):
    kw = self.vit_kw
    d, p, dtype = kw["embed_dim"], kw["patch_size"], kw.get("dtype", jnp.float32)
    b = images.shape[0]
    x = nn.Conv(
      d,
      (p, p),
      strides=(p, p),
      padding="VALID",
      dtype=dtype,
      kernel_init=nn.with_logical_partitioning(
        vit.torch_default_init(), (None, None, None, "embed")
      ),
      bias_init=nn.with_logical_partitioning(vit.torch_default_bias_init(p * p * 3), ("embed",)),
      name="patch_embed",
    )(images)
    x = x.reshape(b, -1, d)
    token_init = nn.with_logical_partitioning(
      vit.trunc_normal_init(0.02, "abs2"), (None, None, "embed")
    )
    if self.mode == "mim":
      mask_token = self.param("mask_token", token_init, (1, 1, d))
      w = mask[..., None].astype(x.dtype)
      x = x * (1 - w) + mask_token.astype(x.dtype) * w
    cls = self.param(
      "cls_token",
      nn.with_logical_partitioning(nn.initializers.normal(1e-6), (None, None, "embed")),
      (1, 1, d),
    )
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
    pos = self.param("pos_embed", token_init, (1, x.shape[1], d))
    x = x + pos.astype(x.dtype)
    num_real = x.shape[1]
    if content_order is not None:  # the permuted layout: content tokens in perm order
      x = jnp.take_along_axis(x, content_order[..., None], axis=1)

    kv_len = None
    if self.mode != "mim":
      m_pos = self.param("mask_positional_token", token_init, (1, 1, d))
      queries = (m_pos + jnp.take(pos[0], pred, axis=0)).astype(x.dtype)  # (B, P, D)
      parts = [x, queries, queries] if self.mode == "mapet" else [x, queries]
      x = jnp.concatenate(parts, axis=1)
      # The query stream g (the last P tokens) asks but is attended to by no token: only
      # the content stream ([h, M] or h) gives keys and values (BENCHMARKS.md §10).
      kv_len = x.shape[1] - queries.shape[1]
    x = nn.with_logical_constraint(x, vit.ACT_AXES)

    block_kw = dict(
      dim=d,
      num_heads=kw["num_heads"],
      layer_scale_init=kw["layer_scale_init"],
      weight_init="timm",
      k_bias=True,
      dtype=dtype,
      kv_len=kv_len,
    )
    x = common.transformer_blocks(
      x,
      depth=kw["depth"],
      block_kw=block_kw,
      drop_path_rate=kw.get("drop_path_rate", 0.0),
      scan=kw.get("scan_layers", False),
      remat=kw.get("remat", False),
      train=train,
      attn_mask=None if attn_mask is None else attn_mask[:, None],
    )
    if self.mode == "mim":
      out = jnp.take_along_axis(x[:, 1:num_real], select[..., None], axis=1)
    else:
      out = x[:, x.shape[1] - pred.shape[1] :]  # the query stream
    out = vit._apply_norm(vit.layer_norm(1e-6, jnp.float32, "norm"), out)  # pylint: disable=protected-access
    logits = vit.Dense(
      self.vocab_size,
      dtype=dtype,
      name="decoder",
      kernel_init=nn.with_logical_partitioning(
        vit.trunc_normal_init(0.02, "abs2"), ("embed", "vocab")
      ),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
    )(out)
    return logits.astype(jnp.float32)


class MaPeT:
  """The MaPeT / PIM / MIM plug-in (interface: mim_jax/methods/__init__.py)."""

  @staticmethod
  def check(config) -> None:
    """Before any data is read: the targets must be given."""
    t = config.tokenizer
    if not t.get("cache", "") and not t.get("path", "") and not t.get("build_if_missing"):
      raise ValueError(
        "config.tokenizer.cache and config.tokenizer.path are empty. " + PREPARE_TOKENS
      )

  def __init__(self, config, *, workdir: str | None = None, source=None):
    self.check(config)
    self.config = config
    m = config.method
    if m.mode not in MODES:
      raise ValueError(f"config.method.mode must be one of {MODES}, got {m.mode!r}")
    if m.get("layout", "token") not in LAYOUTS:
      raise ValueError(f"config.method.layout must be one of {LAYOUTS}, got {m.layout!r}")
    self.vit_kw = common.backbone_kwargs(config.model, config.dtype)
    self.patch, self.grid = common.patch_grid(config)
    self.num_patches = self.grid[0] * self.grid[1]
    t = self.num_patches + 1
    if m.mode != "mim" and not 1 <= m.least_number < t:
      raise ValueError(
        f"config.method.least_number={m.least_number} (the cutting point) must be in [1, {t - 1}]"
      )
    if m.mode == "mim" and not 0 < m.num_masked <= self.num_patches:
      raise ValueError(
        f"config.method.num_masked={m.num_masked} must be in [1, {self.num_patches}]"
      )
    self.targets = token_targets.TokenTargets(
      config, self.grid, patch_size=self.patch, workdir=workdir, source=source
    )
    self.model = MaPeTModel(self.vit_kw, self.targets.vocab_size, mode=m.mode)

  # ---------------------------------------------------------------- plug-in interface
  def wrap_source(self, source):
    return self.targets.wrap_source(source)

  def consts(self) -> dict:
    return self.targets.consts()

  def frozen_fingerprint(self) -> dict[str, str]:
    return self.targets.frozen_fingerprint()

  def fingerprint(self) -> dict:
    c = self.config
    return {
      "method": "mapet",
      "method.mode": c.method.mode,
      "model.variant": c.model.variant,
      "model.width": c.model.width,
      "model.depth": c.model.depth,
      "model.heads": c.model.heads,
      "model.scan_layers": c.model.scan_layers,
      "vocab_size": self.targets.vocab_size,
      "data.image_size": c.data.image_size,
    }

  def prepare(self, example: dict, rng: np.random.Generator) -> dict:
    """A permutation (cls first) or a random mask per example: O(N) host work."""
    m = self.config.method
    if m.mode == "mim":
      example["mask"] = masking.random_mask(rng, self.num_patches, m.num_masked)
    else:
      example["perm"] = np.concatenate([[0], rng.permutation(self.num_patches) + 1]).astype(
        np.int32
      )
    if not self.targets.online:
      example.pop("image2", None)
    return example

  def _inputs(self, batch):
    m = self.config.method
    if m.mode == "mim":
      select = common.selected_positions(batch["mask"], m.num_masked)
      return dict(mask=batch["mask"], select=select), select
    if m.get("layout", "token") == "permuted":
      # One static prefix/causal mask; tokens gathered into permutation order, predictions
      # in permutation order (the loss is a mean, so the order does not change it).
      mask = two_stream.permuted_layout_mask(
        self.num_patches + 1, m.least_number, with_mask_tokens=m.mode == "mapet"
      )
      pred = batch["perm"][:, m.least_number :]
      return dict(
        attn_mask=jnp.asarray(mask)[None], pred=pred, content_order=batch["perm"]
      ), pred - 1
    attn_mask, pred = two_stream.two_stream_masks(
      batch["perm"], m.least_number, with_mask_tokens=m.mode == "mapet"
    )
    return dict(attn_mask=attn_mask, pred=pred), pred - 1  # patch index = token index - 1

  def init(self, rng, batch) -> Any:
    b = batch["image"].shape[0]
    size = self.config.data.image_size
    if self.config.method.mode == "mim":
      num_masked = self.config.method.num_masked
      fake = {"mask": jnp.zeros((b, self.num_patches), bool).at[:, :num_masked].set(True)}
    else:
      fake = {
        "perm": jnp.broadcast_to(
          jnp.arange(self.num_patches + 1, dtype=jnp.int32), (b, self.num_patches + 1)
        )
      }
    kwargs, _ = self._inputs(fake)
    images = jnp.zeros((b, size, size, 3), self.vit_kw["dtype"])
    return self.model.init({"params": rng}, images, train=False, **kwargs)

  def forward(self, params, consts, batch, rng, train: bool):
    """(logits (B, P, V), targets (B, P)) over the predicted (or masked) patches."""
    kwargs, patch_idx = self._inputs(batch)
    x = transforms.normalize(batch["image"], dtype=jnp.float32)
    logits = self.model.apply(
      {"params": params},
      x.astype(self.vit_kw["dtype"]),
      train=train,
      rngs={"dropout": rng} if train else {},
      **kwargs,
    )
    targets = jnp.take_along_axis(self.targets(consts, batch), patch_idx, axis=1)
    return logits, targets

  def loss(self, params, extra, consts, batch, rng, train: bool = True):
    del extra
    logits, targets = self.forward(params, consts, batch, rng, train)
    loss = common.token_cross_entropy(logits, targets).mean()
    return loss, {"loss": loss, "token_acc": common.token_accuracy(logits, targets)}, {}

  @staticmethod
  def encoder_params(params):
    return {k: v for k, v in params.items() if k not in _EXTRA_PARAMS}

  def visualize(self, params, extra, consts, batch, max_images: int = 2):
    """The two-stream attention of one permutation per image (MaPeT §4.1): the input with
    the predicted patches grey, the mask in token order ([h, M, g] x [h, M, g], white = may
    attend) and the same mask in permutation order, the static prefix/causal pattern of the
    'permuted' layout. In 'mim' mode: input and masked input."""
    del params, extra, consts
    m = self.config.method
    img = np.asarray(batch["image"][:max_images], np.float32) / 255.0
    p, gw = self.patch, self.grid[1]
    if m.mode == "mim":
      masked = visual.tint(img, np.asarray(batch["mask"][:max_images]), (0.5,) * 3, p, gw, 1.0)
      return visual.labelled_grid([("input", img), ("masked", masked)], ["#1", "#2"][: len(img)])
    perm = np.asarray(batch["perm"][:max_images])
    with_m = m.mode == "mapet"
    masks, _ = two_stream.two_stream_masks(
      jnp.asarray(perm), m.least_number, with_mask_tokens=with_m
    )
    static = np.asarray(
      two_stream.permuted_layout_mask(perm.shape[1], m.least_number, with_mask_tokens=with_m)
    )
    side = max(img.shape[1], static.shape[0])
    side *= max(1, 160 // side)

    def square(x):
      x = (np.clip(x, 0, 1) * 255).astype(np.uint8)
      return np.asarray(Image.fromarray(x).resize((side, side), Image.NEAREST))

    rows = []
    for i in range(len(img)):
      predicted = np.zeros((self.num_patches,), bool)
      predicted[perm[i, m.least_number :] - 1] = True
      shown = visual.tint(img[i : i + 1], predicted[None], (0.5,) * 3, p, gw, 1.0)[0]
      panels = [square(shown), square(np.asarray(masks[i], np.float32)), square(static * 1.0)]
      rows.append(
        (
          f"#{i + 1}",
          np.stack([np.repeat(x[..., None], 3, -1) if x.ndim == 2 else x for x in panels]),
        )
      )
    streams = "[h, M, g]" if with_m else "[h, g]"
    cols = ["input, predicted grey", f"mask, token order {streams}", "mask, permutation order"]
    return visual.labelled_grid(rows, cols, cell=side)
