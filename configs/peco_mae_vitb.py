r"""PeCo-MAE: ViT-B/16 with MAE's asymmetric encoder-decoder predicting PeCo tokens (PeCo
paper, "Accelerated BERT pre-training over PeCo", Table 8: 800 epochs).

The PeCo code is not public and the paper gives no PeCo-MAE hyper-parameters beyond "the
network structure in (He et al. 2021)" and 800 epochs, so this uses MAE's official recipe:
random masking of 75 % (147 of 196 patches), encoder on the visible patches with fixed sin-cos
positions and no layer scale, a 512-d, 8-block, 16-head decoder, CE on the masked patches;
batch 4096, AdamW lr 1.5e-4 x batch / 256 = 2.4e-3, betas (0.9, 0.95), wd 0.05, 40 warm-up
epochs, cosine to 0, RandomResizedCrop(224, scale (0.2, 1)) + flip, no colour jitter. The
tokenizer sees the second view (the same crop) online, or use a token cache.

Command:
  python -m mim_jax.train --config=configs/peco_mae_vitb.py \
      --config.tokenizer.path=$WORKDIR/peco_vqvae --workdir=$WORKDIR/peco_mae_vitb

Expected result (PeCo Table 8): 84.2 % ImageNet-1k top-1 after fine-tuning (MAE with
pixels: 83.4 %), with configs/eval/finetune.py.

Smoke run (2 CPU cores, 32 px, patch 4, a 256-centroid pixel tokenizer standing in):
  python -m mim_jax.train --config=configs/peco_mae_vitb.py:runlocal --workdir=/tmp/peco_mae
"""

from mim_jax import config_lib


def get_config(arg: str = ""):
  a = config_lib.parse_arg(arg, runlocal=False, epochs=800)
  c = config_lib.base_config()
  c.model.variant = "B/16"
  c.model.layer_scale_init = 0.0
  c.model.drop_path_rate = 0.0

  c.method = config_lib.mlc.ConfigDict()
  c.method.name = "peco_mae"
  c.method.num_masked = 147  # 75 % of 196
  c.method.decoder_dim = 512
  c.method.decoder_depth = 8
  c.method.decoder_heads = 16

  c.tokenizer = config_lib.mlc.ConfigDict()
  c.tokenizer.kind = "peco"
  c.tokenizer.path = ""  # a configs/peco_vqvae.py workdir
  c.tokenizer.cache = ""
  c.tokenizer.build_if_missing = False
  c.tokenizer.k = 8192
  c.tokenizer.images_per_class = 50
  c.tokenizer.iters = 20
  c.tokenizer.seed = 1

  c.data.image_size = c.data.second_image_size = 224
  c.data.crop_scale = (0.2, 1.0)
  c.data.color_jitter = 0.0
  c.batch_size = 4096
  c.total_steps = config_lib.steps_for_epochs(a.epochs, c.batch_size)
  c.optim.warmup_steps = config_lib.steps_for_epochs(40, c.batch_size)
  c.optim.lr, c.optim.min_lr = 1.5e-4 * c.batch_size / 256, 0.0
  c.optim.b1, c.optim.b2 = 0.9, 0.95
  c.optim.weight_decay = 0.05
  c.optim.clip_grad_norm = 0.0
  c.log_every = 100
  c.checkpoint_every = 2000

  if a.runlocal:
    config_lib.runlocal(c)
    patch = int(c.model.variant.split("/")[1])
    n = (c.data.image_size // patch) ** 2
    c.method.num_masked = round(0.75 * n)
    c.method.update(decoder_dim=64, decoder_depth=2, decoder_heads=4)
    c.tokenizer.kind = "centroids"
    c.tokenizer.build_if_missing = True
    c.tokenizer.k = 256
    c.tokenizer.iters = 10
  return c
