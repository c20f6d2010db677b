r"""How long the command line takes to answer: `--help` of each entry point and a config
error of the trainer, median of N runs each, wall time of the whole process.

  python benchmarks/cli_startup.py --repeats=5

Results in BENCHMARKS.md §12. The environment is the user's: no TF_CPP_MIN_LOG_LEVEL.
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {
  "train --help": ["-m", "mim_jax.train", "--help"],
  "train config error": [
    "-m",
    "mim_jax.train",
    "--config=configs/ccvit_demo.py",
    "--config.no_such_field=1",
    "--workdir=/tmp/mim_jax_cli_bench",
  ],
  "evaluate --help": ["-m", "mim_jax.evaluate", "--help"],
  "aot --help": ["-m", "mim_jax.aot", "--help"],
  "export --help": ["-m", "mim_jax.export", "--help"],
  "plot --help": ["-m", "mim_jax.plot", "--help"],
  "tokenize --help": ["-m", "mim_jax.tokenize", "--help"],
}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()
  env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
  print(
    f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
  )
  print("| command | median s | min s | max s | TF lines |")
  print("|---|---|---|---|---|")
  for name, argv in COMMANDS.items():
    times, noisy = [], 0
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      r = subprocess.run([sys.executable] + argv, cwd=ROOT, env=env, capture_output=True, text=True)
      times.append(time.perf_counter() - t0)
      noisy += sum("oneDNN" in l or "cpu_feature_guard" in l for l in r.stderr.splitlines())
    print(
      f"| `{name}` | {statistics.median(times):.2f} | {min(times):.2f} | {max(times):.2f} | "
      f"{noisy} |"
    )


if __name__ == "__main__":
  main()
