"""Checkpoints: round trips, exact resume after real signals (one process or a job), other meshes, faults."""

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from etils import epath

from bertjax.atomic import os_errno
from bertjax.errors import BertjaxError
from bertjax.metrics import writer as metrics
from bertjax.train import checkpoint, compatibility, manifest, optim, pretrain, save_failures
from bertjax.train import run as run_lib
from tests.support.micro import compiled_steps as _steps
from tests.support.micro import synthetic_batch
from tests.support.runs import launch as _launch
from tests.support.runs import launch_job as _launch_job
from tests.support.runs import run_config as _config
from tests.support.runs import signal_at_step as _signal_at_step
from tests.support.runs import train_args as _train_args


def _leaves_equal(a, b):
  for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)), strict=True):
    np.testing.assert_array_equal(x, y)


def _trained_state(steps, n=2):
  state = steps.init(0)
  batch = {k: jax.device_put(v, steps.batch_sharding) for k, v in synthetic_batch(batch_size=8).items()}
  for _ in range(n):
    state, _ = steps.train(state, batch)
  return state, batch


class _CheckpointCfg(dict):
  def __init__(self, keep=3, keep_period=0, async_=True):
    super().__init__({"async": async_})
    self.keep, self.keep_period = keep, keep_period


def test_every_leaf_round_trips_and_lands_on_another_mesh(tmp_path):
  saved_on = _steps((1, 4, 1))  # fsdp over 4 of the 8 devices
  state, batch = _trained_state(saved_on)
  with checkpoint.Checkpoints(tmp_path, _CheckpointCfg()) as ckpts:
    ckpts.save(state, {"data": {"step": 2}, "note": "x"})
  restore_on = _steps((2, 1, 1), devices=jax.devices()[4:6])  # two other devices, data parallel
  with checkpoint.Checkpoints(tmp_path, _CheckpointCfg(), read_only=True) as ckpts:
    restored, meta = ckpts.restore(restore_on.abstract_state())
  assert meta["step"] == 2 and meta["data"] == {"step": 2} and meta["note"] == "x"
  assert meta["code_version"]
  _leaves_equal(restored, state)
  word = restored.params["embeddings"]["word"]
  assert set(word.sharding.device_set) == set(jax.devices()[4:6])
  # Training goes on with the same losses on the new mesh.
  _, before = saved_on.train(state, batch)
  _, after = restore_on.train(
    restored, {k: jax.device_put(jax.device_get(v), restore_on.batch_sharding) for k, v in batch.items()}
  )
  np.testing.assert_allclose(after["loss"], before["loss"], rtol=1e-6)


def test_params_restore_to_the_host_without_a_mesh(tmp_path):
  steps = _steps((2, 2, 2))
  state, _ = _trained_state(steps, n=1)
  with checkpoint.Checkpoints(tmp_path, _CheckpointCfg()) as ckpts:
    ckpts.save(state, {})
  with checkpoint.Checkpoints(tmp_path, read_only=True) as ckpts:
    params, meta = ckpts.restore_params()
  assert isinstance(params["embeddings"]["word"], np.ndarray) and meta["step"] == 1
  _leaves_equal(params, state.params)

  # A process with another device count (an export on a laptop of a pod's run) reads them too.
  code = (
    "import sys, numpy as np; from bertjax.train import checkpoint\n"
    "with checkpoint.Checkpoints(sys.argv[1], read_only=True) as c: params, _ = c.restore_params()\n"
    "np.save(sys.argv[2], params['encoder']['layers']['attention']['qkv_kernel'])"
  )
  env = dict(
    os.environ, PYTHONPATH=os.getcwd(), JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1"
  )
  out = subprocess.run(
    [sys.executable, "-c", code, tmp_path, tmp_path / "qkv.npy"], env=env, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stderr[-2000:]
  saved = jax.device_get(state.params["encoder"]["layers"]["attention"]["qkv_kernel"])
  np.testing.assert_array_equal(np.load(tmp_path / "qkv.npy"), saved)


def test_a_relative_workdir_works(tmp_path, monkeypatch):
  """`make train` passes runs/tiny: orbax itself wants absolute paths."""
  monkeypatch.chdir(tmp_path)
  steps = _steps((1, 1, 1))
  state, _ = _trained_state(steps, n=0)
  with checkpoint.Checkpoints("runs/relative", _CheckpointCfg()) as ckpts:
    for s in (1, 2):
      ckpts.save(state.replace(step=state.step + s), {})
  with checkpoint.Checkpoints("runs/relative", read_only=True) as ckpts:
    assert ckpts.good_steps() == [1, 2]


def test_retention_keeps_the_last_k_and_every_kth(tmp_path):
  steps = _steps((1, 1, 1))
  state, _ = _trained_state(steps, n=0)
  with checkpoint.Checkpoints(tmp_path, _CheckpointCfg(keep=2, keep_period=4)) as ckpts:
    for s in range(1, 11):
      ckpts.save(state.replace(step=state.step + s), {})
  with checkpoint.Checkpoints(tmp_path, read_only=True) as ckpts:
    assert ckpts.steps() == [4, 8, 9, 10]
    assert ckpts.good_steps() == [4, 8, 9, 10]


def _truncate_a_file(step_dir):
  biggest = max(
    (p for p in step_dir.rglob("*") if p.is_file() and p.name != checkpoint.MANIFEST), key=lambda p: p.stat().st_size
  )
  biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])


def test_a_corrupt_or_incomplete_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
  steps = _steps((1, 1, 1))
  state, _ = _trained_state(steps, n=0)
  with checkpoint.Checkpoints(tmp_path, _CheckpointCfg(keep=5)) as ckpts:
    for s in (1, 2, 3):
      ckpts.save(state.replace(step=state.step + s), {})
  _truncate_a_file(tmp_path / "checkpoints" / "3")
  for f in (tmp_path / "checkpoints" / "2" / "params").rglob("*"):
    if f.is_file():
      f.unlink()
      break
  with checkpoint.Checkpoints(tmp_path, read_only=True) as ckpts, caplog.at_level(logging.WARNING):
    assert ckpts.good_steps() == [1]
    restored, meta = ckpts.restore(steps.abstract_state())
  assert meta["step"] == 1
  assert "skipping checkpoint step 3" in caplog.text and "skipping checkpoint step 2" in caplog.text
  with checkpoint.Checkpoints(tmp_path, read_only=True) as ckpts:
    with pytest.raises(checkpoint.CheckpointError, match="step 3 .* cannot be restored"):
      ckpts.restore(steps.abstract_state(), step=3)
    with pytest.raises(checkpoint.CheckpointError, match="--step 7: no such checkpoint"):
      ckpts.restore(steps.abstract_state(), step=7)


def _flip_bytes(step_dir):
  """Damage that keeps every size: eight bytes inverted in the middle of the largest params file."""
  target = max((p for p in (step_dir / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(target.read_bytes())
  middle = len(data) // 2
  data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
  target.write_bytes(bytes(data))


def test_flipped_bytes_show_against_the_digests_and_the_step_is_moved_aside_once(tmp_path, caplog):
  steps = _steps((1, 1, 1))
  state, _ = _trained_state(steps, n=1)
  with checkpoint.Checkpoints(tmp_path, _CheckpointCfg(keep=5)) as ckpts:
    for s in (1, 2, 3):
      ckpts.save(state.replace(step=s), {})
  step_3 = tmp_path / "checkpoints" / "3"
  written = json.loads((step_3 / checkpoint.MANIFEST).read_text())
  assert set(written["sha256"]) == set(written["files"])
  _flip_bytes(step_3)
  assert checkpoint.is_good(step_3)  # sizes alone (retention's check) see nothing
  assert "differs from its SHA-256 in the manifest" in manifest.damage(step_3)
  assert manifest.damage(step_3, items=("opt_state", "meta")) is None  # only what a restore reads

  with checkpoint.Checkpoints(tmp_path, read_only=True) as ckpts, caplog.at_level(logging.WARNING):
    _, meta = ckpts.restore(steps.abstract_state())  # eval and export: skip, never move
  assert meta["step"] == 2 and "skipping checkpoint step 3" in caplog.text and step_3.is_dir()

  caplog.clear()
  with checkpoint.Checkpoints(tmp_path, _CheckpointCfg(keep=2)) as ckpts, caplog.at_level(logging.WARNING):
    _, meta = ckpts.restore(steps.abstract_state())  # a training run: moved out of the way
    assert meta["step"] == 2 and ckpts.steps() == [1, 2]
    [aside] = ckpts.damaged()
    assert aside.startswith("3.damaged-") and f"moved it aside to {aside}" in caplog.text
    with pytest.raises(
      checkpoint.CheckpointError, match=rf"--step 3: no such checkpoint .* moved aside as damaged \({aside}\)"
    ):
      ckpts.restore(steps.abstract_state(), step=3)
    for s in (3, 4, 5):  # step 3 saved afresh; retention neither counts nor deletes the damaged folder
      ckpts.save(state.replace(step=s), {}, wait=True)
    assert ckpts.steps() == [4, 5] and ckpts.good_steps() == [4, 5] and ckpts.damaged() == [aside]
  assert manifest.damage(tmp_path / "checkpoints" / aside) is not None  # kept as it was, for inspection

  caplog.clear()
  with checkpoint.Checkpoints(tmp_path, _CheckpointCfg(keep=2)) as ckpts, caplog.at_level(logging.WARNING):
    _, meta = ckpts.restore(steps.abstract_state())
  assert meta["step"] == 5 and "skipping" not in caplog.text  # reported once


def test_intact_files_that_fail_to_restore_stop_the_run_and_all_damaged_refuse_a_fresh_start(tmp_path):
  """Files proven intact by their digests are never moved aside: the trouble is elsewhere (memory,
  devices), and falling back would throw away the newest progress. A workdir whose every step was
  moved aside does not silently start again from step 0."""
  steps = _steps((1, 1, 1))
  state, _ = _trained_state(steps, n=0)
  with checkpoint.Checkpoints(tmp_path, _CheckpointCfg()) as ckpts:
    for s in (1, 2):
      ckpts.save(state.replace(step=s), {}, wait=True)

  def out_of_memory(meta):
    raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while restoring")

  with checkpoint.Checkpoints(tmp_path, _CheckpointCfg()) as ckpts:
    with pytest.raises(checkpoint.CheckpointError, match="step 2 .* though its files are as saved: RESOURCE_EXHAUSTED"):
      ckpts.restore(steps.abstract_state(), check=out_of_memory)
    assert ckpts.steps() == [1, 2] and not ckpts.damaged()

  for s in (1, 2):
    _flip_bytes(tmp_path / "checkpoints" / str(s))
  with (
    checkpoint.Checkpoints(tmp_path, _CheckpointCfg()) as ckpts,
    pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint .* \(moved aside as damaged: 1\.damaged-.*, 2\."),
  ):
    ckpts.restore(steps.abstract_state())
  run = types.SimpleNamespace(config=types.SimpleNamespace(train=None), steps=steps, workdir=tmp_path)
  with checkpoint.Checkpoints(tmp_path, _CheckpointCfg()) as ckpts:
    assert ckpts.steps() == []
    with pytest.raises(checkpoint.CheckpointError, match="move that folder away to start afresh"):
      pretrain.initial_state(run, ckpts)


def test_a_manifest_without_digests_is_checked_by_its_sizes(tmp_path):
  """bertjax 0.1.0 wrote sizes only (tests/fixtures/run_v0): such a step still reads."""
  steps = _steps((1, 1, 1))
  state, _ = _trained_state(steps, n=0)
  with checkpoint.Checkpoints(tmp_path, _CheckpointCfg()) as ckpts:
    ckpts.save(state.replace(step=1), {}, wait=True)
  step_1 = tmp_path / "checkpoints" / "1"
  written = json.loads((step_1 / checkpoint.MANIFEST).read_text())
  (step_1 / checkpoint.MANIFEST).write_text(json.dumps({"step": 1, "files": written["files"]}))
  assert checkpoint.is_good(step_1) and manifest.damage(step_1) is None
  with checkpoint.Checkpoints(tmp_path, read_only=True) as ckpts:
    assert ckpts.restore(steps.abstract_state())[1]["step"] == 1
  _truncate_a_file(step_1)
  assert "the manifest says" in manifest.damage(step_1) and checkpoint.is_good(step_1) is False


def test_retention_never_deletes_the_last_good_checkpoint(tmp_path):
  steps = _steps((1, 1, 1))
  state, _ = _trained_state(steps, n=0)
  cfg = _CheckpointCfg(keep=2)
  with checkpoint.Checkpoints(tmp_path, cfg) as ckpts:
    for s in (1, 2):
      ckpts.save(state.replace(step=state.step + s), {})
  _truncate_a_file(tmp_path / "checkpoints" / "2")  # now only step 1 is good
  with checkpoint.Checkpoints(tmp_path, cfg) as ckpts:
    ckpts.save(state.replace(step=state.step + 3), {}, wait=True)
    # Newest-two retention by step number (orbax's max_to_keep=2) keeps 2 and 3 and deletes 1,
    # the only good step before 3; validity-aware retention keeps it until two good ones are newer.
    assert ckpts.good_steps() == [1, 3] and 2 in ckpts.steps()
    ckpts.save(state.replace(step=state.step + 4), {}, wait=True)
    assert ckpts.good_steps() == [3, 4]  # two newer good ones: now 1 (and damaged 2) may go
    ckpts.save(state.replace(step=state.step + 5), {}, wait=True)
    assert ckpts.good_steps() == [4, 5]


def test_a_failing_save_stops_the_run_loudly(tmp_path):
  """A file where the checkpoint folder was: found before orbax starts (its threads would then
  hold the process for 5 minutes at exit), said in one line."""
  steps = _steps((1, 1, 1))
  state, _ = _trained_state(steps, n=0)
  ckpts = checkpoint.Checkpoints(tmp_path, _CheckpointCfg())
  ckpts.save(state.replace(step=state.step + 1), {}, wait=True)
  blocked = tmp_path / "checkpoints"
  os.rename(blocked, tmp_path / "moved")
  blocked.write_text("a file where the checkpoint folder was")
  try:
    with pytest.raises(checkpoint.CheckpointError) as error:
      ckpts.save(state.replace(step=state.step + 2), {})
      ckpts.wait()
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"saving checkpoint step 2 to {blocked} failed: Not a directory")
    assert "the run stops rather than go on without checkpoints" in message
  finally:
    with contextlib.suppress(Exception):
      ckpts.manager.close()


def _failing_writes(monkeypatch, code: int, where: str) -> None:
  """Writes of files named `where...` fail as the OS fails them."""
  path_class = type(epath.Path("/"))
  real = path_class.write_text

  def write_text(self, *args, **kwargs):
    if self.name.startswith(where):
      raise OSError(code, os.strerror(code), os.fspath(self))
    return real(self, *args, **kwargs)

  monkeypatch.setattr(path_class, "write_text", write_text)


@pytest.mark.parametrize(
  ("code", "words", "fix"),
  [
    (errno.EACCES, "Permission denied (EACCES)", "give this user write permission there"),
    (errno.EROFS, "Read-only file system (EROFS)", "make the file system writable"),
    (errno.ENOSPC, "No space left on device (ENOSPC)", "free some space"),
  ],
)
def test_a_save_that_the_os_refuses_names_its_reason_and_keeps_the_earlier_steps(
  tmp_path, monkeypatch, code, words, fix
):
  steps = _steps((1, 1, 1))
  state, _ = _trained_state(steps, n=0)
  with checkpoint.Checkpoints(tmp_path, _CheckpointCfg(keep=1)) as ckpts:
    ckpts.save(state.replace(step=state.step + 1), {}, wait=True)
    _failing_writes(monkeypatch, code, ".write-probe")
    with pytest.raises(checkpoint.CheckpointError) as error:
      ckpts.save(state.replace(step=state.step + 2), {})
  assert str(error.value) == (
    f"saving checkpoint step 2 to {tmp_path / 'checkpoints'} failed: {words}; checkpoints 1 are intact; the run "
    f"stops rather than go on without checkpoints: {fix}, then run the same command to resume from step 1"
  )
  monkeypatch.undo()
  with checkpoint.Checkpoints(tmp_path, read_only=True) as ckpts:
    assert ckpts.good_steps() == [1] and ckpts.steps() == [1]


def test_a_save_that_cannot_fit_stops_before_it_starts(tmp_path, monkeypatch):
  steps = _steps((1, 1, 1))
  state, _ = _trained_state(steps, n=0)
  with checkpoint.Checkpoints(tmp_path, _CheckpointCfg()) as ckpts:
    ckpts.save(state.replace(step=state.step + 1), {}, wait=True)
    monkeypatch.setattr(save_failures.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1, 1, 1000))
    with pytest.raises(
      checkpoint.CheckpointError, match=r"failed: 0.00 MiB free, a checkpoint needs about .* MiB \(ENOSPC\)"
    ):
      ckpts.save(state.replace(step=state.step + 2), {})
    assert ckpts.steps() == [1]


def test_the_errno_is_read_from_tensorstores_words_and_from_oserrors():
  """What orbax raised when a real 1000 KiB tmpfs filled during a save."""
  tensorstore = ValueError(
    'RESOURCE_EXHAUSTED: Error writing local file "/w/checkpoints/8.orbax-checkpoint-tmp/opt_state/_sharding": '
    "Failed to write 18849 bytes to file 12: No space left on device [os_error_code='28']"
  )
  assert os_errno(tensorstore) == errno.ENOSPC
  try:
    try:
      raise PermissionError(errno.EACCES, "Permission denied", "/w/x")
    except OSError as e:
      raise RuntimeError("commit failed") from e
  except RuntimeError as wrapped:
    assert os_errno(wrapped) == errno.EACCES
  assert os_errno(ValueError("Read-only file system while writing"), [errno.EROFS]) == errno.EROFS
  assert os_errno(ValueError("shape mismatch")) is None


def test_kill_with_sigterm_then_resume_is_bit_exact(tmp_path, corpus_and_tokenizer):
  root = corpus_and_tokenizer
  extra = ["--config.checkpoint.every_steps=5", "--config.data.cache_dir=" + str(root / "cache")]
  whole = _launch(_train_args(root, tmp_path / "whole", steps=20) + extra, devices=2)
  out, _ = whole.communicate(timeout=300)
  assert whole.returncode == 0, out[-3000:]

  killed = _launch(_train_args(root, tmp_path / "killed", steps=20) + extra, devices=2)
  [out] = _signal_at_step([killed], 10, 20, signal.SIGTERM, target=0)
  assert killed.returncode == 0, out[-3000:]
  assert "stopped by SIGTERM after step" in out and "run the same command to resume" in out
  stopped_at = int(out.split("stopped by SIGTERM after step ")[1].split(":")[0])
  assert 10 <= stopped_at < 20
  with checkpoint.Checkpoints(tmp_path / "killed", read_only=True) as ckpts:
    assert stopped_at in ckpts.good_steps()  # saved synchronously, complete before the exit

  resumed = _launch(_train_args(root, tmp_path / "killed", steps=20) + extra, devices=2)
  out, _ = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, out[-3000:]
  assert f"resumed from checkpoint step {stopped_at}" in out
  again = _launch(_train_args(root, tmp_path / "killed", steps=20) + extra, devices=2)
  out, _ = again.communicate(timeout=300)
  assert again.returncode == 0 and "already at step 20" in out and "held-out MLM accuracy" in out, out[-2000:]

  def losses(workdir):
    return {r["step"]: r["loss"] for r in metrics.read_metrics(workdir) if r["split"] == "train"}

  whole_losses, killed_losses = losses(tmp_path / "whole"), losses(tmp_path / "killed")
  assert sorted(killed_losses) == list(range(1, 21))
  assert killed_losses == whole_losses  # bit for bit


def test_without_the_preemption_service_one_signalled_process_stops_the_job_at_one_saved_step(
  tmp_path, corpus_and_tokenizer
):
  """SIGTERM to process 1 of 2 with JAX's preemption service off: the processes agree through the
  all-gather of their flags, both save the same step and exit 0. (With the service, the default,
  a signal to one process is the SIGINT test's below.)"""
  args = _train_args(corpus_and_tokenizer, tmp_path / "run", steps=200)
  procs = _launch_job(args, extra_env={"JAX_ENABLE_PREEMPTION_SERVICE": "false"})
  outs = _signal_at_step(procs, 10, 200, signal.SIGTERM, target=1)
  assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
  assert "stopped by a preemption signal to the job after step " in outs[0], outs[0][-2000:]
  stopped_at = int(outs[0].split("after step ")[1].split(":")[0])
  assert 10 <= stopped_at < 100  # soon after the signal (a loaded machine reads the log late), not at the end
  with checkpoint.Checkpoints(tmp_path / "run", read_only=True) as ckpts:
    assert ckpts.good_steps()[-1] == stopped_at  # saved together: a step orbax finalised on both


def test_a_job_stopped_by_sigint_to_one_process_resumes_bit_exactly(tmp_path, corpus_and_tokenizer):
  """Ctrl-C in one process's terminal stops both at one step, which both save (handed to JAX's
  preemption service, whose sync point orbax reads); the same command resumes, and every loss
  equals the uninterrupted job's."""
  steps = 20  # room for the stop to land before the end even when the log is read late

  def args(workdir):
    return _train_args(corpus_and_tokenizer, workdir, steps=steps) + ["--config.checkpoint.every_steps=100"]

  whole = _launch_job(args(tmp_path / "whole"))
  outs = [p.communicate(timeout=300)[0] for p in whole]
  assert [p.returncode for p in whole] == [0, 0], outs[0][-2000:]

  procs = _launch_job(args(tmp_path / "stopped"))
  outs = _signal_at_step(procs, 5, steps, signal.SIGINT, target=1)
  assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
  assert "received SIGINT" in outs[1] and "stopped by a preemption signal to the job" in outs[0]
  stopped_at = int(outs[0].split("after step ")[1].split(":")[0])
  assert 5 <= stopped_at < steps
  with checkpoint.Checkpoints(tmp_path / "stopped", read_only=True) as ckpts:
    assert ckpts.good_steps() == [stopped_at]  # saved together: a step orbax finalised on both

  resumed = _launch_job(args(tmp_path / "stopped"))
  outs = [p.communicate(timeout=300)[0] for p in resumed]
  assert [p.returncode for p in resumed] == [0, 0], outs[0][-2000:]
  assert f"resumed from checkpoint step {stopped_at}" in outs[0]

  def losses(workdir):
    return {r["step"]: r["loss"] for r in metrics.read_metrics(workdir) if r["split"] == "train"}

  assert sorted(losses(tmp_path / "stopped")) == list(range(1, steps + 1))
  assert losses(tmp_path / "stopped") == losses(tmp_path / "whole")  # bit for bit


def test_a_job_skips_a_damaged_step_together_and_process_0_moves_it_aside(tmp_path, corpus_and_tokenizer):
  """Process 0 checks the digests and renames; both processes restore step 4 and save 8 afresh."""

  def args(steps):
    return _train_args(corpus_and_tokenizer, tmp_path / "run", steps=steps) + [
      "--config.checkpoint.every_steps=4",
      "--config.train.eval_batches=0",
      f"--config.train.compilation_cache={tmp_path / 'jax-cache'}",  # the second job loads the first's
    ]

  first = _launch_job(args(8))
  outs = [p.communicate(timeout=300)[0] for p in first]
  assert [p.returncode for p in first] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
  _flip_bytes(tmp_path / "run" / "checkpoints" / "8")
  again = _launch_job(args(12))
  outs = [p.communicate(timeout=300)[0] for p in again]
  assert [p.returncode for p in again] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
  assert "differs from its SHA-256" in outs[0] and outs[0].count("moved it aside to 8.damaged-") == 1
  assert "resumed from checkpoint step 4" in outs[0]
  assert "process 0 found its files damaged" in outs[1]  # told, not checking or moving itself
  with checkpoint.Checkpoints(tmp_path / "run", read_only=True) as ckpts:
    assert ckpts.good_steps() == [4, 8, 12] and len(ckpts.damaged()) == 1


def test_async_saves_are_complete_when_the_process_exits(tmp_path, corpus_and_tokenizer):
  args = _train_args(corpus_and_tokenizer, tmp_path / "run", steps=6) + ["--config.checkpoint.every_steps=2"]
  proc = _launch(args, devices=1)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  with checkpoint.Checkpoints(tmp_path / "run", read_only=True) as ckpts:
    assert ckpts.good_steps() == [2, 4, 6]
  assert not list((tmp_path / "run" / "checkpoints").glob("*.orbax-checkpoint-tmp*"))


def test_warm_start_carries_step_and_optimizer_or_only_parameters(tmp_path, corpus_and_tokenizer):
  first = pretrain.train(_config(corpus_and_tokenizer, "train.steps=4", "train.eval_every=100"), tmp_path / "a")
  phase2 = _config(corpus_and_tokenizer, "train.steps=6", "train.eval_every=100", f"train.init_from={tmp_path / 'a'}")
  warm = run_lib.setup(phase2, tmp_path / "b0")
  with checkpoint.Checkpoints(tmp_path / "b0", phase2.checkpoint) as ckpts:
    carried, position = pretrain.initial_state(warm, ckpts)
  assert int(carried.step) == 4 and position is None
  _leaves_equal(carried.params, first.state.params)
  _leaves_equal(carried.opt_state, first.state.opt_state)  # Adam's moments and the counters carry over
  second = pretrain.train(phase2, tmp_path / "b")
  records = [r for r in metrics.read_metrics(tmp_path / "b") if r["split"] == "train"]
  assert [r["step"] for r in records] == [5, 6]  # the global step continued
  fresh = _config(
    corpus_and_tokenizer,
    "train.steps=2",
    "train.eval_every=100",
    f"train.init_from={tmp_path / 'a'}",
    "train.init_params_only=true",
  )
  run = run_lib.setup(fresh, tmp_path / "c")
  with checkpoint.Checkpoints(tmp_path / "c", fresh.checkpoint) as ckpts:
    state, position = pretrain.initial_state(run, ckpts)
  assert int(state.step) == 0 and position is None
  _leaves_equal(state.params, first.state.params)
  consecutive, total = (int(x) for x in jax.device_get(optim.nonfinite_counts(state.opt_state)))
  assert (consecutive, total) == (0, 0)
  _leaves_equal(state.opt_state, run.steps.init(0).opt_state)  # fresh moments: zeros, counters at 0
  assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(jax.device_get(first.state.opt_state)))
  assert int(second.state.step) == 6


def test_resuming_with_another_model_or_tokenizer_is_refused(tmp_path, corpus_and_tokenizer):
  pretrain.train(_config(corpus_and_tokenizer, "train.steps=2", "train.eval_every=100"), tmp_path / "run")
  bigger = _config(corpus_and_tokenizer, "train.steps=4", "model.intermediate_size=64", "model.num_layers=3")
  with pytest.raises(
    BertjaxError, match=r"differs from the checkpoint's \(num_layers 2 -> 3, intermediate_size 128 -> 64\)"
  ):
    pretrain.train(bigger, tmp_path / "run")
  meta = {
    "model": compatibility.model_sizes(run_lib.setup(_config(corpus_and_tokenizer), tmp_path / "x").model_config),
    "tokenizer_fingerprint": "something-else",
  }
  with pytest.raises(BertjaxError, match="the tokenizer .* differs from the one the checkpoint was trained with"):
    compatibility.check_compatible(
      meta, run_lib.setup(_config(corpus_and_tokenizer), tmp_path / "x").model_config, "mine", "--workdir run"
    )


def test_eval_reads_any_step_and_the_cli_prints_one_json_line(tmp_path, corpus_and_tokenizer):
  config = _config(corpus_and_tokenizer, "train.steps=4", "train.eval_every=100", "checkpoint.every_steps=2")
  pretrain.train(config, tmp_path / "run")
  at_2 = run_lib.evaluate_checkpoint(config, tmp_path / "run", step=2)
  newest = run_lib.evaluate_checkpoint(config, tmp_path / "run")
  assert at_2["step"] == 2 and newest["step"] == 4
  assert at_2["mlm_loss"] != newest["mlm_loss"]
  for key in ("mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy"):
    assert key in newest

  env = dict(os.environ, PYTHONPATH=os.getcwd())
  out = subprocess.run(
    [sys.executable, "-m", "bertjax", "eval", "--workdir", str(tmp_path / "run"), "--step", "2"],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  line = json.loads(out.stdout.strip().splitlines()[-1])
  assert line["step"] == 2 and {"mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy"} <= set(line)
  assert line["mlm_loss"] == pytest.approx(at_2["mlm_loss"], rel=1e-6)


def test_a_probe_left_by_a_process_killed_mid_probe_is_removed_by_the_next(tmp_path):
  import socket

  gone = subprocess.Popen(["true"])
  gone.wait()
  with subprocess.Popen(["sleep", "30"]) as alive:
    try:
      host = socket.gethostname()
      dead_probe = tmp_path / f".write-probe-{host}-{gone.pid}"
      live_probe = tmp_path / f".write-probe-{host}-{alive.pid}"
      dead_probe.write_text("ok")
      live_probe.write_text("ok")
      assert save_failures.probe(epath.Path(tmp_path), needed_bytes=0) is None
      assert not dead_probe.exists() and live_probe.exists()  # a live process's probe is its own
      assert sorted(p.name for p in tmp_path.iterdir()) == [live_probe.name]
    finally:
      alive.kill()


def test_a_probe_on_gcs_never_empties_a_folder_that_others_list(gcs_bucket):
  """On an object store a folder is the objects under its prefix. orbax's start-up cleanup (a
  background thread) and the other processes of a job list the checkpoints folder while this
  process probes; a listing that found the probe, then an empty prefix once it was deleted, failed
  (gcsfs reads the emptied prefix as a missing object)."""
  import threading

  folder = epath.Path(f"{gcs_bucket}/probed/checkpoints")
  (folder.parent / "config.json").write_text("{}")  # what a workdir holds before its first checkpoint
  errors, done = [], threading.Event()

  def list_like_orbax():
    while not done.is_set():
      try:
        if folder.exists():
          list(folder.iterdir())
      except OSError as e:
        errors.append(e)

  lister = threading.Thread(target=list_like_orbax)
  lister.start()
  try:
    for _ in range(20):
      assert save_failures.probe(folder, needed_bytes=0) is None
  finally:
    done.set()
    lister.join()
  assert errors == []
  assert not folder.exists()  # the probe left nothing in the folder, or beside it
  assert [p.name for p in folder.parent.iterdir()] == ["config.json"]
