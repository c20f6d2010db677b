r"""CAE v2 ViT-B/16 pre-training on ImageNet-1k, aligned to CLIP ViT-B/16 latents (CAE v2
Table 8; `Atten4Vis/CAE:project/CAEv2/scripts/caev2_base_300e.sh`).

docs/reference_details.md#cae-v2-encoder and the CAE v2 sections after it list what the
official code does beyond the paper.

Recipe:
  * encoder on the visible patches only (fixed 2-D sin-cos positions, q/v bias, layer scale
    0.1, drop path 0.1/0.1/0.1/0.2 for T/S/B/L), block masks of 30/49/98/118 patches for
    T/S/B/L (CAE's "loop until exact" generator);
  * latent contextual regressor: depth 1 (T/S) / 4 (B/L), 12 heads (16 for L), width 96 for T
    (with encoder_to_regresser Linear + LN), the encoder width otherwise, drop path up to 0.1;
  * head: shared LN, Linear to the CLIP width, l2-normalised; loss = mean(1 - cos) over all 197
    tokens [cls, visible, masked] against CLIP tokens after ln_post + proj (CLIP ViT-B/16 at
    224 px for T/S/B, ViT-L/14 at 196 px for L);
  * xavier-uniform init of every Linear (the official code's `--fix_init_weight` is off);
  * batch 2048, AdamW lr 1.5e-3, wd 0.05, 10 warm-up epochs, cosine to 1e-5, clipping 3.0,
    300 epochs; RandomResizedCrop(224, scale (0.4, 1)) + flip + ColorJitter 0.4, both views.
Differences from the paper: AdamW betas (0.9, 0.999) as the official script (the paper's
Table 8 says 0.98); tiny and small use 12 heads, as the official model definitions.

Commands:
  python -m mim_jax.teachers.clip --checkpoint=$CKPT/ViT-B-16.pt --out=$CKPT/clip_vitb16.npz
  python -m mim_jax.train --config=configs/caev2_vitb.py \
      --config.teacher.path=$CKPT/clip_vitb16.npz --config.data.path=... \
      --workdir=$WORKDIR/caev2_vitb

Expected result (CAE v2, 300 epochs): ViT-B 85.5 % fine-tune / 80.7 % linear probe on
ImageNet-1k (configs/eval/caev2_finetune.py, configs/eval/caev2_linear_probe.py); T 77.8 /
69.3, S 83.1 / 77.5, L 87.6 / 84.4.

Smoke run on 2 CPU cores (../shared/data 32 px, patch 4, 32 of 64 patches masked, a small
random CLIP ViT with patch 4 standing in for the teacher):
  python -m mim_jax.train --config=configs/caev2_vitb.py:runlocal --workdir=/tmp/caev2_smoke
"""

from mim_jax import config_lib

# variant -> (mask count, regressor depth, regressor width (0: encoder width), regressor
#             heads, drop path, encoder heads (0: the variant's))
SIZES = {
  "T/16": (30, 1, 96, 12, 0.1, 12),
  "S/16": (49, 1, 0, 12, 0.1, 12),
  "B/16": (98, 4, 0, 12, 0.1, 0),
  "L/16": (118, 4, 0, 16, 0.2, 0),
}


def get_config(arg: str = ""):
  a = config_lib.parse_arg(arg, runlocal=False, variant="B/16", epochs=300)
  if a.variant not in SIZES:
    raise ValueError(f"config argument variant must be one of {sorted(SIZES)}, got {a.variant!r}")
  num_masked, depth, width, heads, drop_path, enc_heads = SIZES[a.variant]
  c = config_lib.base_config()
  c.model.variant = a.variant
  c.model.heads = enc_heads
  c.model.abs_pos = "sincos"  # fixed 2-D sin-cos (recorded for evaluation's loader)
  c.model.layer_scale_init = 0.1
  c.model.drop_path_rate = drop_path

  c.method = config_lib.mlc.ConfigDict()
  c.method.name = "caev2"
  c.method.num_masked = num_masked
  c.method.min_block = 16
  c.method.min_aspect = 0.3
  c.method.regressor_depth = depth
  c.method.regressor_dim = width or {"T/16": 192, "S/16": 384, "B/16": 768, "L/16": 1024}[a.variant]
  c.method.regressor_heads = heads
  c.method.regressor_drop_path = 0.1

  c.teacher = config_lib.mlc.ConfigDict()
  c.teacher.kind = "clip"
  c.teacher.path = ""  # converted .npz (python -m mim_jax.teachers.clip) or .pt
  c.teacher.random_init = ""  # 'random:ViT-B/16,...': untrained stand-in, smoke runs

  large = a.variant == "L/16"
  # The architecture behind teacher.path (CLIP ViT-L/14 for ViT-L, else ViT-B/16): what an
  # untrained stand-in has where the weights are absent (python -m mim_jax.aot).
  c.teacher.arch = "ViT-L/14" if large else "ViT-B/16"
  c.data.image_size = 224
  c.data.second_image_size = 196 if large else 224  # CLIP ViT-L/14 at 196 px for ViT-L
  c.data.crop_scale = (0.4, 1.0)
  c.data.color_jitter = 0.4
  c.batch_size = 2048
  c.total_steps = config_lib.steps_for_epochs(a.epochs, c.batch_size)
  c.optim.warmup_steps = config_lib.steps_for_epochs(10, c.batch_size)
  c.optim.lr, c.optim.min_lr = 1.5e-3, 1e-5
  c.optim.b1, c.optim.b2 = 0.9, 0.999
  c.optim.weight_decay = 0.05
  c.optim.clip_grad_norm = 3.0
  c.log_every = 100
  c.checkpoint_every = 2000

  if a.runlocal:
    apply_runlocal(c)
  return c


def apply_runlocal(c):
  """32 px / patch 4 (8 x 8 patches), mask count and regressor shrunk, random CLIP."""
  config_lib.runlocal(c)
  patch = int(c.model.variant.split("/")[1])
  size = c.data.image_size
  n = (size // patch) ** 2
  c.model.heads = 4
  c.method.num_masked = round(98 / 196 * n)
  c.method.min_block = max(1, round(16 / 196 * n))
  c.method.regressor_depth = 1
  c.method.regressor_dim = c.model.width
  c.method.regressor_heads = 4
  c.data.second_image_size = size
  c.teacher.path = ""
  c.teacher.random_init = f"random:ViT-B/16,width=64,layers=2,patch_size={patch},image_size={size}"
