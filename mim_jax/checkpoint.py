"""Checkpoints: the train state, the data-loader state and per-leaf checksums, via orbax.

Layout of a workdir (the one reader of it for everything outside training is
`read_trained_state` / `saved_config` below):

  DIR/config.json               the run's config and its fingerprint (`write_config`)
  DIR/checkpoints/<step>/state  the train state (orbax StandardSave of a dict pytree: step,
                                params, opt_state, rng, extra, ...; frozen teachers and
                                tokenizers are not in it)
  DIR/checkpoints/<step>/data   JSON {"iterator": <one global JSON text>}: where the data
                                loader continues. Batches depend only on the seed and the
                                global step, so one record serves every process count.
  DIR/checkpoints/<step>/meta   JSON {"version", "leaves": {name: [sum, weighted sum, dtype]}}
  DIR/checkpoints/damaged_<step>_<utc time>   a checkpoint found damaged, moved aside

orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it when every item is
complete, so a killed run or a failed write (full disk) never leaves a half-written step
under a step name, and old steps are deleted only after a newer one is finalised. What
that cannot catch -- a file truncated or garbled afterwards, bytes flipped on the disk --
`restore_latest` catches: a step that fails to read, holds a non-finite float or whose
checksums differ from the ones computed at save time is reported in one line, moved aside
(never deleted) and the next older step is tried.

Every process of a multi-process run calls save / restore_latest / wait / close together;
the checksums are computed on device (one jitted reduction, replicated result), and the
damaged-or-not verdict is agreed across processes before anything is renamed.
"""

from __future__ import annotations

import datetime
import json
import logging as std_logging
import os
import re
import sys
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
ITEMS = ("state", "data", "meta")
CHECKSUM_VERSION = 1
_REASON_BYTES = 512


class CheckpointError(RuntimeError):
  """A checkpoint problem the user must act on (message: one line)."""


class CheckpointWriteError(CheckpointError):
  """Writing a checkpoint failed (full disk, file too large, ...); earlier steps are intact."""


class IncompatibleCheckpointError(CheckpointError, ValueError):
  """The checkpoint's structure or shapes do not fit the current config (not damage)."""


# --------------------------------------------------------------------------- checksums
def leaf_name(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _checked_leaves(tree) -> tuple[list[str], list[Any]]:
  """(names, arrays) of the leaves that carry a checksum: arrays, not Python scalars."""
  names, leaves = [], []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(x, (jax.Array, np.ndarray)) and _bits_kind(x.dtype) is not None:
      names.append(leaf_name(path))
      leaves.append(x)
  return names, leaves


def _bits_kind(dtype) -> str | None:
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return "key"
  dtype = np.dtype(dtype)
  if dtype.kind == "c":
    return "complex"
  if dtype == np.bool_ or dtype.itemsize in (1, 2, 4, 8):
    return "plain"
  return None  # sub-byte types: not checked


def _as_u32(x: jax.Array) -> jax.Array:
  """The leaf's bits as uint32 (narrow types widened, 64-bit types split in two words)."""
  kind = _bits_kind(x.dtype)
  if kind == "key":
    return _as_u32(jax.random.key_data(x))
  if kind == "complex":
    return _as_u32(jnp.stack([jnp.real(x), jnp.imag(x)], -1))
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _sums_and_finite(leaves):
  """Per leaf: [wrap-around sum of the bits, sum of bits * (flat index + 1)] as uint32, and
  whether every float value is finite. A flipped bit changes the first sum; two swapped
  values change the second."""
  sums, finite = [], []
  for x in leaves:
    bits = _as_u32(x).reshape(-1)
    weights = jnp.arange(1, bits.shape[0] + 1, dtype=jnp.uint32)
    sums.append(
      jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])
    )
    inexact = not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) and jnp.issubdtype(
      x.dtype, jnp.inexact
    )
    finite.append(jnp.all(jnp.isfinite(x)) if inexact else jnp.bool_(True))
  if not leaves:
    return jnp.zeros((0, 2), jnp.uint32), jnp.zeros((0,), jnp.bool_)
  return jnp.stack(sums), jnp.stack(finite)


_JITTED: dict = {}


def _replicated_sharding(leaves):
  for x in leaves:
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return None


def checksums(tree) -> tuple[dict[str, list], list[str]]:
  """({leaf name: [sum, weighted sum, dtype]}, names of float leaves holding non-finite
  values), computed on the arrays' own devices in one jitted function; the small result is
  replicated, so every process gets the same numbers. Host numpy leaves are checked on the
  local CPU."""
  names, leaves = _checked_leaves(tree)
  if not names:
    return {}, []
  if all(isinstance(x, np.ndarray) for x in leaves):
    cpu = jax.local_devices(backend="cpu")[0]
    leaves = [jax.device_put(x, cpu) for x in leaves]
  out_sharding = _replicated_sharding(leaves)
  fn = _JITTED.get(out_sharding)
  if fn is None:
    fn = _JITTED[out_sharding] = jax.jit(_sums_and_finite, out_shardings=out_sharding)
  sums, finite = fn(leaves)
  sums, finite = np.asarray(sums), np.asarray(finite)
  table = {n: [int(s[0]), int(s[1]), str(x.dtype)] for n, s, x in zip(names, sums, leaves)}
  return table, [n for n, ok in zip(names, finite) if not ok]


def _verify(tree, meta: dict | None) -> str | None:
  """None if `tree` is finite and matches the checksums in `meta`; else a one-line reason."""
  table, non_finite = checksums(tree)
  if non_finite:
    return f"non-finite values in {non_finite[0]}" + (
      f" and {len(non_finite) - 1} more leaves" if len(non_finite) > 1 else ""
    )
  saved = (meta or {}).get("leaves")
  if not saved:
    return None  # written before checksums existed
  bad = [
    n
    for n, (s, w, dtype) in table.items()
    if n in saved and saved[n][2] == dtype and [s, w] != list(saved[n][:2])
  ]
  if bad:
    return f"checksum mismatch in {bad[0]}" + (
      f" and {len(bad) - 1} more leaves" if len(bad) > 1 else ""
    )
  return None


# --------------------------------------------------------------------------- helpers
def _one_line(e: BaseException, limit: int = 300) -> str:
  """The first line of the innermost cause (orbax wraps tensorstore's precise error)."""
  seen = {id(e)}
  inner = e.__cause__ or e.__context__
  while inner is not None and id(inner) not in seen:
    e, inner = inner, inner.__cause__ or inner.__context__
    seen.add(id(e))
  text = str(e).strip().splitlines()
  text = text[0] if text else ""
  return f"{type(e).__name__}: {text[:limit]}"


_ERRNO_IN_TEXT = re.compile(r"os_error_code='?(\d+)|\[Errno (\d+)\]")
_FILE_IN_TEXT = re.compile(r'Failed (?:writing|to write)[^"]*"([^"]+)"')
_STEP_IN_TMP = re.compile(r"/(\d+)\.orbax-checkpoint-tmp")
_OS_WORDS = (
  "No space left on device",
  "File too large",
  "Disk quota exceeded",
  "Read-only file system",
  "Input/output error",
)


def _write_failure(e: BaseException) -> tuple[str, str, int | None] | None:
  """(OS error text, file, step from the temporary path) when `e` (or what caused it) is
  a failed write, else None. tensorstore reports OS errors as ValueError text."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    text = str(e)
    step = _STEP_IN_TMP.search(text)
    step = int(step.group(1)) if step else None
    if isinstance(e, OSError) and e.errno:
      return f"{e.strerror or os.strerror(e.errno)} [errno {e.errno}]", e.filename or "", step
    m = _ERRNO_IN_TEXT.search(text)
    if m:
      code = int(m.group(1) or m.group(2))
      f = _FILE_IN_TEXT.search(text)
      return f"{os.strerror(code)} [errno {code}]", f.group(1) if f else "", step
    for words in _OS_WORDS:
      if words in text:
        return words, "", step
    e = e.__cause__ or e.__context__
  return None


class _QuietWriteFailures(std_logging.Filter):
  """Drops the tracebacks of a failed write that orbax logs (one per thread) and asyncio
  logs ("exception was never retrieved", one per array): ~200 lines on a full disk. The
  same failure is raised once as CheckpointWriteError."""

  def filter(self, record):
    from_orbax = f"{os.sep}orbax{os.sep}" in record.pathname or record.name == "asyncio"
    if record.levelno < std_logging.ERROR or not from_orbax:
      return True
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
      return _write_failure(record.exc_info[1]) is None
    return _write_failure(ValueError(text)) is None


_FILTER = _QuietWriteFailures()


def _quiet_closed_loop_callbacks() -> None:
  """Installs (once) an unraisable-exception hook that drops "Event loop is closed".

  When one array write or read fails, orbax stops its event loop while tensorstore still
  has operations in flight; as they finish, tensorstore's callbacks hit the closed loop and
  each prints a traceback through sys.unraisablehook. The failure itself is reported once.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_mim_jax_quiet", False):
    return

  def hook(unraisable):
    e, tb = unraisable.exc_value, unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
      tb = tb.tb_next
    in_asyncio = tb is not None and f"{os.sep}asyncio{os.sep}" in tb.tb_frame.f_code.co_filename
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed" and in_asyncio:
      return
    previous(unraisable)

  hook._mim_jax_quiet = True
  sys.unraisablehook = hook


def _agree(code: int, reason: str) -> tuple[int, str]:
  """Across processes: the largest `code` and the reason of the first process with it."""
  if jax.process_count() == 1:
    return code, reason
  buf = np.zeros(_REASON_BYTES + 1, np.int32)
  buf[0] = code
  raw = reason.encode()[:_REASON_BYTES]
  buf[1 : 1 + len(raw)] = np.frombuffer(raw, np.uint8)
  everyone = np.asarray(multihost_utils.process_allgather(buf))
  first = int(np.argmax(everyone[:, 0]))
  row = everyone[first]
  text = bytes(row[1:].astype(np.uint8)).rstrip(b"\0").decode(errors="replace")
  if first != jax.process_index() and text:
    text = f"process {first}: {text}"
  return int(row[0]), text


def _utc_stamp() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _stored_shape(leaf) -> tuple:
  """The shape orbax stores: a typed PRNG key array is saved as its key data."""
  dtype = getattr(leaf, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
  return tuple(getattr(leaf, "shape", np.shape(leaf)))


def _flat_shapes(tree) -> dict[tuple, tuple]:
  """{key path: shape} in orbax's own key naming, so saved and abstract trees compare."""
  return {k: _stored_shape(v) for k, v in ocp.tree.to_flat_dict(tree).items() if v is not None}


def structure_mismatch(saved_tree, abstract) -> str | None:
  """One line saying how a checkpoint's metadata tree differs from `abstract`, or None."""
  saved, wanted = _flat_shapes(saved_tree), _flat_shapes(abstract)
  diffs = [
    f"{'/'.join(k)} is missing from the checkpoint" for k in sorted(set(wanted) - set(saved))
  ]
  diffs += [
    f"the checkpoint has {'/'.join(k)}, the config does not"
    for k in sorted(set(saved) - set(wanted))
  ]
  diffs += [
    f"{'/'.join(k)} has shape {saved[k]} in the checkpoint, the config gives {wanted[k]}"
    for k in sorted(set(saved) & set(wanted))
    if saved[k] != wanted[k]
  ]
  if not diffs:
    return None
  more = f" (and {len(diffs) - 3} more differences)" if len(diffs) > 3 else ""
  return ", ".join(diffs[:3]) + more


class _Damaged(Exception):
  pass


_NOT_DAMAGE = ("RESOURCE_EXHAUSTED", "MemoryError", "PERMISSION_DENIED", "Permission denied")


# --------------------------------------------------------------------------- Checkpointer
class Checkpointer:
  """ocp.CheckpointManager with the items a run needs: state, data (JSON), meta (checksums)."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=True,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
    )  # what a failed or killed write left behind
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
    self._pending_step: int | None = None
    self._write_error: CheckpointWriteError | None = None
    _quiet_closed_loop_callbacks()
    for name in ("absl", "asyncio"):
      logger = std_logging.getLogger(name)
      if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  # ---- writing
  def _raise_write_error(self, e: Exception, step: int | None) -> None:
    failure = _write_failure(e)
    if failure is None:
      raise e
    os_error, path, tmp_step = failure
    step = tmp_step if tmp_step is not None else step
    self.manager.reload()
    kept = self.manager.latest_step()
    kept = (
      f"the previous checkpoint {self.directory}/{kept} is intact"
      if kept is not None
      else "no earlier checkpoint exists"
    )
    where = f" ({path})" if path else ""
    self._write_error = CheckpointWriteError(
      f"cannot write checkpoint {self.directory}/{step}: {os_error}{where}; {kept}"
    )
    raise self._write_error from e

  def save(self, step: int, state: Any, data_state: str | None, *, force: bool = False) -> bool:
    """Saves (asynchronously when configured) state, the data-loader JSON text and the
    state's checksums; a failed write raises CheckpointWriteError here or at the next
    save / wait / close."""
    if self._write_error is not None:
      raise self._write_error
    table, _ = checksums(state)
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave({"iterator": data_state}),
      meta=ocp.args.JsonSave({"version": CHECKSUM_VERSION, "leaves": table}),
    )
    try:
      saved = self.manager.save(step, args=args, force=force)
    except Exception as e:  # pylint: disable=broad-except
      self._raise_write_error(e, self._pending_step if self._pending_step is not None else step)
    if saved:
      self._pending_step = step
    return saved

  def wait(self):
    if self._write_error is not None:
      raise self._write_error
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._raise_write_error(e, self._pending_step)
    self._pending_step = None

  def close(self):
    if self._write_error is not None:  # already reported; let orbax release its threads
      try:
        self.manager.close()
      except Exception:  # pylint: disable=broad-except
        pass
      return
    self.wait()
    self.manager.close()

  # ---- reading
  def _step_dir(self, step: int) -> epath.Path:
    return epath.Path(self.directory) / str(step)

  def _check_fits(self, step: int, abstract_state: Any) -> None:
    """Raises _Damaged if the metadata cannot be read, IncompatibleCheckpointError if the
    structure or a shape differs (the verdict is agreed across processes)."""
    code, reason = 0, ""
    handler = ocp.StandardCheckpointHandler()
    try:
      saved_tree = handler.metadata(self._step_dir(step) / "state").tree
    except Exception as e:  # pylint: disable=broad-except
      code, reason = 2, f"unreadable metadata: {_one_line(e)}"
    finally:
      handler.close()
    if not code:
      mismatch = structure_mismatch(saved_tree, abstract_state)
      code, reason = (1, mismatch) if mismatch else (0, "")
    code, reason = _agree(code, reason)
    if code == 2:
      raise _Damaged(reason)
    if code == 1:
      raise IncompatibleCheckpointError(
        f"checkpoint {self.directory}/{step} does not fit the current config: {reason}; "
        f"use a new --workdir or the config it was written with"
      )

  def _read(self, step: int, abstract_state: Any) -> tuple[Any, str | None]:
    """(state, data text) of a step that fits; raises _Damaged (agreed across processes)."""
    self._check_fits(step, abstract_state)
    path = self._step_dir(step)
    state, data, meta, reason = None, None, None, ""
    handler = ocp.StandardCheckpointHandler()
    try:
      state = handler.restore(path / "state", args=ocp.args.StandardRestore(abstract_state))
      data = ocp.JsonCheckpointHandler().restore(path / "data")
      if (path / "meta").exists():
        meta = ocp.JsonCheckpointHandler().restore(path / "meta")
    except Exception as e:  # pylint: disable=broad-except
      reason = _one_line(e)
    finally:
      handler.close()
    # Out of memory or no permission says nothing about the files: never moved aside.
    not_damage = any(words in reason for words in _NOT_DAMAGE)
    code, reason = _agree(2 if not_damage else 1 if reason else 0, reason)
    if code == 2:
      raise CheckpointError(f"cannot read checkpoint {self.directory}/{step}: {reason}")
    if code:
      raise _Damaged(reason)
    reason = _verify(state, meta)  # replicated result: the same verdict on every process
    if reason:
      raise _Damaged(reason)
    return state, (data or {}).get("iterator")

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, str | None]:
    """(state, data text) of one given step; damage raises CheckpointError (nothing moved)."""
    try:
      return self._read(step, abstract_state)
    except _Damaged as e:
      raise CheckpointError(f"checkpoint {self.directory}/{step} is damaged ({e})") from None

  def _move_aside(self, step: int) -> str:
    """Renames a damaged step out of orbax's sight (process 0), the same name everywhere."""
    name, error = f"damaged_{step}_{_utc_stamp()}", ""
    if jax.process_index() == 0:
      try:
        os.rename(os.path.join(self.directory, str(step)), os.path.join(self.directory, name))
      except OSError as e:
        error = _one_line(e)
    if jax.process_count() > 1:  # process 0's name and outcome, after its rename
      raw = np.zeros(_REASON_BYTES, np.uint8)
      text = f"{name}|{error}".encode()[:_REASON_BYTES]
      raw[: len(text)] = np.frombuffer(text, np.uint8)
      raw = np.asarray(multihost_utils.broadcast_one_to_all(raw))
      name, error = bytes(raw).rstrip(b"\0").decode().split("|", 1)
      multihost_utils.sync_global_devices(f"mim_jax checkpoint: moved {step} aside")
    if error:
      raise CheckpointError(
        f"checkpoint {self.directory}/{step} is damaged and cannot be moved aside: {error}"
      )
    self.manager.reload()
    return os.path.join(self.directory, name)

  def restore_latest(self, abstract_state: Any) -> tuple[int | None, Any, str | None]:
    """(step, state, data text) of the newest intact step, or (None, None, None) if there
    is no checkpoint. Damaged steps are logged (one line each) and moved aside; a step that
    does not fit `abstract_state` raises IncompatibleCheckpointError."""
    damaged: list[tuple[int, str, str]] = []  # (step, reason, new path)

    def report(outcome: str):
      for step, reason, moved in damaged:
        where = f"{self.directory}/{step}"
        logging.warning(
          "checkpoint %s is damaged (%s): kept as %s, %s", where, reason, moved, outcome
        )

    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, data = self._read(step, abstract_state)
      except _Damaged as e:
        damaged.append((step, str(e), self._move_aside(step)))
        continue
      except IncompatibleCheckpointError:
        report(f"and step {step} does not fit the current config")
        raise
      report(f"resuming from step {step}")
      return step, state, data
    if damaged:
      report("no intact checkpoint is left")
      listing = "; ".join(f"step {s} ({r}) kept as {m}" for s, r, m in damaged)
      raise CheckpointError(
        f"every checkpoint in {self.directory} is damaged: {listing}; re-running starts from step 0"
      )
    return None, None, None


# --------------------------------------------------------------------------- readers
def _listed_steps(directory: str) -> list[int]:
  return sorted(
    (int(p.name) for p in ocp.utils.checkpoint_steps_paths(directory) if p.name.isdigit()),
    reverse=True,
  )


def _read_params_extra(path: epath.Path) -> tuple[dict, dict]:
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(path / "state").tree
    if "params" not in tree:
      raise ValueError(f"no 'params' in the state (keys {sorted(tree)})")
    wanted = {k: tree[k] for k in ("params", "extra") if tree.get(k)}
    as_numpy = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
      wanted,
      is_leaf=lambda x: not isinstance(x, (dict, list, tuple)),
    )
    out = handler.restore(
      path / "state",
      args=ocp.args.PyTreeRestore(item=wanted, restore_args=as_numpy, partial_restore=True),
    )
  finally:
    handler.close()
  return out["params"], out.get("extra", {}) or {}


def read_trained_state(workdir: str, step: int | None = None) -> tuple[dict, dict, int]:
  """(params, extra, step) of a mim_jax workdir as host numpy arrays, on any topology.

  `extra` holds the mutable collections (codebooks, their statistics); the optimizer state
  is not read. With `step` None the newest intact step is used: a damaged newer one
  (unreadable, non-finite, checksum mismatch) is skipped with one warning line but left
  where it is -- a reader may run beside a live trainer, which alone moves steps aside.
  """
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{workdir} has no checkpoints directory: not a mim_jax workdir")
  steps = _listed_steps(directory)
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(
        f"{workdir} has no checkpoint at step {step} (steps: {sorted(steps)})"
      )
    steps = [step]
  if not steps:
    raise FileNotFoundError(f"{directory} holds no complete checkpoint")
  skipped = []
  for s in steps:
    path = epath.Path(directory) / str(s)
    try:
      params, extra = _read_params_extra(path)
      meta = (
        ocp.JsonCheckpointHandler().restore(path / "meta") if (path / "meta").exists() else None
      )
    except Exception as e:  # pylint: disable=broad-except
      reason = _one_line(e)
    else:
      names = {
        leaf_name(p)
        for p, _ in jax.tree_util.tree_flatten_with_path({"params": params, "extra": extra})[0]
      }
      if meta and meta.get("leaves"):
        meta = dict(meta, leaves={k: v for k, v in meta["leaves"].items() if k in names})
      reason = _verify({"params": params, "extra": extra}, meta)
    if not reason:
      for bad, why in skipped:
        logging.warning(
          "checkpoint %s/%d is damaged (%s): reading step %d instead", directory, bad, why, s
        )
      return params, extra, s
    skipped.append((s, reason))
  listing = "; ".join(f"step {s} ({r})" for s, r in skipped)
  raise CheckpointError(f"no intact checkpoint in {directory}: {listing}")


def saved_config(workdir: str) -> dict:
  """The config a workdir was trained with (DIR/config.json's "config")."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} has no {CONFIG_FILE}: not a mim_jax training workdir")
  with open(path) as f:
    return json.load(f)["config"]


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
        f"the config now says {fingerprint.get(key)!r}; use a new --workdir"
      )


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
