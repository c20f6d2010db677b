r"""Analytic FLOPs of one training step of every pre-training method, from formulas.

`step_flops(config)` counts what one optimizer step of `config` (a configs/*.py ConfigDict)
needs for its whole global batch (config.batch_size), so that it can be set beside XLA's
count of the compiled step (`python -m mim_jax.aot`, `aot.xla_step_flops`). Nothing is
traced or built: widths, depths and token counts come from the config and the formulas
below, so the count does not depend on config.model.scan_layers or on the dtype.

What is counted. Matmuls and convolutions only, 2 FLOPs per multiply-add: the Linear layers,
the patch-embedding and VQ-VAE / ResNet convolutions (only the multiply-adds that fall on
real pixels, not on zero padding, which is also how XLA counts them), the attention score
(Q K^T) and attention-times-value products, and the distance matmuls of codebook lookups
(z . c^T). Not counted: elementwise work (norms, softmax, GELU, residual adds, losses), gathers,
the optimizer, the k-means codebook init of VQ-KD's first step (a lax.cond, once per run),
and remat's recomputation: these are *model* FLOPs, so config.model.remat=True does not
change them either (a remat step runs one more forward of the rematerialised blocks).

How parts are weighted.
  trainable  everything that gets gradients: forward x3 (forward, gradient w.r.t. the input,
             gradient w.r.t. the weights); a layer whose input needs no gradient (a patch
             embedding or first conv on the image) x2. A codebook lookup inside a trained
             tokenizer (VQ-KD, PeCo VQ-VAE) runs forward only (its distances are
             stop_gradient'ed) and is counted x1 here.
  frozen     forward passes of frozen networks inside the step, x1: the online tokenizer on
             `image2` at config.data.second_image_size (token_targets.py), CLIP teachers
             (VQ-KD, CAE v2), PeCo's perceptual network. Where a frozen network's *output is
             differentiated* (the perceptual network on the reconstruction), its backward pass
             to the input is counted here too: weight matmuls x2, attention products x3.
  total      trainable + frozen. Finer keys name the parts (encoder, heads, tokenizer, ...).

Per method (files in mim_jax/methods/; N patches, T = N + 1 tokens with cls, D width, M
masked, V visible = N - M; a ViT block on n tokens is 24 n D^2 + 4 n^2 D):
  beitv2 / peco_mim  ViT on T tokens; lm_head on the M masked positions, applied twice when the
                     aggregation head is on (BEiT v2 §2.3: `head_layers` blocks on [final cls,
                     layer-`early_layers` patches], T tokens, sharing the lm_head). Last
                     blocks are counted as read: q, attention rows, proj and MLP at the M
                     masked tokens (the backbone's also at the cls with the aggregation
                     head), k and v at all T (vit.Block's outputs_at).
  peco_mae           PeCo Table 8 = MAE (He et al. §3): encoder on 1 + V tokens, decoder_embed,
                     decoder blocks on T tokens of width decoder_dim, decoder_pred on the M
                     masked tokens.
  mapet              MaPeT §4.1 two-stream attention: the content stream [h (T), mask tokens
                     (P = T - least_number)] is a ViT on T + P tokens; the query stream g (P
                     tokens) needs per block only its query projection, attention over the
                     T + P content keys, proj and MLP; the head on the P predictions. 'pim'
                     has no mask tokens (content T tokens), 'mim' is BERT-style (T tokens, head
                     on num_masked).
  ccvit              CCViT §4: BEiT v2 backbone on T tokens; lm_head and the pixel head on the
                     num_masked + num_replaced = S selected positions; the pixel block
                     (`head_layers` blocks on T tokens); the centroid tokenizer's distances
                     at the selected patches of image2 only (frozen; methods/ccvit.py). The
                     last block of the backbone is read at the cls and the S selected tokens
                     only, the pixel block's last at the S: their q, attention rows, proj and
                     MLP are counted on those tokens, k and v on all T (methods/ccvit.py).
  caev2              CAE v2 §2.2: encoder on 1 + V tokens; encoder_to_regresser when the
                     regressor is narrower; per regressor block q/proj/MLP on M queries and
                     k/v on V + M keys, attention M x (V + M); the head on all T tokens; the
                     CLIP teacher on all T of its tokens (ln_post + proj included).
  vqkd               BEiT v2 §2.2: ViT encoder, encode_task_layer, the 8192 x 32 lookup, a
                     patch-1 ViT decoder over the code map (T tokens), decode_task_layer; the
                     CLIP ViT-B/16 teacher.
  peco_vqvae         PeCo Eq. 3-5, 8 / VQGAN: conv encoder + quant_conv, the lookup,
                     post_quant_conv + decoder; the perceptual ViT (forward on x; forward +
                     backward-to-input on the reconstruction, up to the deepest feature layer);
                     with config.gan the PatchGAN on x, and on the reconstruction one forward,
                     a backward to its input (generator term) and one to the weights
                     (discriminator term).
Online tokenizers / teachers have the architecture that `tokenizers.base.random_tokenizer`
builds when the file is absent (VQ-KD: ViT-B/patch encoder + task layer + K x 32 lookup; PeCo:
`tokenizers.peco.DEFAULTS` encoder + K x embed_dim lookup; k-CLIP: CLIP RN50x64 to layer 4 +
K x 4096 lookup; pixel centroids: the K x 3p^2 lookup), the CLIP teacher is
`random:<config.teacher.arch or ViT-B/16>,image_size=<its view>` unless config.teacher.random_init
names one; a token cache (config.tokenizer.cache, MaPeT's default) costs nothing in the step.

What the implementation computes beyond this count is listed by `implementation_overhead`:
  * (fixed) MaPeT used to run [h (T), M (P), g (P)] through each block as one sequence, so
    it projected keys and values of the P queries, which no row attends to, and scored all
    (T + 2P)^2 pairs: +20.5 GFLOP per image on ViT-B/16 (+7.8 %). vit.Attention's `kv_len`
    now gives keys and values for the content stream only (BENCHMARKS.md §10).
  * PeCo-MAE and CAE v2 embed all N patches before dropping the masked ones (models/vit.py
    VisionTransformer._embed, then `keep`); only the V visible ones are needed (+0.2 %).
  * BEiT v2, PeCo (MIM) and CCViT under model.scan_layers: the scanned backbone runs its last
    block on all T tokens (one body for every layer), where 1 + M (PeCo: M; CCViT: 1 + S)
    are read (+2-3 % on ViT-B/16, +2 % on ViT-L/16).
  * peco_vqvae with the GAN runs the discriminator twice on the reconstruction (once with
    stop_gradient'ed weights, once on the stop_gradient'ed image; methods/peco_vqvae.py
    `loss`); one forward serves both backward passes (+0.65 %).
Not counted as overhead (negligible): the ln_post + proj of the CLIP cls token VQ-KD drops, and
lookups of tokens at positions no loss reads. XLA's count differs in ways that are not
overhead: it adds elementwise work (1-2 % for paper-size ViTs, 3-7 % at the 128-d `:runlocal`
widths), counts the body of a while loop once (so the chunked `kmeans.assign`, 4096 rows a
chunk, of CCViT's and k-CLIP's lookups is undercounted when B x N > 4096), and counts one
iteration of VQ-KD's k-means init.
"""

from __future__ import annotations

TRAIN = 3.0  # forward + gradient w.r.t. the input + gradient w.r.t. the weights
NO_INPUT_GRAD = 2.0  # the input is data: forward + weight gradient
RANDOM = "random:"


# ------------------------------------------------------------------------------ primitives
def dense(tokens: float, d_in: int, d_out: int) -> float:
  """Forward FLOPs of a Linear layer applied to `tokens` vectors."""
  return 2.0 * tokens * d_in * d_out


def attention(queries: float, keys: float, dim: int) -> float:
  """Q K^T and probs @ V of `queries` rows over `keys` columns, all heads (width `dim`)."""
  return 4.0 * queries * keys * dim


def block(queries: float, dim: int, keys=None, kv_tokens=None, hidden=None) -> tuple[float, float]:
  """(weight matmuls, attention products) of one pre-norm transformer block: q and proj on
  `queries` tokens, k and v on `kv_tokens` (default: the keys), attention over `keys`
  (default: the queries, self-attention), an MLP of width `hidden` (default 4 dim)."""
  keys = queries if keys is None else keys
  kv_tokens = keys if kv_tokens is None else kv_tokens
  hidden = 4 * dim if hidden is None else hidden
  weights = 2.0 * dense(queries, dim, dim) + 2.0 * dense(kv_tokens, dim, dim)
  weights += dense(queries, dim, hidden) + dense(queries, hidden, dim)
  return weights, attention(queries, keys, dim)


def vit(tokens: float, dim: int, depth: int, hidden: int | None = None) -> tuple[float, float]:
  """(weight matmuls, attention products) of `depth` self-attention blocks on `tokens`."""
  w, a = block(tokens, dim, hidden=hidden)
  return depth * w, depth * a


def _taps(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> tuple[int, int]:
  """(output size, kernel taps that land on the input, summed over outputs) along one axis."""
  out = (size + pad[0] + pad[1] - kernel) // stride + 1
  taps = sum(1 for o in range(out) for t in range(kernel) if 0 <= o * stride - pad[0] + t < size)
  return out, taps


def conv(
  size: int, c_in: int, c_out: int, kernel: int, stride: int = 1, pad: tuple[int, int] | None = None
) -> tuple[float, int]:
  """(forward FLOPs, output size) of a 2-D convolution on a size x size map; `pad` per side
  (default kernel // 2 both sides, i.e. 'SAME' at stride 1). Multiply-adds on zero padding
  are not counted (XLA's convention)."""
  pad = (kernel // 2, kernel // 2) if pad is None else pad
  out, taps = _taps(size, kernel, stride, pad)
  return 2.0 * taps * taps * c_in * c_out, out


# ------------------------------------------------------------------------------ architectures
def _student(config) -> dict:
  """Width, depth, patch size and patch count of config.model (common.backbone_kwargs)."""
  from mim_jax.models import vit as vit_lib  # pylint: disable=g-import-not-at-top

  kw = vit_lib.vit_kwargs(config.model.variant)
  for field, key in (("width", "embed_dim"), ("depth", "depth"), ("heads", "num_heads")):
    if config.model.get(field, 0):
      kw[key] = int(config.model[field])
  p = kw["patch_size"]
  return dict(dim=kw["embed_dim"], depth=kw["depth"], patch=p, n=(config.data.image_size // p) ** 2)


def _clip_vit(arch: dict) -> tuple[float, float, float]:
  """(conv1, weight matmuls incl. ln_post + proj of every token, attention) of a CLIP ViT."""
  n = (arch["image_size"] // arch["patch_size"]) ** 2
  w = arch["width"]
  weights, att = vit(n + 1, w, arch["layers"])
  return (
    dense(n, 3 * arch["patch_size"] ** 2, w),
    weights + dense(n + 1, w, arch["output_dim"]),
    att,
  )


def _resnet_layer4(arch: dict, size: int) -> tuple[float, int, int]:
  """(FLOPs, grid side, channels) of a CLIP ModifiedResNet up to layer 4 (teachers/clip.py):
  3-conv stem, avgpool 2, Bottlenecks 1x1 -> 3x3 -> avgpool(stride) -> 1x1 (+ downsample)."""
  w, total = arch["width"], 0.0
  for c_in, c_out, stride in ((3, w // 2, 2), (w // 2, w // 2, 1), (w // 2, w, 1)):
    f, size = conv(size, c_in, c_out, 3, stride)
    total += f
  size //= 2
  inplanes = w
  for stage, depth in enumerate(arch["layers"]):
    planes = w * 2**stage
    for j in range(depth):
      stride = 2 if stage and j == 0 else 1
      total += conv(size, inplanes, planes, 1)[0] + conv(size, planes, planes, 3)[0]
      size //= stride
      total += conv(size, planes, 4 * planes, 1)[0]
      if stride > 1 or inplanes != 4 * planes:
        total += conv(size, inplanes, 4 * planes, 1)[0]
      inplanes = 4 * planes
  return total, size, inplanes


def _resblock(size: int, c_in: int, c_out: int) -> float:
  f = conv(size, c_in, c_out, 3)[0] + conv(size, c_out, c_out, 3)[0]
  return f + (conv(size, c_in, c_out, 1)[0] if c_in != c_out else 0.0)


def _attnblock(size: int, c: int) -> tuple[float, float]:
  """VQGAN's single-head AttnBlock: q, k, v, proj_out 1x1 convs; attention over size^2."""
  return 4.0 * dense(size * size, c, c), attention(size * size, size * size, c)


def _vqvae_encoder(v: dict, size: int) -> tuple[float, float, float, int]:
  """(conv_in, other convs incl. quant_conv, attention, latent side) of tokenizers/peco.py's
  Encoder + quant_conv."""
  ch, mult = v["ch"], tuple(v["ch_mult"])
  first, _ = conv(size, 3, ch, 3)
  rest, c = 0.0, ch
  for level, m in enumerate(mult):
    for _ in range(v["num_res_blocks"]):
      rest += _resblock(size, c, ch * m)
      c = ch * m
    if level != len(mult) - 1:  # Downsample: pad (0, 1), 3x3 stride 2
      f, size = conv(size, c, c, 3, 2, (0, 1))
      rest += f
  w, att = _attnblock(size, c)
  rest += 2.0 * _resblock(size, c, c) + w + conv(size, c, v["z_channels"], 3)[0]
  rest += conv(size, v["z_channels"], v["embed_dim"], 1)[0]
  return first, rest, att, size


def _vqvae_decoder(v: dict, size: int) -> tuple[float, float]:
  """(convs incl. post_quant_conv, attention) of tokenizers/peco.py's Decoder."""
  ch, mult = v["ch"], tuple(v["ch_mult"])
  c = ch * mult[-1]
  total = conv(size, v["embed_dim"], v["z_channels"], 1)[0] + conv(size, v["z_channels"], c, 3)[0]
  w, att = _attnblock(size, c)
  total += 2.0 * _resblock(size, c, c) + w
  for level in reversed(range(len(mult))):
    for _ in range(v["num_res_blocks"]):
      total += _resblock(size, c, ch * mult[level])
      c = ch * mult[level]
    if level:  # nearest x2, then a 3x3 conv
      size *= 2
      total += conv(size, c, c, 3)[0]
  return total + conv(size, c, 3, 3)[0], att


def _patchgan(ndf: int, n_layers: int, size: int) -> tuple[float, float]:
  """(first conv, other convs) of tokenizers/peco.py's PatchDiscriminator (4x4, pad 1)."""
  first, size = conv(size, 3, ndf, 4, 2, (1, 1))
  rest, c = 0.0, ndf
  for n in range(1, n_layers + 1):
    f, size = conv(size, c, ndf * min(2**n, 8), 4, 2 if n < n_layers else 1, (1, 1))
    rest, c = rest + f, ndf * min(2**n, 8)
  return first, rest + conv(size, c, 1, 4, 1, (1, 1))[0]


# ------------------------------------------------------------------------------ tallies
class _Tally:
  """Per-image FLOPs by part, each part in the 'trainable' or the 'frozen' bucket."""

  def __init__(self):
    self.parts: dict[str, tuple[str, float]] = {}

  def add(self, name: str, flops: float, bucket: str = "trainable"):
    old = self.parts.get(name, (bucket, 0.0))[1]
    self.parts[name] = (bucket, old + flops)

  def train(self, name: str, weights: float = 0.0, att: float = 0.0, on_data: float = 0.0):
    """A trained part: x3, except matmuls whose input is data (x2)."""
    self.add(name, TRAIN * (weights + att) + NO_INPUT_GRAD * on_data)

  def frozen(self, name: str, flops: float):
    self.add(name, flops, "frozen")

  def result(self, batch: int) -> dict[str, float]:
    out = {name: batch * v for name, (_, v) in self.parts.items()}
    for bucket in ("trainable", "frozen"):
      out[bucket] = batch * sum(v for b, v in self.parts.values() if b == bucket)
    out["total"] = out["trainable"] + out["frozen"]
    return out


def _codebook_size(t) -> int:
  """K of a 'random:K' stand-in (or token cache), else config.tokenizer.k, else 8192."""
  for spec in (t.get("cache", ""), t.get("path", "")):
    if str(spec).startswith(RANDOM) and str(spec)[len(RANDOM) :].isdigit():
      return int(str(spec)[len(RANDOM) :])
  return int(t.get("k", 0) or 8192)


def _reads_cache(config) -> bool:
  """Targets from a token cache: config.tokenizer.cache, or MaPeT with neither a cache nor a
  tokenizer named (its paper setting; aot's stand-in does the same)."""
  t = config.tokenizer
  if t.get("cache", ""):
    return True
  named = t.get("path", "") or t.get("build_if_missing", False)
  return not named and config.method.name == "mapet"


def _online_tokenizer(config, tally: _Tally, patch: int):
  """The frozen tokenizer run on image2 (token_targets.TokenTargets), as random_tokenizer
  builds it (mim_jax/tokenizers/base.py)."""
  if _reads_cache(config):
    return
  t, size = config.tokenizer, int(config.data.second_image_size)
  k = _codebook_size(t)
  n = (size // patch) ** 2
  if t.kind == "centroids":
    tally.frozen("tokenizer", dense(n, 3 * patch * patch, k))
  elif t.kind == "vqkd":
    d, depth = 768, 12  # ViT-B/patch encoder, encode_task_layer to 32-d codes
    w, a = vit(n + 1, d, depth)
    f = dense(n, 3 * patch * patch, d) + w + a + dense(n, d, d) + dense(n, d, 32)
    tally.frozen("tokenizer", f + dense(n, 32, k))
  elif t.kind == "peco":
    from mim_jax.tokenizers import peco  # pylint: disable=g-import-not-at-top

    first, rest, att, side = _vqvae_encoder(peco.DEFAULTS, size)
    tally.frozen("tokenizer", first + rest + att + dense(side**2, peco.DEFAULTS["embed_dim"], k))
  elif t.kind == "kclip":
    from mim_jax.teachers import clip  # pylint: disable=g-import-not-at-top

    f, side, channels = _resnet_layer4(clip.CLIP_VISION_CONFIGS["RN50x64"], size)
    tally.frozen("tokenizer", f + dense(side**2, channels, k))
  else:
    raise ValueError(f"config.tokenizer.kind={t.kind!r}: no FLOP formula")


def _clip_teacher(config, size: int) -> dict:
  """The CLIP teacher's architecture: config.teacher.random_init, else the stand-in of
  config.teacher.arch (default ViT-B/16) at `size` px."""
  from mim_jax.teachers import clip  # pylint: disable=g-import-not-at-top

  t = config.teacher
  spec = t.get("random_init", "") if not t.path else ""
  spec = spec or f"random:{t.get('arch', '') or 'ViT-B/16'},image_size={size}"
  return clip.parse_random_spec(spec)[0]


# ------------------------------------------------------------------------------ methods
def _beitv2(config, tally: _Tally, s: dict):
  m, d, n = config.method, s["dim"], s["n"]
  encoder = _last_block_read_at(n + 1, _backbone_read_at(config, s), d, s["depth"])
  tally.train("encoder", *encoder, on_data=dense(n, 3 * s["patch"] ** 2, d))
  if m.head_layers:
    tally.train("aggregation", *_last_block_read_at(n + 1, m.num_masked, d, m.head_layers))
  # Logits only at the M masked positions (the loss reads no others); main + aggregation branch.
  heads = 2 if m.head_layers else 1
  tally.train("lm_head", heads * dense(m.num_masked, d, _codebook_size(config.tokenizer)))
  _online_tokenizer(config, tally, s["patch"])


def _peco_mae(config, tally: _Tally, s: dict):
  m, d, n = config.method, s["dim"], s["n"]
  vis = n - m.num_masked  # the encoder (its patch embedding too) needs the visible patches only
  tally.train("encoder", *vit(vis + 1, d, s["depth"]), on_data=dense(vis, 3 * s["patch"] ** 2, d))
  w, a = vit(n + 1, m.decoder_dim, m.decoder_depth)
  w += dense(vis + 1, d, m.decoder_dim)  # decoder_embed
  w += dense(m.num_masked, m.decoder_dim, _codebook_size(config.tokenizer))  # decoder_pred
  tally.train("decoder", w, a)
  _online_tokenizer(config, tally, s["patch"])


def _mapet_streams(config, s: dict) -> tuple[int, int]:
  """(content tokens, query tokens): MaPeT T + P and P, PIM T and P."""
  t = s["n"] + 1
  p = t - config.method.least_number
  return (t + p if config.method.mode == "mapet" else t), p


def _mapet(config, tally: _Tally, s: dict):
  m, d, n, depth = config.method, s["dim"], s["n"], s["depth"]
  on_data = dense(n, 3 * s["patch"] ** 2, d)
  if m.mode == "mim":
    tally.train("encoder", *vit(n + 1, d, depth), on_data=on_data)
    predicted = m.num_masked
  else:
    content, predicted = _mapet_streams(config, s)
    tally.train("encoder", *vit(content, d, depth), on_data=on_data)  # content stream
    # Query stream: q, proj, MLP of its own; keys / values are the content stream's. Masked
    # attention is counted dense over the allowed [h, M] columns, as the paper's masks are.
    w, a = block(predicted, d, keys=content, kv_tokens=0)
    tally.train("query_stream", depth * w, depth * a)
  tally.train("head", dense(predicted, d, _codebook_size(config.tokenizer)))
  _online_tokenizer(config, tally, s["patch"])


def _last_block_read_at(tokens: int, read: int, dim: int, depth: int) -> tuple[float, float]:
  """(weights, attention) of `depth` blocks on `tokens` whose last one is read at `read` of
  them only (vit.Block's outputs_at): its q, proj, MLP and attention rows there alone."""
  if not depth:
    return 0.0, 0.0
  w, a = vit(tokens, dim, depth - 1)
  w_last, a_last = block(read, dim, keys=tokens)
  return w + w_last, a + a_last


def _backbone_read_at(config, s: dict) -> int:
  """Tokens at which BEiT v2's, PeCo's and CCViT's backbones are read in their last layer:
  the predicted positions, and the cls when an extra head reads it; all when that head reads
  the last layer's patches too (methods/beitv2.py, methods/ccvit.py)."""
  m = config.method
  predicted = m.num_masked + (m.num_replaced if m.name == "ccvit" else 0)
  if not m.get("head_layers", 0) and m.name != "ccvit":
    return predicted
  return s["n"] + 1 if m.early_layers >= s["depth"] else 1 + predicted


def _scan_overhead(config) -> float:
  """FLOPs per image a scanned backbone spends running its last block on every token."""
  s = _student(config)
  full = sum(block(s["n"] + 1, s["dim"]))
  read = sum(block(_backbone_read_at(config, s), s["dim"], keys=s["n"] + 1))
  return TRAIN * (full - read)


def _ccvit(config, tally: _Tally, s: dict):
  m, d, n, p = config.method, s["dim"], s["n"], s["patch"]
  selected, k = m.num_masked + m.num_replaced, _codebook_size(config.tokenizer)
  encoder = _last_block_read_at(n + 1, _backbone_read_at(config, s), d, s["depth"])
  tally.train("encoder", *encoder, on_data=dense(n, 3 * p * p, d))
  tally.train("lm_head", dense(selected, d, k))
  w, a = _last_block_read_at(n + 1, selected, d, m.head_layers)
  tally.train("pixel_block", w + dense(selected, d, 3 * p * p), a)
  tally.frozen("tokenizer", dense(selected, 3 * p * p, k))  # nearest centroid, selected only


def _caev2(config, tally: _Tally, s: dict):
  m, d, n = config.method, s["dim"], s["n"]
  vis, r = n - m.num_masked, m.regressor_dim
  tally.train("encoder", *vit(vis + 1, d, s["depth"]), on_data=dense(vis, 3 * s["patch"] ** 2, d))
  arch = _clip_teacher(config, int(config.data.second_image_size))
  w, a = block(m.num_masked, r, keys=n, kv_tokens=n)  # queries over [visible, queries]
  w, a = m.regressor_depth * w, m.regressor_depth * a
  w += (dense(vis + 1, d, r) if r != d else 0.0) + dense(n + 1, r, arch["output_dim"])
  tally.train("regressor_and_head", w, a)
  tally.frozen("teacher", sum(_clip_vit(arch)))


def _vqkd(config, tally: _Tally, s: dict):
  from mim_jax.tokenizers import vqkd  # pylint: disable=g-import-not-at-top

  q = dict(vqkd.DEFAULTS, **dict(config.get("vqkd", {})))
  d, n, p = s["dim"], s["n"], s["patch"]
  w, a = vit(n + 1, d, s["depth"])
  w += dense(n, d, d) + dense(n, d, q["code_dim"])  # encode_task_layer
  tally.train("encoder", w, a, on_data=dense(n, 3 * p * p, d))
  tally.add("quantizer", dense(n, q["code_dim"], q["num_codes"]))  # forward only
  dd = int(q["decoder_width"] or d)
  w, a = vit(n + 1, dd, int(q["decoder_depth"]))
  w += dense(n, q["code_dim"], dd) + dense(n, dd, dd) + dense(n, dd, q["target_dim"])
  tally.train("decoder", w, a)
  tally.frozen("teacher", sum(_clip_vit(_clip_teacher(config, int(config.data.image_size)))))


def _perceptual_arch(config) -> dict:
  """The perceptual ViT: a 'random:' spec, else the paper's MoCo v3 ViT-B/16."""
  from mim_jax.teachers import perceptual  # pylint: disable=g-import-not-at-top

  path = config.perceptual.path
  spec = path if path.startswith(RANDOM) else "random:B/16"
  return perceptual.parse_random_spec(spec, int(config.data.image_size))[0]


def _peco_vqvae(config, tally: _Tally, s: dict):
  del s
  from mim_jax.tokenizers import peco  # pylint: disable=g-import-not-at-top

  v = dict(peco.DEFAULTS, **dict(config.vqvae))
  size = int(config.data.image_size)
  first, rest, att, side = _vqvae_encoder(v, size)
  tally.train("encoder", rest, att, on_data=first)
  tally.add("quantizer", dense(side**2, v["embed_dim"], v["num_codes"]))  # forward only
  tally.train("decoder", *_vqvae_decoder(v, side))
  arch = _perceptual_arch(config)
  n, depth = (size // arch["patch_size"]) ** 2, max(config.perceptual.layers)
  w, a = vit(n + 1, arch["embed_dim"], depth, hidden=int(arch["embed_dim"] * arch["mlp_ratio"]))
  w += dense(n, 3 * arch["patch_size"] ** 2, arch["embed_dim"])
  # Features of x (forward) and of the reconstruction (forward + backward to its pixels).
  tally.frozen("perceptual", (w + a) + (NO_INPUT_GRAD * w + TRAIN * a))
  if config.get("gan") and config.gan.enabled:
    d_first, d_rest = _patchgan(config.gan.ndf, config.gan.n_layers, size)
    real = NO_INPUT_GRAD * d_first + TRAIN * d_rest  # D(x): weight gradients
    # D(x_hat): one forward, a backward to x_hat (generator term) and one to the weights
    # (discriminator term; the first layer's input gradient is not needed for it).
    fake = 4.0 * (d_first + d_rest) - d_first
    tally.add("discriminator", real + fake)


_METHODS = {
  "beitv2": _beitv2,
  "peco_mim": _beitv2,
  "peco_mae": _peco_mae,
  "mapet": _mapet,
  "ccvit": _ccvit,
  "caev2": _caev2,
  "vqkd": _vqkd,
  "peco_vqvae": _peco_vqvae,
}


def step_flops(config) -> dict[str, float]:
  """Model FLOPs of one training step of `config` (an ml_collections ConfigDict of
  configs/*.py) for its whole global batch config.batch_size: 'trainable', 'frozen',
  'total' (= trainable + frozen) and the parts they sum (see the module docstring)."""
  name = config.method.name
  if name not in _METHODS:
    raise ValueError(f"config.method.name={name!r}: no FLOP formula (known: {sorted(_METHODS)})")
  tally = _Tally()
  _METHODS[name](config, tally, _student(config) if name != "peco_vqvae" else {})
  return tally.result(int(config.batch_size))


def model_flops(config) -> float | None:
  """step_flops(config)['total'], or None for a job without a formula here (no
  config.method, or a method not in the table): the numerator of MFU."""
  method = config.get("method")
  if method is None or method.get("name") not in _METHODS:
    return None
  return step_flops(config)["total"]


def implementation_overhead(config) -> dict[str, float]:
  """FLOPs per step (whole batch) that mim_jax's implementation computes on top of
  `step_flops` (see the module docstring), by name; {} where it computes what is needed."""
  name, b = config.method.name, int(config.batch_size)
  out = {}
  if name in ("peco_mae", "caev2"):
    s = _student(config)
    out["patch_embed_of_masked_patches"] = NO_INPUT_GRAD * dense(
      config.method.num_masked, 3 * s["patch"] ** 2, s["dim"]
    )
  elif name in ("beitv2", "peco_mim", "ccvit") and config.model.get("scan_layers"):
    out["last_block_on_every_token"] = _scan_overhead(config)
  elif name == "peco_vqvae" and config.get("gan") and config.gan.enabled:
    out["discriminator_second_forward_on_reconstruction"] = sum(
      _patchgan(config.gan.ndf, config.gan.n_layers, int(config.data.image_size))
    )
  return {k: b * v for k, v in out.items()}


def overhead_fraction(config) -> float:
  """sum(implementation_overhead) / step_flops total: how much more the implementation does."""
  return sum(implementation_overhead(config).values()) / step_flops(config)["total"]
