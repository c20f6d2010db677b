"""BEiT-style Vision Transformer backbone shared by every method.

Numerics follow the official code (`microsoft/unilm:beit2/modeling_finetune.py`,
`microsoft/unilm:beit2/modeling_pretrain.py`, `Atten4Vis/CAE:models/modeling_cae_helper.py`;
docs/reference_details.md#shared-numerics and #beit-v2-backbone): pre-norm blocks,
exact GELU, LayerNorm eps 1e-6 computed in fp32 with a two-pass variance, one
bias-free `qkv` projection plus learnable q/v biases (k bias fixed at 0), layer
scale, per-sample drop path, and relative position bias (shared by all layers,
per layer, or none). Parameters carry logical axis names so the trainer can
shard them with its rules; without rules the annotations are no-ops.

Images are NHWC and already normalised. Token 0 is the cls token, patch tokens
follow in row-major (h, w) order.
"""

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

VIT_SIZES = {
  'T': dict(embed_dim=192, depth=12, num_heads=3),
  'S': dict(embed_dim=384, depth=12, num_heads=6),
  'B': dict(embed_dim=768, depth=12, num_heads=12),
  'L': dict(embed_dim=1024, depth=24, num_heads=16),
}

# Logical axis names of activations between blocks.
ACT_AXES = ('act_batch', 'act_len', 'act_embed')

INITS = ('beit', 'timm', 'torch_default', 'xavier')
Initializer = Callable[..., jax.Array]


def vit_kwargs(variant: str) -> dict:
  """'B/16' -> dict(embed_dim=768, depth=12, num_heads=12, patch_size=16).

  A bare size letter ('B') means patch 16.
  """
  size, _, patch = variant.partition('/')
  if size not in VIT_SIZES or (patch and not patch.isdigit()):
    raise ValueError(
      f'Unknown ViT variant {variant!r}: expected one of '
      f'{sorted(VIT_SIZES)} optionally followed by /<patch>, e.g. "B/16".'
    )
  return dict(VIT_SIZES[size], patch_size=int(patch) if patch else 16)


# ----------------------------------------------------------------------------
# Position tables (pure numpy: they are constants of the grid).
# ----------------------------------------------------------------------------


def num_relative_distances(grid: tuple[int, int]) -> int:
  """Rows of the relative position bias table: patch offsets + 3 cls entries."""
  h, w = grid
  return (2 * h - 1) * (2 * w - 1) + 3


def relative_position_index(grid: tuple[int, int]) -> np.ndarray:
  """(N+1, N+1) int32 index into the bias table, cls token at index 0.

  As `RelativePositionBias` in `microsoft/unilm:beit2/modeling_finetune.py`
  (docs/reference_details.md#beit-v2-backbone).

  Patch pair (i, j): (h_i - h_j + H - 1) * (2W - 1) + (w_i - w_j + W - 1).
  Row 0 (cls query) = R-3, column 0 (cls key) = R-2, [0, 0] = R-1, R = table rows.
  """
  h, w = grid
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  rows, cols = rows.reshape(-1), cols.reshape(-1)
  d_row = rows[:, None] - rows[None, :] + h - 1
  d_col = cols[:, None] - cols[None, :] + w - 1
  num_rel = num_relative_distances(grid)
  index = np.zeros((h * w + 1, h * w + 1), np.int32)
  index[1:, 1:] = d_row * (2 * w - 1) + d_col
  index[0, :] = num_rel - 3
  index[:, 0] = num_rel - 2
  index[0, 0] = num_rel - 1
  return index


def sincos_2d_pos_embed(grid: tuple[int, int], dim: int, cls_token: bool = True) -> np.ndarray:
  """Fixed 2-D sin-cos embedding in the CAE v2 layout, float32.

  `Atten4Vis/CAE:models/modeling_cae_helper.py` (docs/reference_details.md#cae-v2-encoder).

  Token (r, c) (row-major) gets [sin(r w), cos(r w), sin(c w), cos(c w)] with
  w_k = 1 / 10000^(k / (dim/4)); a zero row is prepended for the cls token.
  Returns (N+1, dim), or (N, dim) without cls.
  """
  if dim % 4:
    raise ValueError(f'sincos_2d_pos_embed needs dim divisible by 4, got {dim}')
  h, w = grid
  quarter = dim // 4
  omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  row_angles = rows.reshape(-1, 1) * omega[None]
  col_angles = cols.reshape(-1, 1) * omega[None]
  table = np.concatenate(
    [np.sin(row_angles), np.cos(row_angles), np.sin(col_angles), np.cos(col_angles)], axis=1
  )
  if cls_token:
    table = np.concatenate([np.zeros((1, dim)), table], axis=0)
  return table.astype(np.float32)


def drop_path_rates(rate: float, depth: int) -> list[float]:
  """Stochastic depth rates linspace(0, rate, depth) (docs/reference_details.md#shared-numerics)."""
  return [float(r) for r in np.linspace(0.0, rate, depth)]


# ----------------------------------------------------------------------------
# Initialisers.
# ----------------------------------------------------------------------------


def trunc_normal_init(std: float = 0.02, cutoff: str = 'std') -> Initializer:
  """Truncated normal without jax's variance correction.

  cutoff 'std': truncated at +-1 std (BEiT v2 pretraining, CCViT, CAE), so the
  resulting std is ~0.54 * std. 'abs2': truncated at absolute +-2 (timm's
  default), effectively untruncated for std 0.02.
  """
  if cutoff == 'std':
    lower, upper = -1.0, 1.0
  elif cutoff == 'abs2':
    lower, upper = -2.0 / std, 2.0 / std
  else:
    raise ValueError(f"cutoff must be 'std' or 'abs2', got {cutoff!r}")

  def init(key, shape, dtype=jnp.float32):
    sample = jax.random.truncated_normal(key, lower, upper, shape, jnp.float32)
    return (sample * std).astype(dtype)

  return init


def torch_default_init() -> Initializer:
  """PyTorch's default Linear/Conv weight init, kaiming_uniform(a=sqrt 5).

  That is U(+-1/sqrt(fan_in)); fan_in is every kernel axis but the last
  (Flax kernels are (..., in, out)).
  """

  def init(key, shape, dtype=jnp.float32):
    bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

  return init


def torch_default_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default Linear/Conv bias init: U(+-1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

  return init


def _check_init(init: str):
  if init not in INITS:
    raise ValueError(f'init must be one of {INITS}, got {init!r}')


def _dense_inits(init: str, fan_in: int) -> tuple[Initializer, Initializer]:
  """(kernel_init, bias_init) of a Linear layer under one of the conventions."""
  _check_init(init)
  if init == 'torch_default':
    return torch_default_init(), torch_default_bias_init(fan_in)
  # 'xavier': CAE's top-level _init_weights (docs/reference_details.md#cae-v2-initialisation).
  if init == 'xavier':
    return nn.initializers.xavier_uniform(), nn.initializers.zeros_init()
  cutoff = 'std' if init == 'beit' else 'abs2'
  return trunc_normal_init(0.02, cutoff), nn.initializers.zeros_init()


def _depth_rescaled(init_fn: Initializer, layer_id) -> Initializer:
  """Divides an init by sqrt(2 * layer_id) (BEiT `fix_init_weight`).

  layer_id may be a tracer (the layer index scanned over with nn.scan).
  """
  if layer_id is None:
    return init_fn

  def init(key, shape, dtype=jnp.float32):
    scale = jnp.sqrt(2.0 * jnp.asarray(layer_id, jnp.float32))
    return (init_fn(key, shape, jnp.float32) / scale).astype(dtype)

  return init


def _named(init_fn: Initializer, names: tuple) -> Initializer:
  return nn.with_logical_partitioning(init_fn, names)


def layer_norm(eps: float, param_dtype: Any, name: str) -> nn.LayerNorm:
  """LayerNorm in fp32 with the exact two-pass variance PyTorch uses."""
  return nn.LayerNorm(
    epsilon=eps,
    dtype=jnp.float32,
    param_dtype=param_dtype,
    use_fast_variance=False,
    scale_init=_named(nn.initializers.ones_init(), ('embed',)),
    bias_init=_named(nn.initializers.zeros_init(), ('embed',)),
    name=name,
  )


def _apply_norm(norm: nn.LayerNorm, x: jax.Array) -> jax.Array:
  return norm(x.astype(jnp.float32)).astype(x.dtype)


# ----------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------


def _rows_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """lax.dot_general for nn.Dense; on CPU a (..., D) x (D, F) product runs as one (rows, D)
  matmul.

  Over (B, N, D) tokens the weight gradient of the 3-D form contracts two axes (batch and
  tokens), which XLA:CPU does with a transposed copy of the incoming gradient and a slow
  generic dot; flattened, it is one plain matmul (CCViT T/16 step: BENCHMARKS.md §11). On
  TPU the same reshape costs relayout copies (197 tokens are not a multiple of the 8-row
  tile: +46 % temporaries for that step on a v5e), so other platforms keep the 3-D form;
  the choice is made when the step is lowered for its devices (`lax.platform_dependent`).
  """
  kw = dict(precision=precision, preferred_element_type=preferred_element_type)
  (lhs_contract, rhs_contract), batch_dims = dimension_numbers
  plain = lambda x, w: lax.dot_general(x, w, dimension_numbers, **kw)
  if lhs.ndim <= 2 or rhs.ndim != 2 or any(batch_dims):
    return plain(lhs, rhs)
  if tuple(lhs_contract) != (lhs.ndim - 1,) or tuple(rhs_contract) != (0,):
    return plain(lhs, rhs)

  def rows(x, w):
    y = lax.dot_general(x.reshape(-1, x.shape[-1]), w, (((1,), (0,)), ((), ())), **kw)
    return y.reshape(*x.shape[:-1], w.shape[-1])

  return lax.platform_dependent(lhs, rhs, cpu=rows, default=plain)


# nn.Dense (same parameters, names and partitioning) with the CPU row layout above.
Dense = functools.partial(nn.Dense, dot_general=_rows_dot_general)


class RelativePositionBias(nn.Module):
  """Learned relative position bias table (zero init), gathered to (heads, N+1, N+1)."""

  grid: tuple
  num_heads: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self) -> jax.Array:
    grid = tuple(self.grid)
    table = self.param(
      'relative_position_bias_table',
      _named(nn.initializers.zeros_init(), (None, 'heads')),
      (num_relative_distances(grid), self.num_heads),
      self.param_dtype,
    )
    index = relative_position_index(grid)
    bias = jnp.take(table.astype(jnp.float32), index.reshape(-1), axis=0)
    bias = bias.reshape(index.shape + (self.num_heads,))
    return jnp.transpose(bias, (2, 0, 1))


class _Kernel(nn.Module):
  """The kernel of a bias-free Dense layer (same name, init and partitioning), without its
  product: for products over parts of it (`Attention`'s outputs_at)."""

  shape: tuple
  init: Initializer
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param('kernel', self.init, self.shape, self.param_dtype)


class Attention(nn.Module):
  """BEiT multi-head self-attention (bias-free qkv + q/v biases).

  Logits and softmax are computed in fp32 whatever the compute dtype.
  """

  dim: int
  num_heads: int
  qkv_bias: bool = True
  weight_init: str = 'beit'
  depth_rescale_layer_id: Any = None  # int, a tracer under nn.scan, or None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  k_bias: bool = False  # timm / MoCo v3 / DINO ViTs (and MaPeT) also learn a k bias
  # Only the first kv_len tokens give keys and values (None: all); the rest only ask. MaPeT's
  # query stream is attended to by no token (two-stream attention, MaPeT §4.1): its keys,
  # values and score columns would be computed and then masked away (BENCHMARKS.md §10).
  kv_len: Optional[int] = None

  def _qkv_biases(self):
    """(q, k, v) biases, or None: q/v biases start at zero under every convention; k has
    none unless `k_bias`."""
    if not self.qkv_bias:
      return None
    zeros = _named(nn.initializers.zeros_init(), ('qkv',))
    q_bias = self.param('q_bias', zeros, (self.dim,), self.param_dtype)
    v_bias = self.param('v_bias', zeros, (self.dim,), self.param_dtype)
    k_bias = (
      self.param('k_bias', zeros, (self.dim,), self.param_dtype)
      if self.k_bias
      else jnp.zeros_like(q_bias)
    )
    return q_bias, k_bias, v_bias

  def _heads(self, t: jax.Array, parts: int) -> jax.Array:
    """(B, N, parts * dim) -> (parts, B, heads, N, head_dim): batch and head axes leading,
    which XLA:CPU's batched matmuls run ~25 % faster than the 'bqhd' layout (measured,
    fwd + bwd)."""
    batch, length, _ = t.shape
    head_dim = self.dim // self.num_heads
    return t.reshape(batch, length, parts, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)

  def _queries_keys_values(self, x):
    """q, k, v (B, heads, N, head_dim) of every token (keys and values of the first kv_len)."""
    length = x.shape[1]
    n = length if self.kv_len is None else min(int(self.kv_len), length)
    kernel_init, _ = _dense_inits(self.weight_init, self.dim)
    dense = Dense(
      3 * self.dim,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_named(kernel_init, ('embed', 'qkv')),
      name='qkv',
    )
    qkv = dense(x[:, :n] if n < length else x)
    q_rest = None
    if n < length:  # queries of the asking tokens: the q third of the same kernel
      kernel = nn.unbox(dense.variables['params']['kernel'])[:, : self.dim]
      q_rest = jnp.dot(x[:, n:].astype(self.dtype), kernel.astype(self.dtype))
    biases = self._qkv_biases()
    if biases is not None:
      qkv = qkv + jnp.concatenate(biases).astype(qkv.dtype)
      if q_rest is not None:
        q_rest = q_rest + biases[0].astype(q_rest.dtype)
    # On CPU the gradient of (B, N, 3 * dim) is written once, read by the qkv weight's and
    # input's products and the bias sum; and split's gradient is one concatenation, where
    # indexing's was three zero-padded copies summed (BENCHMARKS.md §11).
    qkv = self._heads(materialized_gradient(qkv), 3)
    q, k, v = (t[0] for t in lax.split(qkv, (1, 1, 1), axis=0))
    if q_rest is not None:
      q = jnp.concatenate([q, self._heads(q_rest, 1)[0]], axis=2)
    return q, k, v

  def _queries_keys_values_at(self, x, outputs_at):
    """q at the (B, R) tokens `outputs_at`, k and v of every token: the q third of the qkv
    kernel on R tokens, the k and v thirds on all of them."""
    kernel_init, _ = _dense_inits(self.weight_init, self.dim)
    kernel = _Kernel(
      (self.dim, 3 * self.dim), _named(kernel_init, ('embed', 'qkv')), self.param_dtype, name='qkv'
    )().astype(self.dtype)
    x = x.astype(self.dtype)
    product = lambda t, w: _rows_dot_general(t, w, (((2,), (0,)), ((), ())))
    q = product(jnp.take_along_axis(x, outputs_at[..., None], axis=1), kernel[:, : self.dim])
    kv = product(x, kernel[:, self.dim :])
    biases = self._qkv_biases()
    if biases is not None:
      q = q + biases[0].astype(q.dtype)
      kv = kv + jnp.concatenate(biases[1:]).astype(kv.dtype)
    k, v = (t[0] for t in lax.split(self._heads(materialized_gradient(kv), 2), (1, 1), axis=0))
    return self._heads(q, 1)[0], k, v

  @nn.compact
  def __call__(self, x, rel_pos_bias=None, attn_mask=None, outputs_at=None):
    """x: (B, N, D). rel_pos_bias: (heads, N, N). attn_mask: additive float or
    boolean (True = attend), broadcastable to (B, heads, N, N).

    outputs_at: optional (B, R) token indices. Queries, and so the output, (B, R, D), only
    at these tokens; every token still gives keys and values. For a last block whose
    caller reads a few of its tokens (`Block`)."""
    if outputs_at is None:
      q, k, v = self._queries_keys_values(x)
    elif self.kv_len is not None or attn_mask is not None:
      raise ValueError('Attention: outputs_at does not combine with kv_len or attn_mask')
    else:
      q, k, v = self._queries_keys_values_at(x, outputs_at)
    batch, _, queries, head_dim = q.shape
    n = k.shape[2]
    q = q * jnp.asarray(head_dim**-0.5, q.dtype)
    logits = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=jnp.float32)
    if rel_pos_bias is not None and outputs_at is not None:  # each image's query rows
      rows = jnp.take(rel_pos_bias.astype(jnp.float32), outputs_at, axis=1)
      logits = logits + rows.transpose(1, 0, 2, 3)
    elif rel_pos_bias is not None:
      logits = add_bias_over_batch(logits, rel_pos_bias.astype(jnp.float32)[..., :n])
    if attn_mask is not None:
      attn_mask = attn_mask[..., :n]
      if attn_mask.dtype == jnp.bool_:
        logits = jnp.where(attn_mask, logits, jnp.finfo(jnp.float32).min)
      else:
        logits = logits + attn_mask.astype(jnp.float32)
    probs = softmax(logits).astype(self.dtype)
    # Product in (B, heads, N, head_dim), then the transpose: written straight to 'bqhd',
    # XLA:CPU computed it transposed with its generic dot (BENCHMARKS.md §11).
    out = jnp.einsum('bhqk,bhkd->bhqd', probs, v.astype(self.dtype)).transpose(0, 2, 1, 3)
    out = out.reshape(batch, queries, self.dim)
    kernel_init, bias_init = _dense_inits(self.weight_init, self.dim)
    return Dense(
      self.dim,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_named(
        _depth_rescaled(kernel_init, self.depth_rescale_layer_id), ('qkv', 'embed')
      ),
      bias_init=_named(bias_init, ('embed',)),
      name='proj',
    )(out)


def _sum_over_batch(g: jax.Array) -> jax.Array:
  """Sum over the leading axis. On CPU as a product with a ones vector: XLA:CPU reduced a
  leading axis ~9x slower (the attention bias gradient, (32, 3, 197, 197): 21 against 2.4 ms,
  BENCHMARKS.md §11). Either form contracts the batch axis, so a batch-sharded gradient needs
  one all-reduce; other platforms keep the reduction."""

  def ones_product(g):
    flat = g.reshape(g.shape[0], -1)
    ones = jnp.ones((g.shape[0],), g.dtype)
    total = lax.dot_general(ones, flat, (((0,), (0,)), ((), ())), precision='highest')
    return total.reshape(g.shape[1:])

  return lax.platform_dependent(g, cpu=ones_product, default=lambda g: jnp.sum(g, axis=0))


def _written_once(g: jax.Array) -> jax.Array:
  """g through a conditional, which XLA:CPU does not fuse across, so g gets its own buffer.

  The branches agree while g's first element is finite; otherwise g is already non-finite
  and the second branch makes all of it NaN, which the step's guard treats the same.
  (`lax.optimization_barrier` would say this more plainly, but XLA:CPU removes it before
  fusion.)"""
  first = g.reshape(-1)[0]
  return lax.cond(jnp.isfinite(first), lambda g: g, lambda g: g + 0 * first, g)


@jax.custom_vjp
def materialized_gradient(x: jax.Array) -> jax.Array:
  """Identity whose gradient is computed into a buffer of its own on one CPU device (elsewhere,
  and over a mesh of several devices: plain identity).

  Placed on the residual stream of every block (and on Attention's qkv product). Without it
  XLA:CPU's fusion pass copies the residual gradient's chain of additions into each fusion
  that reads it, and every block's backward fusions recompute the sums of all the blocks
  after it: in the CCViT ViT-B/16 step, 70 fusions of up to 620 operations, 440 ms of a 6.7 s
  step (BENCHMARKS.md §11).
  """
  return x


def _materialized_gradient_bwd(_, g):
  if jax.sharding.get_abstract_mesh().size > 1:
    # Sharded, the conditional's predicate would cost an all-reduce per use.
    return (g,)
  return (lax.platform_dependent(g, cpu=_written_once, default=lambda g: g),)


materialized_gradient.defvjp(lambda x: (x, None), _materialized_gradient_bwd)


@jax.custom_vjp
def add_bias_over_batch(x: jax.Array, bias: jax.Array) -> jax.Array:
  """x + bias[None]: a (heads, Q, K) bias on (B, heads, Q, K) attention logits, whose bias
  gradient is `_sum_over_batch`."""
  return x + bias[None]


def _add_bias_fwd(x, bias):
  return x + bias[None], None


def _add_bias_bwd(_, g):
  return g, _sum_over_batch(g)


add_bias_over_batch.defvjp(_add_bias_fwd, _add_bias_bwd)


@jax.custom_jvp
def softmax(x: jax.Array) -> jax.Array:
  """Softmax over the last axis whose derivative is PyTorch's: y * (dy - sum(dy * y)), from
  the output alone. jax.nn.softmax (unless `jax_softmax_custom_jvp` is set) is differentiated
  through its division, which keeps the (B, heads, N, N) broadcast of 1 / sum for the backward
  pass and adds work to every layer's attention gradient (BENCHMARKS.md §11)."""
  unnormalized = jnp.exp(x - lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True)))
  return unnormalized / jnp.sum(unnormalized, axis=-1, keepdims=True)


@softmax.defjvp
def _softmax_jvp(primals, tangents):
  (x,), (x_dot,) = primals, tangents
  y = softmax(x)
  return y, y * (x_dot - jnp.sum(y * x_dot, axis=-1, keepdims=True))


def gelu(x):
  """Exact GELU as x/2 (1 + erf(x / sqrt 2)), the form PyTorch's CPU kernel evaluates (nn.GELU,
  approximate='none'). jax.nn.gelu's erfc form is the same function within 1e-6 but took 2x
  the time on XLA:CPU (BENCHMARKS.md §11)."""
  return 0.5 * x * (1.0 + lax.erf(x * np.asarray(np.sqrt(0.5), x.dtype)))


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2."""

  dim: int
  hidden_dim: int
  weight_init: str = 'beit'
  depth_rescale_layer_id: Any = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel_init, bias_init = _dense_inits(self.weight_init, self.dim)
    x = Dense(
      self.hidden_dim,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_named(kernel_init, ('embed', 'mlp')),
      bias_init=_named(bias_init, ('mlp',)),
      name='fc1',
    )(x)
    x = gelu(x)
    kernel_init, bias_init = _dense_inits(self.weight_init, self.hidden_dim)
    return Dense(
      self.dim,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_named(
        _depth_rescaled(kernel_init, self.depth_rescale_layer_id), ('mlp', 'embed')
      ),
      bias_init=_named(bias_init, ('embed',)),
      name='fc2',
    )(x)


def _drop_path(module: nn.Module, x: jax.Array, rate, train: bool) -> jax.Array:
  """Drops the whole residual branch per sample, rescaling kept ones by 1/keep."""
  if not train or rate is None or (isinstance(rate, (int, float)) and rate == 0):
    return x
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  kept = jax.random.bernoulli(module.make_rng('dropout'), keep, shape)
  return jnp.where(kept, x / keep.astype(x.dtype), jnp.zeros_like(x))


class Block(nn.Module):
  """Pre-norm transformer block with layer scale and drop path.

  `Block` in `microsoft/unilm:beit2/modeling_finetune.py`.

  rel_pos_grid, when set, gives the block its own relative position table
  (scope 'rel_pos_bias'), added to any shared bias passed in.
  """

  dim: int
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  layer_scale_init: Optional[float] = 0.1
  drop_path: Any = 0.0
  ln_eps: float = 1e-6
  weight_init: str = 'beit'
  depth_rescale_layer_id: Any = None
  rel_pos_grid: Optional[tuple] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  k_bias: bool = False
  kv_len: Optional[int] = None  # see Attention

  @nn.compact
  def __call__(self, x, rel_pos_bias=None, attn_mask=None, *, train: bool = False, outputs_at=None):
    """x: (B, N, D) -> (B, N, D), or (B, R, D) at the (B, R) token indices `outputs_at`.

    With outputs_at the block computes its queries, MLP and output at those tokens only,
    every token still giving keys and values: the same values there. For a last block whose
    caller reads a few tokens (CCViT's predictions at 95 of 197: 43 % of the block's work
    left out, BENCHMARKS.md §11)."""
    return self._forward(
      x, rel_pos_bias, attn_mask, train, self.depth_rescale_layer_id, self.drop_path, outputs_at
    )

  def _forward(
    self, x, rel_pos_bias, attn_mask, train, rescale_layer_id, drop_rate, outputs_at=None
  ):
    """The block body; nn.scan passes the layer id and drop rate as tracers."""
    _check_init(self.weight_init)
    x = x.astype(self.dtype)
    if self.rel_pos_grid is not None:
      own_bias = RelativePositionBias(
        tuple(self.rel_pos_grid), self.num_heads, self.param_dtype, name='rel_pos_bias'
      )()
      rel_pos_bias = own_bias if rel_pos_bias is None else rel_pos_bias + own_bias
    attn = Attention(
      self.dim,
      self.num_heads,
      self.qkv_bias,
      self.weight_init,
      rescale_layer_id,
      self.dtype,
      self.param_dtype,
      k_bias=self.k_bias,
      kv_len=self.kv_len,
      name='attn',
    )
    mlp = Mlp(
      self.dim,
      int(self.dim * self.mlp_ratio),
      self.weight_init,
      rescale_layer_id,
      self.dtype,
      self.param_dtype,
      name='mlp',
    )
    norm1 = layer_norm(self.ln_eps, self.param_dtype, 'norm1')
    norm2 = layer_norm(self.ln_eps, self.param_dtype, 'norm2')
    if self.layer_scale_init:
      scale_init = _named(nn.initializers.constant(self.layer_scale_init), ('embed',))
      gamma_1 = self.param('gamma_1', scale_init, (self.dim,), self.param_dtype).astype(self.dtype)
      gamma_2 = self.param('gamma_2', scale_init, (self.dim,), self.param_dtype).astype(self.dtype)
    else:
      gamma_1 = gamma_2 = None

    x = materialized_gradient(x)
    branch = attn(_apply_norm(norm1, x), rel_pos_bias, attn_mask, outputs_at)
    if outputs_at is not None:
      x = jnp.take_along_axis(x, outputs_at[..., None], axis=1)
    if gamma_1 is not None:
      branch = gamma_1 * branch
    x = materialized_gradient(x + _drop_path(self, branch, drop_rate, train))
    branch = mlp(_apply_norm(norm2, x))
    if gamma_2 is not None:
      branch = gamma_2 * branch
    return x + _drop_path(self, branch, drop_rate, train)


class _LayerStep(Block):
  """A Block with a scan-friendly signature: (x, (layer_id, drop_rate), ...) -> (x, y).

  Used for nn.scan and nn.remat: `train` is an attribute (not a traced
  argument), and the per-layer depth-rescale id and drop rate come in as
  arguments so one stacked module can serve every layer. y is the block output
  when keep_output (to collect return_layers under scan), else None.
  """

  train: bool = False
  depth_rescale: bool = True
  use_drop_path: bool = False
  keep_output: bool = False

  @nn.compact
  def __call__(self, x, layer_args, rel_pos_bias=None, attn_mask=None, outputs_at=None):
    layer_id, drop_rate = layer_args
    x = self._forward(
      x,
      rel_pos_bias,
      attn_mask,
      self.train,
      layer_id if self.depth_rescale else None,
      drop_rate if self.use_drop_path else None,
      outputs_at,
    )
    x = nn.with_logical_constraint(x, ACT_AXES)
    return x, (x if self.keep_output else None)


class VisionTransformer(nn.Module):
  """BEiT / timm-style ViT encoder returning every representation methods need.

  Unrolled blocks live in scopes 'blocks_0'..'blocks_{depth-1}'; with
  scan_layers they are one scope 'blocks' whose params have a leading 'layers'
  axis (see convert.stack_layers / unstack_layers).
  """

  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  in_chans: int = 3
  qkv_bias: bool = True
  layer_scale_init: Optional[float] = 0.1
  drop_path_rate: float = 0.0
  rel_pos: str = 'shared'
  abs_pos: str = 'none'
  use_mask_token: bool = False
  final_norm: bool = True
  weight_init: str = 'beit'
  depth_rescale: bool = True
  ln_eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False
  k_bias: bool = False

  def _block_kwargs(self, grid):
    return dict(
      dim=self.embed_dim,
      num_heads=self.num_heads,
      mlp_ratio=self.mlp_ratio,
      qkv_bias=self.qkv_bias,
      k_bias=self.k_bias,
      layer_scale_init=self.layer_scale_init,
      ln_eps=self.ln_eps,
      weight_init=self.weight_init,
      rel_pos_grid=grid if self.rel_pos == 'per_layer' else None,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )

  def _embed(self, images, mask):
    """Patch embedding, mask-token mixing, cls token and absolute positions."""
    batch, height, width, chans = images.shape
    p = self.patch_size
    if height % p or width % p or chans != self.in_chans:
      raise ValueError(f'images {images.shape} do not fit patch {p} / in_chans {self.in_chans}')
    grid = (height // p, width // p)
    fan_in = p * p * chans
    if self.weight_init in ('beit', 'xavier'):
      kernel_init, bias_init = trunc_normal_init(0.02, 'std'), nn.initializers.zeros_init()
    else:  # the timm-style models leave the patch conv at PyTorch's default
      kernel_init, bias_init = torch_default_init(), torch_default_bias_init(fan_in)
    x = nn.Conv(
      self.embed_dim,
      (p, p),
      strides=(p, p),
      padding='VALID',
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_named(kernel_init, (None, None, None, 'embed')),
      bias_init=_named(bias_init, ('embed',)),
      name='patch_embed',
    )(images)
    x = x.reshape(batch, grid[0] * grid[1], self.embed_dim)

    token_init = _named(
      trunc_normal_init(0.02, 'std' if self.weight_init in ('beit', 'xavier') else 'abs2'),
      (None, None, 'embed'),
    )
    if self.use_mask_token:
      mask_token = self.param('mask_token', token_init, (1, 1, self.embed_dim), self.param_dtype)
      if mask is not None:
        w = mask[..., None].astype(x.dtype)
        x = x * (1 - w) + mask_token.astype(x.dtype) * w
    elif mask is not None:
      raise ValueError('mask given but the model has use_mask_token=False')

    cls_token = self.param('cls_token', token_init, (1, 1, self.embed_dim), self.param_dtype)
    cls_token = jnp.broadcast_to(cls_token.astype(x.dtype), (batch, 1, self.embed_dim))
    x = jnp.concatenate([cls_token, x], axis=1)

    if self.abs_pos == 'learned':
      pos = self.param('pos_embed', token_init, (1, x.shape[1], self.embed_dim), self.param_dtype)
      x = x + pos.astype(x.dtype)
    elif self.abs_pos == 'sincos':
      x = x + jnp.asarray(sincos_2d_pos_embed(grid, self.embed_dim), x.dtype)[None]
    elif self.abs_pos != 'none':
      raise ValueError(f"abs_pos must be 'none', 'learned' or 'sincos', got {self.abs_pos!r}")
    return x, grid

  @nn.compact
  def __call__(
    self,
    images,
    *,
    mask=None,
    train: bool = False,
    return_layers: Sequence[int] = (),
    attn_mask=None,
    keep=None,
    last_outputs_at=None,
  ) -> dict:
    """images: (B, H, W, C); mask: (B, N) bool, True = masked (mixed with mask_token).

    keep: optional (B, V) patch indices: only the cls token and these patches (with their
    positions) enter the blocks (CAE / MAE-style encoders on visible patches).

    attn_mask: optional additive / boolean mask broadcastable to (B, heads, N+1, N+1).
    last_outputs_at: optional (B, R) token indices (0 = cls) where the caller reads the last
    block: 'last' and 'normed' are (B, R, D), those tokens' outputs. Unrolled, the last block
    computes only those (`Block`'s outputs_at); under scan_layers, or with the last layer in
    return_layers, it runs on every token and they are taken after.
    Returns {'last', 'normed', 'layers': {l: block l output (1-based)}, 'rel_pos_bias'}.
    """
    _check_init(self.weight_init)
    if self.rel_pos not in ('shared', 'per_layer', 'none'):
      raise ValueError(f"rel_pos must be 'shared', 'per_layer' or 'none', got {self.rel_pos!r}")
    return_layers = tuple(int(l) for l in return_layers)
    for l in return_layers:
      if not 1 <= l <= self.depth:
        raise ValueError(
          f'return_layers entries are 1-based block ids in [1, {self.depth}], got {l}'
        )

    x, grid = self._embed(images, mask)
    if keep is not None:
      if self.rel_pos != 'none':
        raise ValueError("keep (visible patches only) needs rel_pos='none'")
      x = jnp.concatenate(
        [x[:, :1], jnp.take_along_axis(x[:, 1:], keep[..., None], axis=1)], axis=1
      )
    x = nn.with_logical_constraint(x, ACT_AXES)
    rel_pos_bias = None
    if self.rel_pos == 'shared':
      rel_pos_bias = RelativePositionBias(
        grid, self.num_heads, self.param_dtype, name='rel_pos_bias'
      )()

    rates = drop_path_rates(self.drop_path_rate, self.depth)
    # The last block computes only the caller's tokens, unless it is scanned (one body for
    # every layer) or return_layers wants all of it; otherwise they are taken after it.
    last_block_reads = self.depth not in return_layers and not self.scan_layers
    layers = {}
    if self.scan_layers:
      step = nn.remat(_LayerStep, prevent_cse=False) if self.remat else _LayerStep
      scanned = nn.scan(
        step,
        variable_axes={'params': 0},
        split_rngs={'params': True, 'dropout': True},
        in_axes=(0, nn.broadcast, nn.broadcast),
        length=self.depth,
        metadata_params={nn.PARTITION_NAME: 'layers'},
      )
      layer_args = (
        jnp.arange(1, self.depth + 1, dtype=jnp.float32),
        jnp.asarray(rates, jnp.float32),
      )
      x, outputs = scanned(
        **self._block_kwargs(grid),
        train=train,
        depth_rescale=self.depth_rescale,
        use_drop_path=self.drop_path_rate > 0,
        keep_output=bool(return_layers),
        name='blocks',
      )(x, layer_args, rel_pos_bias, attn_mask)
      layers = {l: outputs[l - 1] for l in return_layers}
    else:
      for i in range(self.depth):
        rescale_id = i + 1 if self.depth_rescale else None
        at = last_outputs_at if last_block_reads and i + 1 == self.depth else None
        if self.remat:
          step = nn.remat(_LayerStep, prevent_cse=True)(
            **self._block_kwargs(grid),
            train=train,
            depth_rescale=self.depth_rescale,
            use_drop_path=rates[i] > 0,
            name=f'blocks_{i}',
          )
          x, _ = step(x, (rescale_id, rates[i]), rel_pos_bias, attn_mask, at)
        else:
          block = Block(
            **self._block_kwargs(grid),
            drop_path=rates[i],
            depth_rescale_layer_id=rescale_id,
            name=f'blocks_{i}',
          )
          x = block(x, rel_pos_bias, attn_mask, train=train, outputs_at=at)
          x = nn.with_logical_constraint(x, ACT_AXES)
        if i + 1 in return_layers:
          layers[i + 1] = x
    if last_outputs_at is not None and not last_block_reads:
      x = jnp.take_along_axis(x, last_outputs_at[..., None], axis=1)

    normed = x
    if self.final_norm:
      normed = _apply_norm(layer_norm(self.ln_eps, self.param_dtype, 'norm'), x)
    return {'last': x, 'normed': normed, 'layers': layers, 'rel_pos_bias': rel_pos_bias}
