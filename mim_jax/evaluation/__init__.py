"""Evaluation protocols for pre-trained backbones: kNN, linear probe, fine-tuning.

  knn.py           weighted k-nearest-neighbour classifier on frozen features (DINO)
  linear_probe.py  BatchNorm (no affine) + linear head on frozen features; AdamW or LARS
  finetune.py      classifier ViT, layer-wise lr decay, mixup/cutmix, label smoothing, EMA
  augment.py       RandAugment (timm 'rand-m9-mstd0.5-inc1'), random erasing, mixup/cutmix
  backbones.py     encoders from mim_jax checkpoints and official PyTorch BEiT v2 / CAE v2
  extract.py       mesh-aware feature extraction over a data source
The command-line entry point is `python -m mim_jax.evaluate` (mim_jax/evaluate.py).
"""
