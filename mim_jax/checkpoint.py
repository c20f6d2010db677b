"""Checkpoints: orbax CheckpointManager holding the train state and the data-iterator state.

Like MaxText, the input pipeline's state is saved beside the model (as JSON), so a
restarted run reads exactly the batches the uninterrupted run would have read. orbax
writes every step into a temporary directory and renames it when complete, so a killed
run never leaves a half-written "latest" checkpoint, and old ones are deleted only after
a newer one is finalised.
"""
from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"


class IncompatibleCheckpointError(ValueError):
  pass


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager with the items a training run needs."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: str | None, *, force: bool = False) -> bool:
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({"iterator": data_state}))
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, str | None]:
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise IncompatibleCheckpointError(
          f"checkpoint {self.directory}/{step} does not fit the current config "
          f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from e
    return out.state, (out.data or {}).get("iterator")

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def check_config_compatible(workdir: str, fingerprint: dict) -> None:
  """Refuses to resume a workdir whose checkpoints came from another model/method.

  `fingerprint` holds the config fields that decide parameter shapes and meaning. The
  first run writes it to DIR/config.json; later runs must agree field by field.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f).get("fingerprint", {})
  for key in sorted(set(saved) | set(fingerprint)):
    if saved.get(key) != fingerprint.get(key):
      raise IncompatibleCheckpointError(
          f"{path}: checkpoints in this workdir were written with {key}={saved.get(key)!r}, "
          f"the config now says {fingerprint.get(key)!r}; use a new --workdir")


def write_config(workdir: str, config_json: str, fingerprint: dict) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"fingerprint": fingerprint, "config": json.loads(config_json)}, f, indent=1)
  os.replace(tmp, path)  # atomic
  logging.info("wrote %s", path)
