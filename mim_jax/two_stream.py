"""MaPeT's two-stream attention masks, built on device from per-sample permutations
(`attention_mask_full_mapet_1` in aimagelab/MaPeT:utils/models.py builds them one sample at
a time; the permutation is drawn in aimagelab/MaPeT:data/clipped_imagenet.py).

A permutation `perm` (B, T) lists token indices in prediction order with the cls token (0)
first. pos(t) is t's place in it; the first `least` places are the *context*; the other
P = T - least tokens are *predicted*, and everything indexed by p below runs over them in
ascending token index (the official code's order, also the order of the targets).

The model runs one sequence per sample, [h (T real tokens), M (P position-aware mask tokens),
g (P queries)], through shared blocks; the combined (T + 2P)^2 boolean mask (True = may
attend) reproduces the official code's two masks exactly:
  content rows (h, M) = mask_h over [h, M] columns      (T + P rows)
  query rows (g)      = mask_q over [h, M] columns      (P rows)
and no row attends to g (keys and values come from the content stream only). Rules:
  * every row sees every context token;
  * a real token t sees itself and the tokens before it in the permutation;
  * t sees the mask token of predicted token j iff j comes after t (context tokens: all);
  * mask-token rows see the context and all mask tokens, no predicted content;
  * the query of j sees the tokens before j (not j itself) and the mask tokens of j and of
    every predicted token after j.
`with_mask_tokens=False` is the PIM baseline: no M tokens in the content stream (queries see
only the tokens before them); the layout is then [h, g].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def predicted_tokens(perm: jax.Array, least: int) -> jax.Array:
  """(B, P) indices of the predicted tokens in ascending token order."""
  b, t = perm.shape
  pos = jnp.argsort(perm, axis=1)  # pos[b, token] = place in perm
  predicted = pos >= least
  order = jnp.argsort(jnp.logical_not(predicted), axis=1, stable=True)
  return order[:, : t - least]


def two_stream_masks(
  perm: jax.Array, least: int, *, with_mask_tokens: bool = True
) -> tuple[jax.Array, jax.Array]:
  """(mask (B, L, L) bool, predicted token indices (B, P)) with L = T + 2P (T + P without
  mask tokens); rows/columns ordered [h, M, g] as in the module docstring."""
  b, t = perm.shape
  p = t - least
  if not 0 < least < t:
    raise ValueError(f"least_number={least} must be in [1, {t - 1}]")
  pos = jnp.argsort(perm, axis=1)  # (B, T)
  before = pos[:, None, :] < pos[:, :, None]  # [b, i, k]: k precedes i
  context = pos < least  # (B, T)
  eye = jnp.eye(t, dtype=bool)[None]
  sees_content = before | context[:, None, :]  # rule 1: everyone sees the context
  h_h = sees_content | eye  # rule 2
  pred = predicted_tokens(perm, least)  # (B, P)
  pos_pred = jnp.take_along_axis(pos, pred, axis=1)  # (B, P)
  take_rows = lambda m: jnp.take_along_axis(m, pred[:, :, None], axis=1)
  q_h = take_rows(sees_content)  # rule 3: preceding + context, not self

  if not with_mask_tokens:
    l = t + p
    mask = jnp.zeros((b, l, l), bool)
    mask = mask.at[:, :t, :t].set(h_h)
    mask = mask.at[:, t:, :t].set(q_h)
    return mask, pred

  h_m = pos_pred[:, None, :] > pos[:, :, None]  # rule 4: mask tokens of later tokens
  m_h = jnp.broadcast_to(context[:, None, :], (b, p, t))  # rule 5: context only ...
  m_m = jnp.ones((b, p, p), bool)  # ... and all mask tokens
  q_m = pos_pred[:, None, :] >= pos_pred[:, :, None]  # rule 3: own + later mask tokens
  l = t + 2 * p
  mask = jnp.zeros((b, l, l), bool)
  mask = mask.at[:, :t, :t].set(h_h)
  mask = mask.at[:, :t, t : t + p].set(h_m)
  mask = mask.at[:, t : t + p, :t].set(m_h)
  mask = mask.at[:, t : t + p, t : t + p].set(m_m)
  mask = mask.at[:, t + p :, :t].set(q_h)
  mask = mask.at[:, t + p :, t : t + p].set(q_m)
  return mask, pred


def permuted_layout_mask(
  num_tokens: int, least: int, *, with_mask_tokens: bool = True
) -> np.ndarray:
  """The same attention pattern with every stream in *permutation order* (content token i =
  the i-th of the permutation, mask token / query j = the (least + j)-th): it no longer
  depends on the sample, so it is one static (L, L) prefix/causal mask shared by the batch.
  The model must then gather its tokens by `perm` and predict `perm[:, least:]`."""
  t, p = num_tokens, num_tokens - least
  i = np.arange(t)[:, None]
  k = np.arange(t)[None, :]
  j = np.arange(p)
  h_h = (k < least) | (k <= i)
  q_h = k < least + j[:, None]  # preceding (and context), not itself
  if not with_mask_tokens:
    mask = np.zeros((t + p, t + p), bool)
    mask[:t, :t], mask[t:, :t] = h_h, q_h
    return mask
  mask = np.zeros((t + 2 * p, t + 2 * p), bool)
  mask[:t, :t] = h_h
  mask[:t, t : t + p] = (least + j)[None, :] > i  # mask tokens of later tokens
  mask[t : t + p, :t] = k < least  # mask tokens: the context ...
  mask[t : t + p, t : t + p] = True  # ... and all mask tokens
  mask[t + p :, :t] = q_h
  mask[t + p :, t : t + p] = j[None, :] >= j[:, None]  # own + later mask tokens
  return mask
