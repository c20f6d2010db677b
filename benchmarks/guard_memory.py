r"""Memory of a train step without the runner's non-finite guard, compiled for one v5e chip.

  python benchmarks/guard_memory.py ccvit_vitb
  python benchmarks/guard_memory.py mapet_vitb mode=mim

Lowers the trainer's own step (`Trainer.make_step`: no guard) of a paper config for a
compile-only v5e-1 (libtpu), batch 8, bf16, with the stand-ins `mim_jax.aot` uses for frozen
inputs, and prints XLA's memory analysis. Compare with the runner's guarded step:
`python -m mim_jax.aot --config=configs/<config>.py --topology=v5e-1 --config.batch_size=8
--config.dtype=bfloat16` (BENCHMARKS.md §10).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mim_jax import aot  # noqa: E402
from mim_jax import config_lib  # noqa: E402
from mim_jax import sharding  # noqa: E402
from mim_jax import train  # noqa: E402

GIB = 1024**3


def main(name: str, arg: str = "") -> None:
  c = config_lib.load_config(f"configs/{name}.py", arg)
  with c.unlocked():
    aot.use_standins(c)
    c.batch_size, c.dtype = 8, "bfloat16"
  mesh = sharding.make_mesh(c.mesh, aot.target_devices(aot.parse_topology("v5e-1")))
  method, consts = aot.build_abstract_method(c)
  example = {k: np.asarray(v) for k, v in aot.sample_batch(c, method).items()}
  sample = {
    k: jax.ShapeDtypeStruct((c.batch_size,) + v.shape, jax.dtypes.canonicalize_dtype(v.dtype))
    for k, v in example.items()
    if not k.startswith("_")
  }
  trainer = train.Trainer(c, mesh, method)
  state_abs, state_sh = trainer.abstract_state(sample)
  frozen_sh = jax.tree.map(lambda _: sharding.replicated(mesh), consts)
  step = trainer.make_step(state_sh, frozen_sh)
  batch_sh = sharding.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh) for k, v in sample.items()}
  lowered = step.lower(
    aot._abstract(state_abs, state_sh),  # pylint: disable=protected-access
    aot._abstract(consts, frozen_sh),  # pylint: disable=protected-access
    batch,
  )
  m = lowered.compile().memory_analysis()
  print(
    f"{name} {arg} without the guard, v5e-1, batch 8, bf16: arguments "
    f"{m.argument_size_in_bytes / GIB:.2f}, temp {m.temp_size_in_bytes / GIB:.2f}, outputs "
    f"{m.output_size_in_bytes / GIB:.2f}, aliased {m.alias_size_in_bytes / GIB:.2f} GiB"
  )


if __name__ == "__main__":
  main(*sys.argv[1:3])
