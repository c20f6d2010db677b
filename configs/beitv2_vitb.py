r"""BEiT v2 ViT-B/16 pre-training on ImageNet-1k with VQ-KD targets (BEiT v2 Table 9).

Recipe (`microsoft/unilm:beit2/PRETRAINING.md`, docs/reference_details.md#beit-v2-backbone and
#beit-v2-patch-aggregation; paper Table 9):
  * ViT-B/16, shared relative position bias, no absolute positions, layer scale 0.1,
    mask-token mixing; block mask of 75 / 196 patches (min block 16, aspect 0.3-3.33, the v2
    random top-up to exactly 75);
  * loss = CE(final layer -> norm -> lm_head) + CE(patch aggregation: final cls + layer-9
    patches -> 2 blocks -> the same norm and lm_head), both on the masked positions only;
  * targets: the VQ-KD tokenizer (8192 codes) on the second view (224 px, bicubic; the same
    crop and flip as the student view), online, or from a token cache;
  * batch 2048, AdamW lr 1.5e-3 (not batch-scaled), betas (0.9, 0.98) for 300 epochs /
    (0.9, 0.999) for 1600, eps 1e-8, wd 0.05 (not on ndim <= 1 parameters, cls_token and
    pos_embed; mask_token and the shared relative position table are decayed, as in the
    reference), 10 warm-up epochs, per-step cosine to 1e-5, gradient clipping 3.0, drop
    path 0 (300 ep) / 0.1 (1600 ep), layer scale 0.1 (B) / 1e-5 (L);
  * data: ColorJitter 0.4 -> flip -> RandomResizedCrop(224, scale (0.2, 1), bicubic),
    shared by both views; ImageNet mean/std for the student, [0, 255] for the tokenizer.

Commands:
  # the official tokenizer (converted on load) or a mim_jax VQ-KD workdir (configs/vqkd_vitb.py)
  python -m mim_jax.train --config=configs/beitv2_vitb.py \
      --config.tokenizer.path=$CKPT/vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth \
      --config.data.path=... --workdir=$WORKDIR/beitv2_vitb_300ep
  python -m mim_jax.train --config=configs/beitv2_vitb.py:epochs=1600 ...
  # any other tokenizer: --config.tokenizer.kind=kclip|peco|centroids --config.tokenizer.path=...
  # a token cache instead of online tokenization (centre crops, no flip; MaPeT-style):
  #   --config.tokenizer.cache=$DATA/tokens/vqkd_train --config.data.crop_scale="(1,1)" \
  #   --config.data.crop_ratio="(1,1)" --config.data.hflip=False

Expected result (BEiT v2 Tables 1-2): ImageNet-1k fine-tuning top-1 85.0 % (300 epochs) /
85.5 % (1600 epochs), linear probe 80.1 % (300 epochs); evaluate with
configs/eval/beitv2_finetune.py and configs/eval/beitv2_linear_probe.py.

Smoke run on 2 CPU cores (../shared/data 32 px, patch 4, 24 of 64 patches masked, a 256-
centroid pixel tokenizer built from the training images standing in for VQ-KD):
  python -m mim_jax.train --config=configs/beitv2_vitb.py:runlocal --workdir=/tmp/beitv2_smoke
"""

from mim_jax import config_lib


def get_config(arg: str = ""):
  a = config_lib.parse_arg(arg, runlocal=False, epochs=300, variant="B/16")
  if a.epochs not in (300, 1600):
    raise ValueError(
      f"config argument epochs must be 300 or 1600 (BEiT v2 Table 9), got {a.epochs}"
    )
  if a.variant not in ("B/16", "L/16"):
    raise ValueError(f"config argument variant must be B/16 or L/16, got {a.variant!r}")
  large = a.variant == "L/16"
  c = config_lib.base_config()
  c.model.variant = a.variant
  c.model.layer_scale_init = 1e-5 if large else 0.1
  c.model.drop_path_rate = 0.1 if a.epochs == 1600 else 0.0

  c.method = config_lib.mlc.ConfigDict()
  c.method.name = "beitv2"
  c.method.num_masked = 75
  c.method.min_block = 16
  c.method.min_aspect = 0.3
  c.method.early_layers = 21 if large else 9  # the aggregation head's input layer
  c.method.head_layers = 2
  c.method.shared_lm_head = True

  c.tokenizer = config_lib.mlc.ConfigDict()
  c.tokenizer.kind = "vqkd"
  c.tokenizer.path = ""  # official .pth or a configs/vqkd_vitb.py workdir
  c.tokenizer.cache = ""  # or a token cache (python -m mim_jax.tokenize)
  c.tokenizer.build_if_missing = False  # centroids only (smoke runs)
  c.tokenizer.k = 8192
  c.tokenizer.images_per_class = 50
  c.tokenizer.iters = 20
  c.tokenizer.seed = 1

  c.data.crop_scale = (0.2, 1.0)
  c.data.color_jitter = 0.4
  c.data.image_size = c.data.second_image_size = 224
  c.batch_size = 2048
  c.total_steps = config_lib.steps_for_epochs(a.epochs, c.batch_size)
  c.optim.warmup_steps = config_lib.steps_for_epochs(10, c.batch_size)
  c.optim.lr, c.optim.min_lr = 1.5e-3, 1e-5
  c.optim.b1, c.optim.b2 = 0.9, (0.999 if a.epochs == 1600 else 0.98)
  c.optim.weight_decay = 0.05
  c.optim.clip_grad_norm = 3.0
  c.log_every = 100
  c.checkpoint_every = 2000

  if a.runlocal:
    apply_runlocal(c)
  return c


def apply_runlocal(c):
  """32 px / patch 4 (8 x 8 patches), mask and layer counts rescaled, pixel centroids."""
  config_lib.runlocal(c)
  patch = int(c.model.variant.split("/")[1])
  n = (c.data.image_size // patch) ** 2
  c.method.num_masked = round(75 / 196 * n)
  c.method.min_block = max(1, round(16 / 196 * n))
  c.method.early_layers = max(1, c.model.depth * 3 // 4)
  c.tokenizer.kind = "centroids"
  c.tokenizer.build_if_missing = True
  c.tokenizer.k = 256
  c.tokenizer.iters = 10
