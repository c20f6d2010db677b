"""Pre-training methods: each is a small plug-in the one trainer calls.

A method object has:
  prepare(example, rng)              host-side per-example work (masks, ...), numpy only
  init(rng, batch) -> variables      boxed Flax variables ('params' + any mutable collections)
  loss(params, extra, consts, batch, rng, train) -> (loss, metrics, new_extra)
  consts() -> dict of arrays         frozen tensors the step needs (codebooks, teachers)
  frozen_fingerprint() -> dict       config field -> fingerprint of a frozen input (not
                                     checkpointed): "{abspath} sha256:{hex}" of a file or
                                     directory, or the config values that built it; {} if none
  visualize(params, extra, consts, batch) -> uint8 HWC image or None
  encoder_params(params) (static)    the backbone evaluation keeps (from a checkpoint too)
  fingerprint() -> dict              config fields a checkpoint depends on
  wrap_source(source) (optional)     the training source the loader reads (token caches)
  check(config) (optional, static)   config checks that must run before any data is read

Every method honours config.model.scan_layers and config.model.remat for its transformer
blocks or refuses them in `check` with a one-line ValueError naming the field. Methods import
only neutral modules (`common`, `token_targets`), never each other (tests/test_mix_and_match.py).
"""

from __future__ import annotations

import importlib

_METHODS = {
  "beitv2": "mim_jax.methods.beitv2:BEiTv2",
  "caev2": "mim_jax.methods.caev2:CAEv2",
  "ccvit": "mim_jax.methods.ccvit:CCViT",
  "mapet": "mim_jax.methods.mapet:MaPeT",
  "peco_mae": "mim_jax.methods.peco_mae:PeCoMAE",
  "peco_mim": "mim_jax.methods.beitv2:BEiTv2",
  "peco_vqvae": "mim_jax.methods.peco_vqvae:PeCoVQVAE",
  "vqkd": "mim_jax.methods.vqkd:VQKD",
}


def names():
  return sorted(_METHODS)


def _class(config):
  name = config.method.name
  if name not in _METHODS:
    raise ValueError(f"config.method.name: unknown method '{name}'; choose one of {names()}")
  module, cls = _METHODS[name].split(":")
  return getattr(importlib.import_module(module), cls)


def encoder_params(name: str, params):
  """The encoder of a checkpoint of method `name` (evaluation's loader)."""
  if name not in _METHODS:
    raise ValueError(f"unknown method {name!r}; choose one of {names()}")
  module, cls = _METHODS[name].split(":")
  return getattr(importlib.import_module(module), cls).encoder_params(params)


def check(config) -> None:
  """The method's cheap config checks (if it has any), before data or models are built."""
  cls = _class(config)
  if hasattr(cls, "check"):
    cls.check(config)


def build(config, *, workdir: str | None = None, source=None):
  return _class(config)(config, workdir=workdir, source=source)
