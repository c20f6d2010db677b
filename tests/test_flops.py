"""mim_jax/flops.py: the analytic FLOPs of a training step, checked by hand on tiny cases and
against XLA's count of the same step lowered for one CPU device (aot.xla_step_flops; lowering
only, nothing is compiled, so the tensor sizes do not change the test's time)."""

from absl import flags
import pytest

flags.FLAGS.mark_as_parsed()

from mim_jax import aot  # noqa: E402
from mim_jax import config_lib  # noqa: E402
from mim_jax import flops  # noqa: E402

# The paper configs plus MaPeT's baselines and PeCo's VQ-VAE with its GAN term.
PAPER_CONFIGS = list(aot.PAPER_CONFIGS) + [
  "mapet_vitb:mode=pim",
  "mapet_vitb:mode=mim",
  "peco_vqvae:gan",
]
ALL_CONFIGS = PAPER_CONFIGS + [
  f"{c}{',' if ':' in c else ':'}runlocal" for c in PAPER_CONFIGS if "vitl" not in c
]


def _load(spec: str, **overrides):
  name, _, arg = spec.partition(":")
  c = config_lib.load_config(name, arg)
  with c.unlocked():
    for path, value in overrides.items():
      *parents, leaf = path.split(".")
      node = c
      for p in parents:
        node = node[p]
      node[leaf] = value
  return c


# ------------------------------------------------------------------------------ by hand
def test_block_and_conv_formulas_by_hand():
  # A block on 3 tokens of width 2 (MLP 8): qkv 2*3*2*6 = 72, proj 2*3*2*2 = 24,
  # fc1 = fc2 = 2*3*2*8 = 96; Q K^T and probs @ V 2 * (2*3*3*2) = 72.
  assert flops.block(3, 2) == (72 + 24 + 96 + 96, 72)
  # MaPeT's query stream: 2 queries of width 2 over 5 content keys, no keys / values of their
  # own: q 2*2*2*2 = 16, proj 16, MLP 2 * (2*2*2*8) = 128; attention 4*2*5*2 = 80.
  assert flops.block(2, 2, keys=5, kv_tokens=0) == (16 + 16 + 128, 80)
  # ViT-B/16: 24 n D^2 + 4 n^2 D per block.
  assert sum(flops.vit(197, 768, 12)) == 12 * (24 * 197 * 768**2 + 4 * 197**2 * 768)
  # 3x3 'SAME' conv on 14 x 14: per axis 14 * 3 - 2 taps land on pixels (XLA's count).
  assert flops.conv(14, 8, 16, 3) == (2 * 40 * 40 * 8 * 16, 14)
  # VQGAN's down-sampling: pad (0, 1), stride 2 -> 7 outputs, the last one with 2 taps.
  assert flops.conv(14, 8, 16, 3, 2, (0, 1)) == (2 * 20 * 20 * 8 * 16, 7)


def test_a_tiny_step_by_hand():
  """BEiT-style MIM (peco_mim), one block of width 8 on 8 px images with patch 4 (N = 4,
  T = 5 tokens), 2 masked, 16 cached token ids, batch 2."""
  c = _load(
    "peco_vitb:runlocal",
    **{"data.image_size": 8, "data.second_image_size": 8, "model.variant": "T/4"},
    **{"model.width": 8, "model.depth": 1, "model.heads": 2, "method.num_masked": 2},
    **{"tokenizer.cache": "random:16", "batch_size": 2},
  )
  # The block is read at the 2 masked tokens only (vit.Block's outputs_at): q, proj and the
  # MLP there, 2*2*8*8 + 2*2*8*8 + 2 * (2*2*8*32) = 2560; k and v on all 5 tokens,
  # 2 * (2*5*8*8) = 1280; the 2 query rows over 5 keys, 4*2*5*8 = 320. Forward x3.
  encoder = 3 * (2560 + 1280 + 320)  # 12480
  patch_embed = 2 * (2 * 4 * 48 * 8)  # 6144: 4 patches of 48 values, x2 (image input)
  lm_head = 3 * (2 * 2 * 8 * 16)  # 1536: 2 masked positions, 16 ids
  f = flops.step_flops(c)
  assert f["total"] == f["trainable"] == 2 * (encoder + patch_embed + lm_head)
  assert f["frozen"] == 0.0  # tokens come from the cache
  assert f["encoder"] + f["lm_head"] == f["total"]


# ------------------------------------------------------------------------------ against XLA
# `:runlocal` configs, widened to 384 (PeCo-MAE's decoder to 256): at the 128-d smoke widths
# the elementwise work XLA also counts (norms, softmax, GELU) is 3-7 % of the step, at 384 it
# is ~2 %, as for the paper's ViTs (1-2 %).
WIDE = {"model.width": 384}
XLA_CASES = {
  "beitv2": ("beitv2_vitb:runlocal", WIDE),
  "peco_mim": ("peco_vitb:runlocal", WIDE),
  "peco_mae": ("peco_mae_vitb:runlocal", dict(WIDE, **{"method.decoder_dim": 256})),
  "mapet": ("mapet_vitb:runlocal", WIDE),
  "mapet_pim": ("mapet_vitb:runlocal,mode=pim", WIDE),
  "mapet_mim": ("mapet_vitb:runlocal,mode=mim", WIDE),
  "ccvit": ("ccvit_vitb:runlocal", WIDE),
  "caev2": ("caev2_vitt:runlocal", dict(WIDE, **{"method.regressor_dim": 192})),
  "vqkd": ("vqkd_vitb:runlocal", dict(WIDE, **{"vqkd.decoder_width": 384})),
  "peco_vqvae": ("peco_vqvae:runlocal,gan", {}),
}


@pytest.mark.parametrize("case", sorted(XLA_CASES))
def test_analytic_count_matches_xla(case):
  spec, overrides = XLA_CASES[case]
  c = _load(spec, **overrides)
  with c.unlocked():
    aot.use_standins(c)
  xla = aot.xla_step_flops(c)
  f = flops.step_flops(c)
  extra = sum(flops.implementation_overhead(c).values())
  assert f["total"] == pytest.approx(f["trainable"] + f["frozen"])
  # What the implementation computes (the count + its documented extra work) is XLA's count.
  assert xla == pytest.approx(f["total"] + extra, rel=0.05), (xla, f, extra)
  # Nothing unneeded beyond 2 % (PeCo-MAE's patch embedding of masked patches: 0.2 % at
  # 224 px, ~1 % at the 64 px `:runlocal` of a clone without ../shared; MaPeT's query stream
  # used to add 9-13 % here, T = 65, P = 49, before vit.Attention's kv_len removed it).
  assert extra < 0.02 * f["total"]


# ------------------------------------------------------------------------------ invariance
@pytest.mark.parametrize("spec", ALL_CONFIGS)
def test_scan_layers_and_remat_do_not_change_the_count(spec):
  base = flops.step_flops(_load(spec))
  assert base["total"] == base["trainable"] + base["frozen"] > 0
  for field in ("scan_layers", "remat"):
    assert flops.step_flops(_load(spec, **{f"model.{field}": True})) == base, field
  both = _load(spec, **{"model.scan_layers": True, "model.remat": True})
  assert flops.step_flops(both) == base


def test_mapet_needs_no_query_stream_keys_or_values():
  """MaPeT ViT-B/16 (least_number 50) as the module docstring quotes it: the step XLA counts
  is the analytic one, not the one-sequence form's 20.5 GFLOP per image more."""
  c = _load("mapet_vitb")
  b = c.batch_size
  assert flops.step_flops(c)["total"] / b == pytest.approx(262.42e9, rel=1e-4)
  assert flops.implementation_overhead(c) == {}
  with c.unlocked():
    aot.use_standins(c)
  # Per block the one-sequence form added keys and values of the 147 queries + (491^2 -
  # 344^2 - 147 * 344) scores: x 12 blocks x 3.
  per_block = 2 * 2 * 147 * 768**2 + 4 * (491**2 - 344**2 - 147 * 344) * 768
  waste = 3 * 12 * per_block
  assert aot.xla_step_flops(c) < flops.step_flops(c)["total"] + 0.25 * waste * b


# ------------------------------------------------------------- benchmarks/hlo_matmuls.py
@pytest.mark.parametrize("target", ["cpu", "v5e-1"])
def test_hlo_matmul_sum_of_a_compiled_program(target):
  """The parser behind BENCHMARKS.md §10's matmul counts, on a dense layer, a batched
  attention product (the TPU compiler writes it as a convolution with dilated batch
  dimensions) and a strided patch convolution, compiled for the CPU and for a TPU chip."""
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
  import hlo_matmuls  # pylint: disable=g-import-not-at-top

  def step(q, k, w, images, kernel):
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k)
    dense = jnp.einsum("bnd,de->bne", q.reshape(4, 15, 64), w)
    patches = jax.lax.conv_general_dilated(
      images, kernel, (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return scores.sum() + dense.sum() + patches.sum()

  shapes = [(4, 3, 5, 64), (4, 3, 7, 64), (64, 32), (4, 16, 16, 3), (4, 4, 3, 8)]
  devices = (
    jax.devices("cpu")[:1] if target == "cpu" else aot.target_devices(aot.parse_topology(target))
  )
  replicated = NamedSharding(Mesh(np.asarray(devices), ("x",)), P())
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=replicated) for s in shapes]
  ops = dict(hlo_matmuls.matmul_flops(jax.jit(step).lower(*args).compile().as_text()))
  assert ops == {
    "jit(step)/bhqd,bhkd->bhqk/dot_general": 2 * 4 * 3 * 5 * 7 * 64,
    "jit(step)/bnd,de->bne/dot_general": 2 * 4 * 15 * 64 * 32,
    "jit(step)/conv_general_dilated": 2 * 4 * 4 * 4 * 8 * (4 * 4 * 3),
  }


def test_hlo_matmul_sum_counts_only_the_taps_on_a_padded_windows_input():
  """Two padded windows, parsed from HLO text: the TPU compiler writes a (32, 96, 192) x
  (192, 192) product (CCViT's T/16 step on a v5e, the last block's proj gradient) as a window
  of 32 over a zero-padded input of size 1, where one tap in 32 is real; and a 3x3 'SAME'
  convolution on 14 x 14, where 40 of 42 taps per axis are (flops.conv's count)."""
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
  import hlo_matmuls  # pylint: disable=g-import-not-at-top

  meta = 'metadata={op_name="%s"}'
  hlo = "\n".join(
    [
      "ENTRY %main {",
      "  %w = bf16[192,192,1]{1,0,2} parameter(0)",
      "  %g = bf16[32,96,192]{1,2,0} parameter(1)",
      "  %x = f32[1,14,14,8]{3,2,1,0} parameter(2)",
      "  %k = f32[3,3,8,16]{3,2,1,0} parameter(3)",
      "  %p = bf16[32,96,192]{1,2,0} convolution(%w, %g), "
      "window={size=32 pad=31_31 rhs_reversal=1}, dim_labels=bf0_0oi->0fb, " + meta % "proj",
      "  ROOT %c = f32[1,14,14,16]{3,2,1,0} convolution(%x, %k), window={size=3x3 pad=1_1x1_1}, "
      "dim_labels=b01f_01io->b01f, " + meta % "conv",
      "}",
    ]
  )
  assert dict(hlo_matmuls.matmul_flops(hlo)) == {
    "proj": 2 * 32 * 96 * 192 * 192,
    "conv": flops.conv(14, 8, 16, 3)[0],
  }
