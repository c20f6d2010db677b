r"""MaPeT's k-CLIP tokenizer: CLIP RN50x64 layer-4 features, L2 k-means, K = 8192.

Commands (a GPU/TPU host; the OpenAI checkpoint is converted once, torch needed only then):
  python -m mim_jax.teachers.clip --checkpoint=$DATA/clip/RN50x64.pt --out=$DATA/clip/rn50x64.npz
  python -m mim_jax.tokenizers.kclip --config=configs/kclip_rn50x64.py \
      --config.clip=$DATA/clip/rn50x64.npz --config.data.path=$DATA/imagenet \
      --config.out=$DATA/kclip_rn50x64
  python -m mim_jax.tokenize --config=configs/tokenize.py:tokenizer=kclip \
      --config.tokenizer.path=$DATA/kclip_rn50x64 --config.data.source=imagefolder \
      --config.data.path=$DATA/imagenet --config.cache.path=$DATA/tokens/kclip_train

Values (`aimagelab/MaPeT:data/kmeans/`; docs/reference_details.md#k-clip-tokens): 448-px
Resize -> CenterCrop, CLIP mean/std; features 14 x 14 x 4096 (post-ReLU layer 4, before
attention pooling), row-major; plain L2 k-means with K = 8192, 20 iterations, 5 restarts
(faiss nredo; best inertia kept), on 8192 x 512 = 4.19M patches sampled evenly over
ImageNet-train (faiss' max_points_per_centroid).
Memory: 4.19M x 4096 float32 is 69 GB of host memory plus the same on devices (sharded);
lower `sample_patches` on smaller hosts (faiss would subsample to the same bound).

Expected result: a codebook whose tokens give MaPeT ViT-B/16 84.1 % ImageNet-1k top-1 after
fine-tuning (MaPeT Table 8, 1600 epochs); all 8192 codes in use (report: python -m
mim_jax.tokenizer_report --tokenizer=kclip:$DATA/kclip_rn50x64 ...).

Smoke run (2 CPU cores, a small random-weight ModifiedResNet, ~1 min):
  python -m mim_jax.tokenizers.kclip --config=configs/kclip_rn50x64.py:runlocal \
      --config.out=/tmp/kclip
"""

from mim_jax import config_lib


def get_config(arg: str = ""):
  a = config_lib.parse_arg(arg, runlocal=False)
  c = config_lib.mlc.ConfigDict()
  c.clip = ""  # OpenAI .pt, converted .npz, or random:<arch>[,width=..,layers=..]
  c.out = ""
  c.image_size = 448  # 0: the CLIP model's own resolution
  c.k = 8192
  c.iters = 20
  c.redo = 5
  c.sample_patches = 8192 * 512
  c.max_images = 0  # 0: the whole split
  c.batch_size = 64
  c.seed = 1234

  c.data = config_lib.base_config().data
  c.data.source = "imagefolder"
  c.data.split = "train"
  if a.runlocal:
    tiny = config_lib.base_config()
    config_lib.runlocal(tiny)
    c.data = tiny.data
    # 8x8 tokens like the smoke-run student grid: stride-32 layer 4 at 256 px.
    c.clip = "random:RN50,width=8,layers=1-1-1-1"
    c.image_size = 256
    c.k = 256
    c.iters = 10
    c.redo = 1
    c.sample_patches = 256 * 64
    c.max_images = 512
    c.batch_size = 32
  return c
