"""A block computed at some tokens only (vit.Block's outputs_at, VisionTransformer's
last_outputs_at): the values and gradients of the whole block read at those tokens, for less
work. CCViT's last blocks use it (methods/ccvit.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax.models import vit

DIM, HEADS, GRID = 32, 4, (4, 4)
TOKENS = GRID[0] * GRID[1] + 1


def _tokens(batch, count, seed=0):
  """(batch, count) distinct token indices per image, in no particular order."""
  rng = np.random.RandomState(seed)
  return jnp.asarray(np.stack([rng.permutation(TOKENS)[:count] for _ in range(batch)]))


def _randomised(params, seed=0):
  """Every parameter random (layer scales, biases and the bias table start constant)."""
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.RandomState(seed)
  return jax.tree.unflatten(
    tree, [jnp.asarray(0.3 * rng.randn(*p.shape).astype(np.float32)) for p in leaves]
  )


def _take(x, at):
  return jnp.take_along_axis(x, at[..., None], axis=1)


@pytest.mark.parametrize('rel_pos', ['shared', 'per_layer', 'none'])
def test_block_outputs_at_are_the_whole_blocks_outputs_there_with_their_gradients(rel_pos):
  block = vit.Block(
    dim=DIM, num_heads=HEADS, drop_path=0.4, rel_pos_grid=GRID if rel_pos == 'per_layer' else None
  )
  rng = np.random.RandomState(1)
  x = jnp.asarray(rng.randn(3, TOKENS, DIM).astype(np.float32))
  bias = jnp.asarray(rng.randn(HEADS, TOKENS, TOKENS).astype(np.float32))
  bias = bias if rel_pos == 'shared' else None
  at = _tokens(3, 6)
  params = _randomised(nn.unbox(block.init(jax.random.PRNGKey(0), x, bias)))
  weights = jnp.asarray(rng.randn(3, 6, DIM).astype(np.float32))
  dropout = {'dropout': jax.random.PRNGKey(5)}  # the same samples dropped in both

  def whole(params, x, bias):
    return _take(block.apply(params, x, bias, train=True, rngs=dropout), at)

  def part(params, x, bias):
    return block.apply(params, x, bias, train=True, rngs=dropout, outputs_at=at)

  np.testing.assert_allclose(part(params, x, bias), whole(params, x, bias), rtol=1e-5, atol=1e-6)
  grads = [
    jax.grad(lambda *a, f=f: jnp.sum(weights * f(*a)), argnums=(0, 1, 2))(params, x, bias)
    for f in (part, whole)
  ]
  for got, want in zip(*(jax.tree.leaves(g) for g in grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # Work left out: 6 of 17 tokens ask (their q, attention rows, proj, MLP); all 17 give k, v.
  flops = [jax.jit(f).lower(params, x, bias).cost_analysis()['flops'] for f in (part, whole)]
  assert flops[0] < 0.6 * flops[1], flops


@pytest.mark.parametrize('mode', ['unrolled', 'remat', 'scan'])
def test_last_outputs_at_are_the_last_layer_read_there(mode):
  model = vit.VisionTransformer(
    patch_size=8,
    embed_dim=DIM,
    depth=2,
    num_heads=HEADS,
    use_mask_token=True,
    scan_layers=mode == 'scan',
    remat=mode == 'remat',
  )
  images = jnp.asarray(np.random.RandomState(2).randn(2, 32, 32, 3).astype(np.float32))
  at = _tokens(2, 5, seed=3)
  params = _randomised(nn.unbox(model.init(jax.random.PRNGKey(0), images)))
  whole = model.apply(params, images, return_layers=(1,))
  part = model.apply(params, images, return_layers=(1,), last_outputs_at=at)
  for key in ('last', 'normed'):
    assert part[key].shape == (2, 5, DIM)
    np.testing.assert_allclose(part[key], _take(whole[key], at), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(part['layers'][1], whole['layers'][1], rtol=1e-6)
  # The last layer asked for whole: it is, and 'last' is still read at the tokens.
  both = model.apply(params, images, return_layers=(2,), last_outputs_at=at)
  np.testing.assert_allclose(both['layers'][2], whole['last'], rtol=1e-6)
  np.testing.assert_allclose(both['last'], _take(whole['last'], at), rtol=1e-6)


def test_outputs_at_refuses_kv_len_and_attention_masks():
  x = jnp.zeros((1, TOKENS, DIM))
  at = _tokens(1, 3)
  with pytest.raises(ValueError, match='outputs_at does not combine'):
    vit.Attention(DIM, HEADS, kv_len=5).init(jax.random.PRNGKey(0), x, outputs_at=at)
  with pytest.raises(ValueError, match='outputs_at does not combine'):
    vit.Attention(DIM, HEADS).init(
      jax.random.PRNGKey(0), x, attn_mask=jnp.ones((TOKENS, TOKENS), bool), outputs_at=at
    )


def test_qkv_parameters_are_the_same_with_and_without_outputs_at():
  """Checkpoints move between the two: the same names, shapes and initial values."""
  x = jnp.asarray(np.random.RandomState(4).randn(2, TOKENS, DIM).astype(np.float32))
  plain = vit.Block(dim=DIM, num_heads=HEADS).init(jax.random.PRNGKey(7), x)
  at = vit.Block(dim=DIM, num_heads=HEADS).init(jax.random.PRNGKey(7), x, outputs_at=_tokens(2, 4))
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(at), nn.unbox(plain))
