r"""Token caches for pre-training (python -m mim_jax.tokenize).

MaPeT's default targets, k-CLIP tokens of ImageNet-1k train (CLIP RN50x64 layer-4 features
of a 448-px centre crop, K = 8192; docs/reference_details.md#k-clip-tokens), written once:
  python -m mim_jax.tokenizers.kclip --config=configs/kclip_rn50x64.py \
      --config.clip=$DATA/clip/RN50x64.pt --config.data.path=$DATA/imagenet \
      --config.out=$DATA/kclip_rn50x64
  python -m mim_jax.tokenize --config=configs/tokenize.py:tokenizer=kclip \
      --config.tokenizer.path=$DATA/kclip_rn50x64 \
      --config.data.source=imagefolder --config.data.path=$DATA/imagenet \
      --config.cache.path=$DATA/tokens/kclip_rn50x64_train

VQ-KD tokens (a mim_jax VQ-KD workdir or the official BEiT v2 tokenizer .pth) at
Resize 224 -> CenterCrop 224, the view MaPeT's extract_code.py uses:
  python -m mim_jax.tokenize --config=configs/tokenize.py:tokenizer=vqkd \
      --config.tokenizer.path=$DATA/vqkd_encoder_base_decoder_3x768x12_clip.pth ...

Expected: one row of `num_tokens` int16 ids per training image in <cache>/tokens.npy (196
for k-CLIP / VQ-KD / PeCo at 224 px), <cache>/meta.json recording the tokenizer, view and
source. The reference stores k-CLIP tokens as int16 too. Re-running resumes.

Smoke runs on 2 CPU cores (../shared/data or the embedded photos). A small tokenizer is
built first beside the cache: k-CLIP from a random small ModifiedResNet (the default), or
pixel centroids:
  python -m mim_jax.tokenize --config=configs/tokenize.py:runlocal --config.cache.path=/tmp/tok
  python -m mim_jax.tokenize --config=configs/tokenize.py:runlocal,tokenizer=centroids \
      --config.cache.path=/tmp/tok_centroids
"""

from mim_jax import config_lib


def get_config(arg: str = ""):
  a = config_lib.parse_arg(arg, runlocal=False, tokenizer="kclip")
  c = config_lib.mlc.ConfigDict()
  c.seed = 0
  config_lib.add_runner_fields(c)  # distributed set-up fields (README: pods)

  c.tokenizer = config_lib.mlc.ConfigDict()
  c.tokenizer.kind = a.tokenizer  # centroids | vqkd | peco | kclip
  c.tokenizer.path = ""
  c.tokenizer.build_if_missing = False  # small data only: build centroids / k-CLIP first
  c.tokenizer.k = 8192
  c.tokenizer.iters = 20
  c.tokenizer.images_per_class = 50
  c.tokenizer.patch_size = 16  # centroids only
  c.tokenizer.resize = 0  # centroids: Resize before the crop (0: = size)
  # kclip + build_if_missing only (python -m mim_jax.tokenizers.kclip builds the real one):
  c.tokenizer.clip = ""  # CLIP ResNet: OpenAI .pt, converted .npz, random:..
  c.tokenizer.clip_image_size = 0  # 0: the CLIP model's own resolution
  c.tokenizer.sample_patches = 0  # 0: 64 x k
  c.tokenizer.max_images = 0  # 0: the whole split

  c.data = config_lib.base_config().data
  c.data.split = "train"
  c.data.image_size = 224  # the student's size; the view comes from the tokenizer
  c.data.worker_count = 8

  c.cache = config_lib.mlc.ConfigDict()
  c.cache.path = ""
  c.cache.batch_size = 64
  c.cache.chunk_size = 10_000  # examples per resumable chunk
  c.cache.resize = 0  # override the tokenizer's Resize (0: its default)

  if a.runlocal:
    tiny = config_lib.base_config()
    config_lib.runlocal(tiny)
    c.data = tiny.data
    c.tokenizer.kind = a.tokenizer
    c.tokenizer.build_if_missing = True
    # k-CLIP stand-in: a random small ModifiedResNet; layer 4 (stride 32) at 256 px gives
    # the 8 x 8 grid of the smoke-run student.
    c.tokenizer.clip = "random:RN50,width=8,layers=1-1-1-1"
    c.tokenizer.clip_image_size = 256
    c.tokenizer.max_images = 512
    c.tokenizer.k = 256
    c.tokenizer.iters = 10
    c.tokenizer.images_per_class = 20
    c.tokenizer.patch_size = int(tiny.model.variant.split("/")[1])
    c.cache.batch_size = 64
    c.cache.chunk_size = 2048
  return c
