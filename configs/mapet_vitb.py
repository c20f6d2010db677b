r"""MaPeT ViT-B/16 pre-training on ImageNet-1k with k-CLIP tokens (MaPeT Tables 1, 2, 6, 8).

Recipe (aimagelab/MaPeT: models/mapet/mapet.py, utils/models.py, engine.py and
config/standard-config-pre-train-imagenet.yaml):
  * two-stream ViT-B/16 (timm layout: q/kv Linear with biases, learned absolute positions,
    layer scale 0.1, drop path 0.1 with one draw shared by both streams); per-sample
    permutation with the cls token first, the first 50 places as context (`:least=N` is
    Table 6's cutting-point ablation), position-aware mask tokens, final LN + Linear(768,
    8192) on the query stream, CE over the 147 predicted tokens;
  * `:mode=pim` / `:mode=mim` are Table 1's PIM (no mask tokens in the content stream) and
    MIM (random masking of 75 patches, mask-token mixing) baselines;
  * targets: k-CLIP tokens (RN50x64 layer 4, K = 8192) from a token cache, or VQ-KD tokens
    (`:tokenizer=vqkd`); the student view must be the cached centre crop: RandomResizedCrop
    scale = ratio = (1, 1), no flip, ColorJitter 0.4 only;
  * batch 2048, AdamW lr 1.5e-3, betas (0.9, 0.999), wd 0.05 (cls_token / pos_embed excluded,
    the mask token decayed), 300 epochs, 10 warm-up, cosine to 1e-5, clipping 3.0.
Layout: the streams run in permutation order with one static mask (`method.layout`,
'permuted', 1.22x faster on CPU than the official code's token order with per-sample masks,
the same loss; `--config.method.layout=token` for the official layout).
Differences from the official code: the lr follows a per-step cosine (timm's scheduler there
steps per epoch and adds 10 cool-down epochs at min_lr: 310 epochs in all); the warm-up starts
at 0 instead of 1e-6.

Commands (the token cache first; see configs/kclip_rn50x64.py and configs/tokenize.py):
  python -m mim_jax.train --config=configs/mapet_vitb.py \
      --config.tokenizer.cache=$DATA/tokens/kclip_train --config.data.source=imagefolder \
      --config.data.path=$DATA/imagenet --workdir=$WORKDIR/mapet_vitb
  python -m mim_jax.train --config=configs/mapet_vitb.py:mode=pim ...        # Table 1 PIM
  python -m mim_jax.train --config=configs/mapet_vitb.py:least=98 ...        # Table 6
  python -m mim_jax.train --config=configs/mapet_vitb.py:tokenizer=vqkd \
      --config.tokenizer.cache=$DATA/tokens/vqkd_train ...

Expected result (MaPeT Table 2, ImageNet-1k, 300 epochs; evaluate with
configs/eval/mapet_finetune.py / mapet_linear_probe.py): ViT-B k-CLIP 83.6 % fine-tune /
73.5 % linear probe; VQ-KD 84.4 % / 73.8 %. Table 1: MIM 83.3 / 72.3, PIM 83.3 / 73.5 (k-CLIP).

Smoke run on 2 CPU cores (../shared/data 32 px, patch 4: 65 tokens, the first 16 as context,
a 256-centroid pixel tokenizer run online standing in for k-CLIP):
  python -m mim_jax.train --config=configs/mapet_vitb.py:runlocal --workdir=/tmp/mapet_smoke
"""

from mim_jax import config_lib

MODES = ("mapet", "pim", "mim")


def get_config(arg: str = ""):
  a = config_lib.parse_arg(
    arg, runlocal=False, variant="B/16", mode="mapet", least=50, tokenizer="kclip", epochs=300
  )
  if a.mode not in MODES:
    raise ValueError(f"config argument mode must be one of {MODES}, got {a.mode!r}")
  if a.tokenizer not in ("kclip", "vqkd"):
    raise ValueError(f"config argument tokenizer must be kclip or vqkd, got {a.tokenizer!r}")
  c = config_lib.base_config()
  c.model.variant = a.variant
  c.model.layer_scale_init = 0.1
  # drop_path: 0.1 in aimagelab/MaPeT:config/standard-config-pre-train-imagenet.yaml (line 37;
  # the yaml keys become the argparse defaults there, so it applies).
  c.model.drop_path_rate = 0.1

  c.method = config_lib.mlc.ConfigDict()
  c.method.name = "mapet"
  c.method.mode = a.mode
  c.method.least_number = a.least  # the cutting point: context = the first `least` places
  c.method.num_masked = 75  # mode='mim' only (random masking, 40 %)
  # 'permuted': streams in permutation order, one static prefix/causal mask; 1.22x faster
  # than 'token' (the official per-sample masks) for ViT-B/16 on CPU (BENCHMARKS.md §6),
  # the same loss (tests/test_mapet.py).
  c.method.layout = "permuted"

  c.tokenizer = config_lib.mlc.ConfigDict()
  c.tokenizer.kind = a.tokenizer
  c.tokenizer.cache = ""  # python -m mim_jax.tokenize (the paper's setting)
  c.tokenizer.path = ""  # or online tokenization
  c.tokenizer.build_if_missing = False
  c.tokenizer.k = 8192
  c.tokenizer.images_per_class = 50
  c.tokenizer.iters = 20
  c.tokenizer.seed = 1

  # The student view must be the region the tokens were computed on: the official yaml's
  # RandomResizedCrop scale = ratio = (1, 1) is the centre square the k-CLIP tokens of
  # aimagelab/MaPeT:data/kmeans/ were computed on (Resize + CenterCrop).
  c.data.crop_scale = (1.0, 1.0)
  c.data.crop_ratio = (1.0, 1.0)
  c.data.hflip = False
  c.data.color_jitter = 0.4
  c.data.image_size = c.data.second_image_size = 224
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
  """32 px / patch 4: 64 patches + cls, the cutting point and mask count rescaled."""
  config_lib.runlocal(c)
  patch = int(c.model.variant.split("/")[1])
  n = (c.data.image_size // patch) ** 2
  c.method.least_number = max(1, round(c.method.least_number / 197 * (n + 1)))
  c.method.num_masked = round(75 / 196 * n)
  c.tokenizer.kind = "centroids"
  c.tokenizer.cache = ""
  c.tokenizer.build_if_missing = True
  c.tokenizer.k = 256
  c.tokenizer.iters = 10
