r"""PeCo tokenizer: convolutional VQ-VAE + perceptual loss on ImageNet-1k, 100 epochs.

The PeCo code is not public (docs/reference_details.md#peco), so this recipe follows the paper
(PeCo appendix "Perceptual Codebook Learning Setup" and "VQ-VAE Architectures"): 224 px,
16x down-sampling -> 14 x 14 codes, 64 base channels, two residual blocks per resolution,
GroupNorm, self-attention at the lowest resolution, EMA codebook of 8192 (beta 0.25),
loss = L1 pixel + 1.0 x perceptual (blocks 3/6/9/12 of a self-supervised ViT-B/16, MoCo v3
in the paper) + commitment; Adam betas (0.5, 0.95), lr 5e-5, batch 128, 5,000 warm-up
iterations, 100 epochs; optional PatchGAN loss with weight 0.4 (`:gan`).

Command (the teacher conversion is optional; it lets training run without torch):
  python -m mim_jax.teachers.perceptual --checkpoint=$CKPT/vit-b-300ep.pth.tar \
      --out=$CKPT/mocov3_vitb16.npz
  python -m mim_jax.train --config=configs/peco_vqvae.py \
      --config.perceptual.path=$CKPT/mocov3_vitb16.npz --workdir=$WORKDIR/peco_vqvae
then use it: config.tokenizer.kind='peco', path=$WORKDIR/peco_vqvae (online or through
`python -m mim_jax.tokenize --config=configs/tokenize.py:tokenizer=peco ...`).
MoCo v3 released ViT-B/16 at 300 epochs (vit-b-300ep.pth.tar); the paper used a 100-epoch
one, which is not public. DINO's dino_vitbase16_pretrain.pth works too (load_dino).

Expected result: the paper reports no reconstruction numbers or codebook usage; it reports
the downstream effect: BEiT-style pre-training on these tokens gives ViT-B 84.1 % (300 ep) /
84.5 % (800 ep) ImageNet-1k top-1 after fine-tuning (Tables 1, 2), and 29.7 % linear-probe
accuracy on average-pooled codewords (Table 4). A healthy run keeps most of the 8192 codes
in use (`codebook_active`, and python -m mim_jax.tokenizer_report --tokenizer=peco:<workdir>).

Choices where the paper is silent or inconsistent (each stated in the code):
  * ch_mult = (1, 2, 4, 8, 8): the text says the width doubles at every down-sampling,
    which with four would reach 1024 channels and a 92.3M-parameter encoder; Table 2's
    37.5M tokenizer matches widths capped at 512 (encoder 35.49M + the 8192 x 256 codebook
    2.10M = 37.59M). `--config.vqvae.ch_mult="(1,2,4,8,16)"` gives the literal reading.
  * code dimension 256, GroupNorm 32 groups / eps 1e-6, [-1, 1] inputs (VQGAN);
  * data: RandomResizedCrop(224, scale (0.08, 1), bicubic) + hflip, no colour jitter (as
    BEiT v2's VQ-KD tokenizer, `microsoft/unilm:beit2/datasets.py`); lr constant after
    warm-up (no decay mentioned);
    no weight decay (Adam), no gradient clipping;
  * GAN: starts after the warm-up (gan.start), constant weight 0.4, Eq. 8 log-loss.

Smoke run on 2 CPU cores (../shared/data 32 px images, a small VQ-VAE with 4x
down-sampling -> 8 x 8 codes, 1,024 codes, a small random perceptual ViT standing in for
MoCo v3; 200 steps, ~3.5 min):
  python -m mim_jax.train --config=configs/peco_vqvae.py:runlocal --workdir=/tmp/peco_smoke
Expected: loss 0.48 -> 0.24 (PSNR 12.8 -> 17.4 dB), and 78 % of the 1,024 codes used on 2,000
test images (python -m mim_jax.tokenizer_report --tokenizer=peco:/tmp/peco_smoke ...).
"""

from mim_jax import config_lib
from mim_jax.tokenizers import peco


def get_config(arg: str = ""):
  a = config_lib.parse_arg(arg, runlocal=False, gan=False, epochs=100)
  c = config_lib.base_config()

  c.method = config_lib.mlc.ConfigDict()
  c.method.name = "peco_vqvae"
  c.method.pixel_loss = "l1"  # Eq. 3: 1/(HW3) ||x - x_hat||
  c.method.pixel_weight = 1.0
  c.method.perceptual_weight = 1.0  # lambda (Table 10: 1)

  c.vqvae = config_lib.mlc.ConfigDict(dict(peco.DEFAULTS))
  c.vqvae.ch_mult = (1, 2, 4, 8, 8)  # see the docstring: matches Table 2's 37.5M

  c.perceptual = config_lib.mlc.ConfigDict()
  c.perceptual.path = ""  # MoCo v3 / DINO checkpoint, converted .npz, or random:B/16
  c.perceptual.layers = (3, 6, 9, 12)
  c.perceptual.channel_reduction = "mean"  # Eq. 4's 1/(C H W); 'sum': LPIPS-style
  c.perceptual.num_heads = 0  # 0: from the checkpoint kind (ViT-B: 12)

  c.gan = config_lib.mlc.ConfigDict()
  c.gan.enabled = a.gan
  c.gan.weight = 0.4  # the paper's adversarial weight
  c.gan.start = 5000  # steps before the GAN terms switch on (not in the paper)
  c.gan.loss = "vanilla"  # Eq. 8 log-loss; 'hinge': VQGAN's default
  c.gan.ndf = 64
  c.gan.n_layers = 3

  c.data.image_size = c.data.second_image_size = 224
  c.data.crop_scale = (0.08, 1.0)
  c.data.color_jitter = 0.0
  c.data.hflip = True
  c.batch_size = 128
  c.total_steps = config_lib.steps_for_epochs(a.epochs, c.batch_size)
  c.optim.lr = c.optim.min_lr = 5e-5  # constant after the warm-up
  c.optim.warmup_steps = 5000
  c.optim.b1, c.optim.b2 = 0.5, 0.95
  c.optim.weight_decay = 0.0  # Adam (optax.adamw with wd 0 is Adam)
  c.optim.clip_grad_norm = 0.0
  c.log_every = 100
  c.checkpoint_every = 5000
  c.vis_every = 5000

  if a.runlocal:
    apply_runlocal(c)
  return c


def apply_runlocal(c):
  """32 px, a small VQ-VAE (4x down-sampling), 1,024 codes, a small random teacher."""
  config_lib.runlocal(c)
  c.vqvae.update(
    ch=32,
    ch_mult=(1, 2, 4),
    num_res_blocks=1,
    z_channels=64,
    embed_dim=32,
    num_groups=8,
    num_codes=1024,
  )
  # Flagged deviation, smoke run only: without dead-code restarts this short run keeps only
  # ~40 of the 1,024 codes (measured on the test split after 100 steps: 38 at lr 2e-4, 59
  # with k-means init); re-seeding codes whose EMA count falls below 0.3 keeps ~650.
  c.vqvae.restart_dead_codes = True
  c.vqvae.dead_code_threshold = 0.3
  patch = 4 if c.data.image_size == 32 else 8
  c.perceptual.path = f"random:T/{patch},width=64,depth=4,heads=4"
  c.perceptual.layers = (1, 2, 3, 4)
  c.gan.start = 20
  c.gan.ndf = 16
  c.gan.n_layers = 2
  c.data.crop_scale = (0.35, 1.0)
  c.optim.lr = c.optim.min_lr = 1e-3
  c.total_steps = 200
  c.log_every = 20
  c.checkpoint_every = 100
  c.vis_every = 0
