"""mim_jax.reductions (blocked argmin/argmax) and the token cross-entropy: equal to jnp and
optax, ties included, and the loss's gradient equal to optax's."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mim_jax import reductions
from mim_jax.methods import common


@pytest.mark.parametrize("shape", [(64, 8192), (3, 5, 1024), (7, 1000), (4, 256)])
def test_blocked_arg_best_equals_jnp_first_index_on_ties(shape):
  rng = np.random.default_rng(0)
  # Few distinct values: many ties, across blocks and inside them.
  x = jnp.asarray(rng.integers(0, 6, shape).astype(np.float32))
  np.testing.assert_array_equal(reductions.argmin(x), jnp.argmin(x, axis=-1))
  np.testing.assert_array_equal(reductions.argmax(x), jnp.argmax(x, axis=-1))
  y = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
  np.testing.assert_array_equal(jax.jit(reductions.argmin)(y), jnp.argmin(y, axis=-1))
  np.testing.assert_array_equal(jax.jit(reductions.argmax)(y), jnp.argmax(y, axis=-1))
  assert reductions.argmin(y).dtype == jnp.int32


def test_the_best_in_the_last_slot_of_a_later_block_is_found():
  x = jnp.zeros((2, 2048), jnp.float32).at[0, 2047].set(-1.0).at[1, 128].set(-1.0)
  np.testing.assert_array_equal(reductions.argmin(x), [2047, 128])


def test_token_cross_entropy_equals_optax_in_value_and_gradient():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.standard_normal((2, 7, 8192)).astype(np.float32) * 3)
  targets = jnp.asarray(rng.integers(0, 8192, (2, 7)), jnp.int32)
  ours = lambda z: common.token_cross_entropy(z, targets).mean()
  ref = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, targets).mean()
  np.testing.assert_array_equal(
    common.token_cross_entropy(logits, targets),
    optax.softmax_cross_entropy_with_integer_labels(logits, targets),
  )
  np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(ref)(logits), rtol=0, atol=1e-9)
  acc = common.token_accuracy(logits, targets)
  assert acc == jnp.mean(jnp.argmax(logits, -1) == targets)
