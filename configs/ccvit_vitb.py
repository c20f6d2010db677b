r"""CCViT ViT-B/16 pre-training on ImageNet-1k, 300 epochs (CCViT paper, Appendix A, Table 5).

Command (a v4-64 / 8xA100-class setup; batch 2048 is global):
  python -m mim_jax.tokenizers.build_centroids --source=imagefolder \
      --path=$DATA/imagenet/train --images_per_class=50 --k=8192 --iters=20 --seed=1 \
      --out=$DATA/ccvit_centroids_8192
  python -m mim_jax.train --config=configs/ccvit_vitb.py \
      --config.tokenizer.path=$DATA/ccvit_centroids_8192 --workdir=$WORKDIR/ccvit_vitb

Expected result: the paper reports 84.3 % (main text) / 84.4 % (abstract) ImageNet-1k top-1
after 100 epochs of fine-tuning this checkpoint (configs/eval, Table 6 recipe); token
accuracy during pre-training is the highest of the token-based methods (Table 4).

Smoke run on 2 CPU cores (small real images; ../shared/data when present, else the photos
embedded in installed packages; the 256-centroid codebook is built on the fly):
  python -m mim_jax.train --config=configs/ccvit_vitb.py:runlocal --workdir=/tmp/ccvit_smoke

Values and where they come from (the official `Cakeyan/CCViT_Public:README.md` commands and
`run_ccvit_pretraining.py`, docs/reference_details.md#ccvit-recipe; the paper's Table 5):
  * block mask 75/196 (min 16 per block, aspect 0.3-3.33) + 20 replaced patches;
  * 12-layer token block + 2-layer pixel block fed from layer 9; shared relative position
    bias, no absolute positions, layer scale 0.1, drop path 0;
  * AdamW lr 1.5e-3 (not batch-scaled), betas (0.9, 0.98), wd 0.05, clip 3.0, 10 warm-up
    epochs from 0, per-step cosine to 1e-5, batch 2048 (the official run: 128/GPU x update_freq
    2 x 8 GPUs; we use one 2048 batch, which is the same optimisation).
  * crops: shared two-view RandomResizedCrop scale (0.2, 1), bicubic, hflip, and NO colour
    jitter in CCViT's replacing pipeline (`Cakeyan/CCViT_Public:datasets.py`; the paper's
    table says only "RandomResizedAndCrop").
"""

from mim_jax import config_lib


def get_config(arg: str = ""):
  a = config_lib.parse_arg(arg, runlocal=False, variant="B/16", epochs=300)
  c = config_lib.base_config()
  large = a.variant.startswith("L")
  c.model.variant = a.variant
  c.model.layer_scale_init = 1e-5 if large else 0.1  # official large script: 1e-5
  c.model.drop_path_rate = 0.0

  c.method = config_lib.mlc.ConfigDict()
  c.method.name = "ccvit"
  c.method.num_masked = 75
  c.method.num_replaced = 20
  c.method.min_block = 16
  c.method.min_aspect = 0.3
  c.method.early_layers = 21 if large else 9  # the pixel block's input layer
  c.method.head_layers = 2
  c.method.token_loss_weight = 1.0
  c.method.pixel_loss_weight = 1.0

  c.tokenizer = config_lib.mlc.ConfigDict()
  c.tokenizer.kind = "centroids"
  c.tokenizer.path = ""  # prefix of <path>.npy / <path>.json (build_centroids)
  c.tokenizer.k = 8192
  c.tokenizer.build_if_missing = False
  c.tokenizer.images_per_class = 50
  c.tokenizer.iters = 20
  c.tokenizer.seed = 1

  # CCViT's replacing pipeline has no colour jitter (Cakeyan/CCViT_Public:datasets.py).
  c.data.color_jitter = 0.0
  c.batch_size = 2048
  c.total_steps = config_lib.steps_for_epochs(a.epochs, c.batch_size)
  c.optim.warmup_steps = config_lib.steps_for_epochs(10, c.batch_size)
  c.optim.lr, c.optim.min_lr = 1.5e-3, 1e-5
  c.optim.b1, c.optim.b2 = 0.9, 0.98
  c.log_every = 100
  c.checkpoint_every = 2000

  if a.runlocal:
    apply_runlocal(c)
  return c


def apply_runlocal(c):
  """Shrinks to a CPU smoke run, rescaling the mask counts to the smaller patch grid."""
  config_lib.runlocal(c)
  patch = int(c.model.variant.split("/")[1])
  n = (c.data.image_size // patch) ** 2
  c.method.num_masked = round(75 / 196 * n)
  c.method.num_replaced = round(20 / 196 * n)
  c.method.min_block = max(1, round(16 / 196 * n))
  c.method.early_layers = max(1, c.model.depth * 3 // 4)
  c.tokenizer.k = 256
  c.tokenizer.build_if_missing = True
  c.tokenizer.images_per_class = 50
  c.tokenizer.iters = 10
