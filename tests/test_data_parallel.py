"""Data parallelism computes each device's own examples: compiled for 8 (fake) devices with
the batch split over them, no method's train step gathers activations from other devices.

A gather in a data-parallel step means the partitioner could not keep an operation local to
the batch shard, so every device computes it for the global batch: CCViT's chunked centroid
lookup tokenised all 2048 images on each of 256 chips, and PeCo-MAE's unshuffle scattered
the whole batch (BENCHMARKS.md §10, "What the step computes that the method does not need").
Only the gradients' all-reduce crosses devices."""

import re

from absl import flags
import jax
import pytest

flags.FLAGS.mark_as_parsed()

from mim_jax import aot  # noqa: E402
from mim_jax import config_lib  # noqa: E402
from mim_jax import train  # noqa: E402

METHODS = [
  "beitv2_vitb",
  "ccvit_vitb",
  "caev2_vitb",
  "mapet_vitb",
  "peco_vitb",
  "peco_mae_vitb",
  "vqkd_vitb",
  "peco_vqvae",
]
CROSS_DEVICE = re.compile(r"= \S+ (all-gather|all-to-all|collective-permute)(-start)?\(")


@pytest.mark.parametrize("name", METHODS)
def test_data_parallel_step_gathers_nothing(name):
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices: run with the conftest's XLA_FLAGS")
  c = config_lib.load_config(name, "runlocal")
  with c.unlocked():
    c.batch_size = 16  # 2 examples per device
    c.mesh.data = 8
    c.mesh.fsdp = 1
    aot.use_standins(c)
  train.validate_config(c)
  lowered, _, _ = aot.lower_step(c, jax.devices()[:8])
  hlo = lowered.compile().as_text()
  gathers = [line.strip()[:200] for line in hlo.splitlines() if CROSS_DEVICE.search(line)]
  assert not gathers, "\n".join(gathers)
  assert "all-reduce" in hlo  # the gradients: the test sees the data-parallel step
