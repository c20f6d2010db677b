"""Fields every evaluation config has (configs/eval/*.py), and the `:runlocal` shrink.

ImageNet-1k defaults: TFDS imagenet2012 train / validation, 224 px, Resize 256 ->
CenterCrop 224 bicubic for evaluation (timm's crop_pct 0.875, as BEiT's fine-tuning and
linear-probe scripts), the ImageNet mean / std.
"""

from __future__ import annotations

import ml_collections as mlc

from mim_jax import config_lib

IMAGENET_VAL_SIZE = 50_000


def base(protocol: str) -> mlc.ConfigDict:
  c = mlc.ConfigDict()
  c.protocol = protocol  # 'knn' | 'linear_probe' | 'finetune'
  c.init = ""  # workdir | .pth | .npz | 'random'
  c.init_step = 0  # a workdir's checkpoint step (0: the latest)
  c.seed = 0
  c.dtype = "float32"
  config_lib.add_runner_fields(c)
  c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1))
  c.sharding_rules = (("act_batch", ("data", "fsdp")), ("embed", "fsdp"))
  c.pool = "mean"  # 'mean' (patch tokens) | 'cls'

  c.batch_size = 1024  # global training batch (probe / fine-tune)
  c.eval_batch_size = 1000
  c.total_steps = 1000
  c.log_every = 100
  c.eval_every = 0  # 0: evaluate at the end only
  c.checkpoint_every = 1000
  c.keep_checkpoints = 2
  c.async_checkpointing = True

  # The encoder's architecture where the weights do not say it (head count, sin-cos
  # positions), and the whole architecture of init='random'.
  c.model = mlc.ConfigDict()
  c.model.variant = "B/16"
  c.model.width = 0
  c.model.depth = 0
  c.model.heads = 0
  c.model.rel_pos = "shared"  # for init='random' only; loaded weights decide
  c.model.abs_pos = "auto"  # 'auto' | 'none' | 'learned' | 'sincos' (CAE v2)
  c.model.layer_scale_init = 0.1
  c.model.drop_path_rate = 0.0  # fine-tuning only
  c.model.add_rel_pos = False  # fine-tuning: add zero-init per-layer rel-pos tables
  # to an encoder without them (CAE v2 --rel_pos_bias)
  c.model.scan_layers = False
  c.model.remat = False

  c.data = mlc.ConfigDict()
  c.data.source = "tfds"
  c.data.name = "imagenet2012"
  c.data.path = ""
  c.data.data_dir = ""
  c.data.train_split = "train"
  c.data.test_split = "validation"
  c.data.num_classes = 1000
  c.data.max_bad_fraction = 0.01  # unreadable examples skipped, then a stop
  c.data.num_train_examples = config_lib.IMAGENET_TRAIN_SIZE
  c.data.length = 1024  # embedded source only
  c.data.image_size = 224
  c.data.crop_pct = 0.875  # eval: Resize(image_size / crop_pct) -> CenterCrop
  c.data.eval_resize = 0  # > 0 overrides the resize
  c.data.interpolation = "bicubic"
  c.data.worker_count = 8
  # Training views (probe without precomputed features; fine-tuning).
  c.data.crop_scale = (0.08, 1.0)
  c.data.hflip = True
  c.data.rand_augment = ""  # fine-tuning: 'rand-m9-mstd0.5-inc1'
  c.data.reprob = 0.0  # fine-tuning: 0.25

  c.knn = mlc.ConfigDict(dict(k=20, temperature=0.07))
  c.probe = mlc.ConfigDict(dict(precompute_features=False, batch_norm=True))

  c.optim = mlc.ConfigDict()
  c.optim.name = "adamw"  # 'adamw' | 'lars' (probe); fine-tuning is AdamW
  c.optim.lr = 0.0  # absolute; 0 -> base_lr * batch / 256
  c.optim.base_lr = 0.0
  c.optim.min_lr = 0.0
  c.optim.warmup_steps = 0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.momentum = 0.9  # LARS
  c.optim.trust_coefficient = 0.001  # LARS
  c.optim.clip_grad_norm = 0.0
  c.optim.layer_decay = 1.0
  c.optim.no_decay_names = ("cls_token", "pos_embed")

  c.aug = mlc.ConfigDict(
    dict(mixup=0.0, cutmix=0.0, mixup_prob=1.0, mixup_switch_prob=0.5, label_smoothing=0.0)
  )
  c.head_init_scale = 0.001
  c.ema_decay = 0.0  # > 0: also evaluate an EMA of the weights (0.9999)
  c.rel_pos_interpolation = "cubic"  # BEiT's; 'linear' = timm's default
  return c


def set_epochs(c: mlc.ConfigDict, epochs: float, warmup_epochs: float = 0.0) -> None:
  """total_steps / warmup_steps from epochs of config.data.num_train_examples."""
  c.total_steps = max(
    1, config_lib.steps_for_epochs(epochs, c.batch_size, c.data.num_train_examples)
  )
  c.optim.warmup_steps = config_lib.steps_for_epochs(
    warmup_epochs, c.batch_size, c.data.num_train_examples
  )
  steps_per_epoch = max(1, c.data.num_train_examples // c.batch_size)
  c.checkpoint_every = min(c.total_steps, 5 * steps_per_epoch)
  c.log_every = min(100, c.total_steps)


def runlocal(c: mlc.ConfigDict, *, epochs: float = 1.0, batch_size: int = 64) -> None:
  """A 2-core CPU smoke run: 32 px Imagenette (../shared/data) with a small ViT.

  Without the shared data the embedded photos stand in (3 'classes', train = test): the run
  then only shows that the pipeline works, not a meaningful accuracy.
  """
  npz = config_lib.shared_npz()
  if npz:
    c.data.source, c.data.path = "npz", npz
    c.data.train_split, c.data.test_split = "train", "test"
    c.data.num_classes, c.data.num_train_examples = 10, 9469
    size, patch = 32, 4
  else:
    c.data.source, c.data.path, c.data.length = "embedded", "", 96
    c.data.train_split = c.data.test_split = "train"
    c.data.num_classes, c.data.num_train_examples = 3, 96
    size, patch = 64, 8
  c.data.image_size = size
  c.data.crop_pct = 1.0  # the images are already size x size
  c.data.worker_count = 0
  c.model.variant = f"T/{patch}"  # init='random' only; checkpoints bring their own
  c.model.width, c.model.depth, c.model.heads = 128, 4, 4
  c.batch_size = batch_size
  c.eval_batch_size = 200
  set_epochs(c, epochs, warmup_epochs=min(0.1 * epochs, 1.0))
  c.log_every = min(50, c.total_steps)
  c.eval_every = 0


def finetune_recipe(
  c: mlc.ConfigDict,
  *,
  lr: float,
  epochs: float,
  warmup_epochs: float,
  layer_decay: float,
  drop_path: float,
  label_smoothing: float = 0.1,
  mixup: float = 0.8,
  cutmix: float = 1.0,
  rand_augment_m: int = 9,
  reprob: float = 0.25,
  weight_decay: float = 0.05,
  min_lr: float = 1e-6,
  batch_size: int = 1024,
) -> None:
  """The BEiT fine-tuning protocol (timm augmentation, AdamW, layer decay, per-step cosine)."""
  c.batch_size = batch_size
  c.optim.name = "adamw"
  c.optim.lr, c.optim.min_lr = lr, min_lr
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
  c.optim.weight_decay = weight_decay
  c.optim.layer_decay = layer_decay
  c.optim.clip_grad_norm = 0.0
  c.model.drop_path_rate = drop_path
  c.data.crop_scale = (0.08, 1.0)
  c.data.rand_augment = f"rand-m{rand_augment_m}-mstd0.5-inc1"
  c.data.reprob = reprob
  c.aug.mixup, c.aug.cutmix, c.aug.label_smoothing = mixup, cutmix, label_smoothing
  c.pool = "mean"
  set_epochs(c, epochs, warmup_epochs)
  c.eval_every = c.checkpoint_every


def adamw_probe_recipe(c: mlc.ConfigDict, *, pool: str) -> None:
  """BEiT v2 Sec. 4.2 / MaPeT App. 8: AdamW lr 4e-3, wd 1e-4, 50 epochs, batch 1024, cosine."""
  c.pool = pool
  c.batch_size = 1024
  c.optim.name = "adamw"
  c.optim.lr, c.optim.min_lr, c.optim.weight_decay = 4e-3, 0.0, 1e-4
  c.data.crop_scale = (0.08, 1.0)  # RandomResizedCrop + flip for training, as BEiT's script
  set_epochs(c, 50)
  c.eval_every = c.checkpoint_every


def lars_probe_recipe(c: mlc.ConfigDict, *, pool: str = "cls") -> None:
  """CAE v2 Table 9 (MAE's linprobe): LARS base lr 0.1, wd 0, batch 16384, 10 + 80 epochs."""
  c.pool = pool
  c.batch_size = 16384
  c.optim.name = "lars"
  c.optim.lr, c.optim.base_lr, c.optim.min_lr = 0.0, 0.1, 0.0
  c.optim.weight_decay, c.optim.momentum = 0.0, 0.9
  c.data.crop_scale = (0.08, 1.0)
  set_epochs(c, 90, warmup_epochs=10)
  c.eval_every = c.checkpoint_every


def runlocal_probe(c: mlc.ConfigDict) -> None:
  """Probe smoke run: features precomputed once, 30 epochs of the head on 9,469 images."""
  optimizer = c.optim.name
  runlocal(c, epochs=30, batch_size=256)
  c.probe.precompute_features = True
  if optimizer == "lars":
    c.optim.base_lr = 0.1 * 16384 / 256 / 4  # lr 1.6: the recipe's 6.4 is for batch 16384
  c.eval_every = c.total_steps // 3


def runlocal_finetune(c: mlc.ConfigDict) -> None:
  """Fine-tuning smoke run: the recipe's augmentation and decay on a 4-block ViT, 5 epochs."""
  runlocal(c, epochs=5, batch_size=64)
  c.optim.lr = 1e-3
  c.optim.layer_decay = 0.75
  c.model.drop_path_rate = 0.1
  c.eval_every = c.total_steps
