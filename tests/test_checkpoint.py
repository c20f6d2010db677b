"""Checkpoints that survive damage: fallback, checksums, write failures, the layout reader."""

import glob
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import multihost_util  # tests/, on sys.path under pytest
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mim_jax import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))


def _state(seed: int, *, width: int = 64) -> dict:
  """A tiny train state, `w` sharded over 4 devices as a trainer's would be."""
  mesh = _mesh()
  spec = jax.sharding.PartitionSpec
  rows = jax.sharding.NamedSharding(mesh, spec("data"))
  rep = jax.sharding.NamedSharding(mesh, spec())
  k = jax.random.PRNGKey(seed)
  w = jax.random.normal(k, (width, 64), jnp.float32)
  return {
    "step": jax.device_put(jnp.int32(seed), rep),
    "params": {
      "w": jax.device_put(w, rows),
      "b": jax.device_put(jnp.arange(16, dtype=jnp.bfloat16) / 7, rep),
    },
    "opt_state": {"mu": {"w": jax.device_put(w[:8] * 0.1, rows)}},  # smaller than w
    "rng": jax.device_put(jax.random.fold_in(k, 3), rep),
    "key": jax.device_put(jax.random.key(seed), rep),  # a typed PRNG key array
    "extra": {"codebook": {"centers": jax.device_put(jnp.ones((8, 4)) * seed, rep)}},
  }


def _host(x) -> np.ndarray:
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _save_two(workdir) -> str:
  ckpt = ckpt_lib.Checkpointer(str(workdir), keep=3)
  ckpt.save(10, _state(10), '{"next_step": 10, "seed": 0}')
  ckpt.save(20, _state(20), '{"next_step": 20, "seed": 0}')
  ckpt.close()
  return ckpt.directory


def _largest_file(directory: str) -> str:
  files = [f for f in glob.glob(os.path.join(directory, "**"), recursive=True) if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def _damage_warnings(caplog) -> list[str]:
  return [
    r.getMessage()
    for r in caplog.records
    if r.levelno == logging.WARNING and "is damaged" in r.getMessage()
  ]


def _assert_fell_back(workdir, caplog, expect_reason=None):
  ckpt = ckpt_lib.Checkpointer(str(workdir))
  with caplog.at_level(logging.WARNING):
    step, state, data = ckpt.restore_latest(_abstract(_state(0)))
  ckpt.close()
  assert step == 10 and data == '{"next_step": 10, "seed": 0}'
  np.testing.assert_array_equal(
    np.asarray(state["params"]["w"]), np.asarray(_state(10)["params"]["w"])
  )
  lines = _damage_warnings(caplog)
  assert len(lines) == 1, lines
  assert "\n" not in lines[0] and f"{ckpt.directory}/20 is damaged" in lines[0]
  assert "resuming from step 10" in lines[0]
  if expect_reason:
    assert expect_reason in lines[0], lines[0]
  # Never deleted: moved aside under a name orbax does not read as a step.
  moved = glob.glob(os.path.join(ckpt.directory, "damaged_20_*"))
  assert len(moved) == 1 and os.path.isdir(os.path.join(moved[0], "state"))
  assert not os.path.exists(os.path.join(ckpt.directory, "20"))
  assert ckpt_lib.Checkpointer(str(workdir)).latest_step() == 10
  return lines[0]


def test_restore_latest_returns_the_newest_step_and_its_data_text(tmp_path):
  _save_two(tmp_path)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  step, state, data = ckpt.restore_latest(_abstract(_state(0)))
  assert step == 20 and data == '{"next_step": 20, "seed": 0}'
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(_state(20))):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(_host(got), _host(want))
  assert state["params"]["w"].sharding == _state(0)["params"]["w"].sharding
  ckpt.close()


def test_checkpoint_written_before_checksums_existed_restores(tmp_path):
  directory = os.path.join(tmp_path, "checkpoints")
  with ocp.CheckpointManager(directory, item_names=("state", "data")) as old:
    old.save(
      7,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(_state(7)), data=ocp.args.JsonSave({"iterator": "seven"})
      ),
    )
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  step, state, data = ckpt.restore_latest(_abstract(_state(0)))
  ckpt.close()
  assert (step, data) == (7, "seven")
  np.testing.assert_array_equal(_host(state["params"]["w"]), _host(_state(7)["params"]["w"]))
  assert ckpt_lib.read_trained_state(str(tmp_path))[2] == 7


def test_empty_workdir_restores_nothing(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  assert ckpt.restore_latest(_abstract(_state(0))) == (None, None, None)
  ckpt.close()


def test_truncated_newest_checkpoint_falls_back(tmp_path, caplog):
  directory = _save_two(tmp_path)
  victim = _largest_file(os.path.join(directory, "20", "state"))
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)
  _assert_fell_back(tmp_path, caplog)


def test_flipped_bytes_in_a_parameter_file_fall_back(tmp_path, caplog):
  directory = _save_two(tmp_path)
  victim = _largest_file(os.path.join(directory, "20", "state"))  # params/w's data
  size = os.path.getsize(victim)
  with open(victim, "r+b") as f:
    f.seek(size // 2)
    chunk = f.read(16)
    f.seek(size // 2)
    f.write(bytes(b ^ 0xFF for b in chunk))
  # Whether the compressed chunk still decodes (then the checksum catches it) or not
  # (then the read fails), the damaged step must not be used.
  _assert_fell_back(tmp_path, caplog)


def test_silent_corruption_that_decodes_is_caught_by_the_checksum(tmp_path, caplog):
  """Step 20's arrays replaced by a well-formed write of the same values with two of them
  swapped: every file decodes, only the position-weighted checksum can tell."""
  directory = _save_two(tmp_path)
  swapped = _state(20)
  w = np.asarray(swapped["params"]["w"]).copy()
  w[[3, 40]] = w[[40, 3]]
  swapped["params"]["w"] = jax.device_put(w, swapped["params"]["w"].sharding)
  other = ckpt_lib.Checkpointer(str(tmp_path / "other"))
  other.save(20, swapped, "{}")
  other.close()
  shutil.rmtree(os.path.join(directory, "20", "state"))
  shutil.copytree(
    os.path.join(other.directory, "20", "state"), os.path.join(directory, "20", "state")
  )
  _assert_fell_back(tmp_path, caplog, expect_reason="checksum mismatch in params/w")


def test_non_finite_newest_checkpoint_falls_back(tmp_path, caplog):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  ckpt.save(10, _state(10), '{"next_step": 10, "seed": 0}')
  bad = _state(20)
  bad["params"]["b"] = bad["params"]["b"].at[3].set(jnp.nan)
  ckpt.save(20, bad, '{"next_step": 20, "seed": 0}')
  ckpt.close()
  _assert_fell_back(tmp_path, caplog, expect_reason="non-finite values in params/b")


def test_incompatible_shapes_raise_and_rename_nothing(tmp_path):
  directory = _save_two(tmp_path)
  before = sorted(os.listdir(directory))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError) as e:
    ckpt.restore_latest(_abstract(_state(0, width=32)))
  ckpt.close()
  msg = str(e.value)
  assert "\n" not in msg and f"{directory}/20" in msg and "params/w" in msg
  assert "(64, 64)" in msg and "(32, 64)" in msg and "opt_state" not in msg
  assert sorted(os.listdir(directory)) == before


def test_every_checkpoint_damaged_is_one_error(tmp_path, caplog):
  directory = _save_two(tmp_path)
  for step in (10, 20):
    victim = _largest_file(os.path.join(directory, str(step), "state"))
    with open(victim, "r+b") as f:
      f.truncate(1)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    ckpt.restore_latest(_abstract(_state(0)))
  ckpt.close()
  assert "\n" not in str(e.value) and "step 20" in str(e.value) and "step 10" in str(e.value)
  assert len(glob.glob(os.path.join(directory, "damaged_*"))) == 2


def test_checksums_do_not_depend_on_sharding_and_see_swaps():
  state = _state(5)
  on_device, _ = ckpt_lib.checksums(state)
  on_host, _ = ckpt_lib.checksums(jax.tree.map(_host, state))
  assert {n: v[:2] for n, v in on_device.items()} == {n: v[:2] for n, v in on_host.items()}
  assert set(on_device) >= {"params/w", "params/b", "rng", "key", "step"}
  w = np.asarray(state["params"]["w"]).copy()
  w[0, 0], w[0, 1] = w[0, 1], w[0, 0]
  swapped, _ = ckpt_lib.checksums({"params": {"w": w}})
  assert swapped["params/w"][0] == on_host["params/w"][0]  # same multiset of bits
  assert swapped["params/w"][1] != on_host["params/w"][1]  # caught by position weights
  _, non_finite = ckpt_lib.checksums({"a": np.array([1.0, np.inf]), "b": np.ones(2)})
  assert non_finite == ["a"]


def test_write_failure_is_one_line_and_keeps_the_previous_step(tmp_path):
  directory = _save_two(tmp_path)
  script = textwrap.dedent(f"""
      import resource, signal, sys
      sys.path.insert(0, {ROOT!r})
      import jax, jax.numpy as jnp
      from mim_jax import checkpoint as ckpt_lib
      ckpt = ckpt_lib.Checkpointer({str(tmp_path)!r})
      keys = jax.random.split(jax.random.PRNGKey(0), 4)   # several arrays, several writers
      params = {{f"w{{i}}": jax.random.normal(k, (128, 128)) for i, k in enumerate(keys)}}
      state = {{"params": params}}
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a real EFBIG instead of a signal
      resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
      try:
        ckpt.save(30, state, "{{}}")
        ckpt.wait()
      except ckpt_lib.CheckpointWriteError as e:
        print("error:", e, file=sys.stderr)
        ckpt.close()
        sys.exit(1)
      """)
  proc = subprocess.run(
    [sys.executable, "-c", script],
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert proc.returncode == 1, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert f"{directory}/30" in errors[0] and "File too large" in errors[0], errors[0]
  assert f"{directory}/20 is intact" in errors[0]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  step, _, _ = ckpt.restore_latest(_abstract(_state(0)))
  assert step == 20 and ckpt.latest_step() == 20
  ckpt.close()


def test_read_trained_state_returns_params_and_extra_as_numpy(tmp_path):
  _save_two(tmp_path)
  params, extra, step = ckpt_lib.read_trained_state(str(tmp_path))
  assert step == 20 and set(params) == {"w", "b"} and isinstance(params["w"], np.ndarray)
  np.testing.assert_array_equal(params["w"], np.asarray(_state(20)["params"]["w"]))
  np.testing.assert_array_equal(extra["codebook"]["centers"], np.full((8, 4), 20.0))
  params, _, step = ckpt_lib.read_trained_state(str(tmp_path), step=10)
  assert step == 10
  np.testing.assert_array_equal(params["w"], np.asarray(_state(10)["params"]["w"]))
  with pytest.raises(FileNotFoundError, match="no checkpoint at step 15"):
    ckpt_lib.read_trained_state(str(tmp_path), step=15)


def test_read_trained_state_skips_a_damaged_newest_step_without_moving_it(tmp_path, caplog):
  directory = _save_two(tmp_path)
  victim = _largest_file(os.path.join(directory, "20", "state"))
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)
  with caplog.at_level(logging.WARNING):
    params, _, step = ckpt_lib.read_trained_state(str(tmp_path))
  assert step == 10
  np.testing.assert_array_equal(params["w"], np.asarray(_state(10)["params"]["w"]))
  assert len(_damage_warnings(caplog)) == 1
  assert os.path.isdir(os.path.join(directory, "20"))  # a reader never moves steps


def test_saved_config_reads_config_json(tmp_path):
  ckpt_lib.write_config(str(tmp_path), '{"method": {"name": "ccvit"}}', {"model": "x"})
  assert ckpt_lib.saved_config(str(tmp_path)) == {"method": {"name": "ccvit"}}
  with pytest.raises(FileNotFoundError, match="config.json"):
    ckpt_lib.saved_config(str(tmp_path / "nothing"))


_TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import glob, os, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                               int(os.environ["JAX_NUM_PROCESSES"]),
                               int(os.environ["JAX_PROCESS_ID"]))
    from jax.experimental import multihost_utils
    import jax.numpy as jnp
    import numpy as np
    from mim_jax import checkpoint as ckpt_lib
    workdir = sys.argv[1]
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    def state(seed):
      w = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (64, 64)))
      return {"params": {"w": jax.make_array_from_callback(w.shape, rows, lambda i: w[i])}}
    ckpt = ckpt_lib.Checkpointer(workdir)
    ckpt.save(10, state(10), "ten")
    ckpt.save(20, state(20), "twenty")
    ckpt.close()
    if jax.process_index() == 0:   # damage the part only process 1 wrote (and reads)
      part = glob.glob(os.path.join(ckpt.directory, "20", "state", "ocdbt.process_1", "d", "*"))
      victim = max(part, key=os.path.getsize)
      os.truncate(victim, 100)
    multihost_utils.sync_global_devices("damaged")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state(0))
    ckpt = ckpt_lib.Checkpointer(workdir)
    step, restored, data = ckpt.restore_latest(abstract)
    w = multihost_utils.process_allgather(restored["params"]["w"], tiled=True)
    same = bool(np.array_equal(np.asarray(w), np.asarray(jax.random.normal(
        jax.random.PRNGKey(10), (64, 64)))))
    ckpt.close()
    print("RESULT", jax.process_index(), step, data, same, sorted(os.listdir(ckpt.directory)))
    """)


@pytest.mark.xdist_group("multiprocess")  # one worker runs the multi-process tests in turn
def test_two_processes_agree_on_damage_only_one_of_them_sees(tmp_path):
  """Process 1 alone fails to read its part of step 20; both fall back to step 10 and the
  step is moved aside once, under one name."""
  workdir = str(tmp_path / "w")
  job = multihost_util.launch_local(
    [sys.executable, "-c", _TWO_PROCESS_SCRIPT, workdir], 2, 2, str(tmp_path), "damage"
  )
  codes = job.wait(timeout=240)
  assert codes == [0, 0], job.report()
  results = []
  for path in job.logs:
    with open(path) as f:
      results += [line.split(" ", 2)[2] for line in f if line.startswith("RESULT ")]
  assert len(results) == 2 and results[0] == results[1], job.report()
  assert results[0].startswith("10 ten True ['10', 'damaged_20_"), job.report()
  with open(job.logs[0]) as f:
    warnings = [line for line in f if "is damaged (process 1:" in line]
  assert len(warnings) == 1 and "resuming from step 10" in warnings[0], job.report()
