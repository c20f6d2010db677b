"""What every absl entry point shares on its command line: `--help` / `-h` print the module's
docstring (with its example commands) and every flag the command takes, then exit 0 (absl
alone exits 1 and lists only flags defined in the main module), and TensorFlow stays quiet
when something imports it."""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

HELP_ARGS = ("--help", "-h", "--helpshort", "-?")


def quiet_tensorflow() -> None:
  """Before TensorFlow's first import (clu's TensorBoard writer, tfds): its start-up lines
  (oneDNN notice, CPU feature guard) are not for our console. Both settings only concern
  TensorFlow's own kernels and logs, which mim_jax uses for event files alone."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def parse(argv, parser=None):
  """absl's flag parsing with `--help` exiting 0; `parser` (default FLAGS) parses the rest."""
  if any(a in HELP_ARGS for a in argv[1:]):
    app.usage(shorthelp=True, writeto_stdout=True)
    print("\nTry --helpfull to get a list of all flags.")
    sys.exit(0)
  return (parser or flags.FLAGS)(argv)
