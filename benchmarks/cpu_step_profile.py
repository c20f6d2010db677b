"""Where the CCViT training step spends its time on the CPU, per XLA operation.

  taskset -c 0 python benchmarks/cpu_step_profile.py --variant=T/16 --batch=32

Builds the trainer's own step (`mim_jax.train.build_step_for_benchmark`, fp32, the bench's
inputs), traces one step with XLA:CPU's per-thunk trace events on
(`--xla_cpu_enable_xprof_traceme`), and prints the time per fusion kind and the costliest
operations with their HLO shapes, from the trace's xplane (read with TensorFlow's copy of the
xplane proto). One core (`taskset -c 0`) keeps operations from overlapping, so the times add
up to the step. BENCHMARKS.md §11 has a reading.
"""

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]

import ccvit_step_bench as bench  # noqa: E402
import jax  # noqa: E402

from configs import ccvit_vitb  # noqa: E402
from mim_jax import train  # noqa: E402


def op_times(trace_dir: str) -> collections.Counter:
  """Milliseconds per HLO operation name over XLA:CPU's worker threads."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top

  path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
  space = xplane_pb2.XSpace()
  with open(path, "rb") as f:
    space.ParseFromString(f.read())
  total = collections.Counter()
  for plane in space.planes:
    names = {k: v.name for k, v in plane.event_metadata.items()}
    for line in plane.lines:
      if "Eigen" not in line.name:  # XLA:CPU's intra-op pool runs the thunks
        continue
      for ev in line.events:
        name = names.get(ev.metadata_id, "?")
        if not name.startswith("ThunkExecutor"):
          total[name] += ev.duration_ps / 1e9
  return total


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variant", default="T/16")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--top", type=int, default=25)
  args = ap.parse_args()
  patch = int(args.variant.split("/")[1])
  config = ccvit_vitb.get_config("")
  with config.unlocked():
    config.model.variant, config.batch_size, config.dtype = args.variant, args.batch, "float32"
  inputs = bench.make_inputs(args.batch, config.data.image_size, 0, patch)
  step, state, frozen, batch = train.build_step_for_benchmark(config, batch_inputs=inputs)
  hlo = step.lower(state, frozen, batch).compile().as_text()
  for _ in range(2):
    state, _ = step(state, frozen, batch)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  state, _ = step(state, frozen, batch)
  jax.block_until_ready(state)
  print(f"step {time.perf_counter() - t0:.2f} s untraced")
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    state, _ = step(state, frozen, batch)
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    times = op_times(trace_dir)
  shapes = {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) (\w+)", line)
    if m:
      shapes.setdefault(m.group(1), f"{m.group(3)} {m.group(2)}")
  kinds = collections.Counter()
  for name, ms in times.items():
    kinds[re.sub(r"\.\d+$", "", name)] += ms
  print(f"traced operations: {sum(times.values()):.0f} ms")
  for kind, ms in kinds.most_common(args.top):
    print(f"{ms:8.1f} ms  {kind}")
  print("costliest operations:")
  for name, ms in times.most_common(args.top):
    print(f"{ms:8.1f} ms  {name:28s} {shapes.get(name, '')[:90]}")


if __name__ == "__main__":
  main()
