"""Frozen teachers (CLIP, perceptual ViTs) in Flax, with converters from PyTorch weights."""
