"""The optimizer pieces against independent re-derivations of the reference."""

import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax

from mim_jax import optim


def reference_cosine_scheduler(base, final, total, warmup):
  """NumPy re-derivation of BEiT's utils.cosine_scheduler (per step, warm-up from 0)."""
  warm = np.linspace(0, base, warmup) if warmup > 0 else np.array([])
  iters = np.arange(total - warmup)
  cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
  return np.concatenate([warm, cos])


def test_schedule_matches_reference_formula():
  sched = optim.cosine_schedule(1.5e-3, total_steps=200, warmup_steps=20, min_lr=1e-5)
  ours = np.array([float(sched(i)) for i in range(200)])
  ref = reference_cosine_scheduler(1.5e-3, 1e-5, 200, 20)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-10)
  assert ours[0] == 0.0 and abs(ours[19] - 1.5e-3) < 1e-9  # starts at 0, reaches base


def test_schedule_without_warmup():
  sched = optim.cosine_schedule(1e-3, total_steps=50, warmup_steps=0, min_lr=0.0)
  ref = reference_cosine_scheduler(1e-3, 0.0, 50, 0)
  np.testing.assert_allclose([float(sched(i)) for i in range(50)], ref, rtol=1e-5, atol=1e-12)


def test_weight_decay_mask_follows_reference_groups():
  params = {
    "backbone": {
      "cls_token": jnp.zeros((1, 1, 8)),
      "mask_token": jnp.zeros((1, 1, 8)),
      "pos_embed": jnp.zeros((1, 5, 8)),
      "rel_pos_bias": {"relative_position_bias_table": jnp.zeros((12, 2))},
      "blocks_0": {
        "attn": {
          "qkv": {"kernel": jnp.zeros((8, 24))},
          "q_bias": jnp.zeros(8),
          "v_bias": jnp.zeros(8),
        },
        "norm1": {"scale": jnp.zeros(8), "bias": jnp.zeros(8)},
        "gamma_1": jnp.zeros(8),
      },
      "patch_embed": {"kernel": jnp.zeros((4, 4, 3, 8)), "bias": jnp.zeros(8)},
    },
    "lm_head": {"kernel": jnp.zeros((8, 16)), "bias": jnp.zeros(16)},
  }
  mask = optim.weight_decay_mask(params)
  b = mask["backbone"]
  assert not b["cls_token"] and not b["pos_embed"]
  assert b["mask_token"]  # decayed in the reference
  assert b["rel_pos_bias"]["relative_position_bias_table"]  # shared table decayed too
  assert b["blocks_0"]["attn"]["qkv"]["kernel"] and b["patch_embed"]["kernel"]
  assert not any(
    [
      b["blocks_0"]["attn"]["q_bias"],
      b["blocks_0"]["attn"]["v_bias"],
      b["blocks_0"]["norm1"]["scale"],
      b["blocks_0"]["gamma_1"],
      b["patch_embed"]["bias"],
      mask["lm_head"]["bias"],
    ]
  )
  assert mask["lm_head"]["kernel"]


def test_scanned_layers_count_ndim_without_the_layer_axis():
  params = {
    "blocks": {
      "norm1": {"scale": jnp.zeros((4, 8))},
      "attn": {"qkv": {"kernel": jnp.zeros((4, 8, 24))}},
    }
  }
  mask = optim.weight_decay_mask(params, scanned_prefix="blocks")
  assert not mask["blocks"]["norm1"]["scale"]
  assert mask["blocks"]["attn"]["qkv"]["kernel"]


def _cfg(**kw):
  c = mlc.ConfigDict(
    dict(
      lr=0.1,
      min_lr=0.0,
      warmup_steps=0,
      b1=0.9,
      b2=0.98,
      eps=1e-8,
      weight_decay=0.5,
      clip_grad_norm=3.0,
      no_decay_names=("cls_token", "pos_embed"),
    )
  )
  c.update(kw)
  return c


def test_adamw_decays_only_masked_and_clips():
  tx, _ = optim.make_optimizer(_cfg(), total_steps=10)
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2), "cls_token": jnp.ones((1, 1, 2))}
  zero = {k: jnp.zeros_like(v) for k, v in params.items()}
  upd, _ = tx.update(zero, tx.init(params), params)
  # Zero gradients: only decoupled weight decay moves parameters: -lr * wd * p.
  np.testing.assert_allclose(upd["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(upd["b"], 0.0)
  np.testing.assert_allclose(upd["cls_token"], 0.0)
  # Clipping: a huge gradient is rescaled to global norm 3 before Adam (first-step update
  # of Adam is ~ -lr * sign(g) regardless, so check the clip stage directly).
  clip = optax.clip_by_global_norm(3.0)
  g = {"w": jnp.full((2, 2), 100.0)}
  clipped, _ = clip.update(g, clip.init(g))
  np.testing.assert_allclose(optax.global_norm(clipped), 3.0, rtol=1e-6)
