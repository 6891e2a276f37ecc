"""Faults a long run meets, on the real CLI: after each the same command resumes (or refuses) and
every logged loss equals the uninterrupted run's, bit for bit.

The kill points are chosen from outside, by watching the real process: its progress lines (a
step), or its checkpoint folder (orbax's temporary folder of a save in flight; a committed step
whose manifest is not written yet). The process is frozen with SIGSTOP, the state is checked
again, and only then is it killed with SIGKILL, so a kill lands where the test says; when the
state has moved on, the process continues (SIGCONT) to the next chance. A kill while metrics
are being appended leaves a prefix of the last line or record: the test cuts the files so.
All runs are one micro config on one CPU device, sharing a compilation cache.
"""

import json
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from bertjax.metrics import plot
from bertjax.metrics import writer as metrics
from bertjax.train import lock, manifest
from tests.support.runs import launch, train_args

STEPS, EVERY = 12, 4


def _args(root, workdir, cache, *extra) -> list[str]:
  return train_args(root, workdir, steps=STEPS) + [
    f"--config.checkpoint.every_steps={EVERY}",
    "--config.checkpoint.keep=10",
    "--config.train.eval_batches=0",  # no held-out evaluation: one program less to load per run
    f"--config.train.compilation_cache={cache}",
    *extra,
  ]


class _Watched:
  """A launched process whose output is read as it comes."""

  def __init__(self, args, module="bertjax"):
    self.proc = launch(args, devices=1, module=module)
    self.lines: list[str] = []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append(line)

  @property
  def output(self) -> str:
    return "".join(self.lines)

  def freeze_when(self, state, timeout=300) -> str:
    """SIGSTOP once `state()` (a description, or None) holds, checked again with the process
    frozen; returns the description."""
    deadline = time.monotonic() + timeout
    while self.proc.poll() is None and time.monotonic() < deadline:
      if state():
        self.proc.send_signal(signal.SIGSTOP)
        frozen = state()
        if frozen:
          return frozen
        self.proc.send_signal(signal.SIGCONT)
      time.sleep(0.001)
    raise AssertionError(f"the process ended before the state to stop it in; output:\n{self.output[-3000:]}")

  def kill_when(self, state, timeout=300) -> str:
    """SIGKILL (kill -9: no handler runs) once `state()` holds with the process frozen."""
    frozen = self.freeze_when(state, timeout)
    self.proc.kill()
    self.finish()
    return frozen

  def finish(self, timeout=300) -> tuple[int, str]:
    self.proc.wait(timeout=timeout)
    self._reader.join(timeout=30)
    return self.proc.returncode, self.output


def _run(args, module="bertjax") -> tuple[int, str]:
  return _Watched(args, module).finish()


def _completed(args) -> str:
  code, out = _run(args)
  assert code == 0, out[-3000:]
  return out


def _error_line(out: str) -> str:
  """The run's one error line, which is its last line, with no traceback anywhere."""
  errors = [line for line in out.splitlines() if line.startswith("bertjax: error:")]
  assert len(errors) == 1 and out.rstrip().splitlines()[-1] == errors[0], out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  return errors[0]


def _train_losses(workdir) -> dict[int, list[float]]:
  losses = {}
  for record in metrics.read_metrics(workdir):
    if record["split"] == "train":
      losses.setdefault(record["step"], []).append(record["loss"])
  return losses


def _assert_same_losses(workdir, reference) -> None:
  """Every step logged, and every record of a step (a resumed run logs some twice) equal to the
  uninterrupted run's, bit for bit."""
  logged = _train_losses(workdir)
  assert sorted(logged) == list(range(1, STEPS + 1))
  for step, losses in logged.items():
    assert losses == [reference.losses[step]] * len(losses), (step, losses, reference.losses[step])


def _steps_on_disk(workdir) -> list[str]:
  return sorted(p.name for p in (Path(workdir) / "checkpoints").iterdir())


class _Reference:
  def __init__(self, root, cache, workdir):
    self.root, self.cache, self.workdir = root, cache, workdir
    self.losses = {step: losses[-1] for step, losses in _train_losses(workdir).items()}

  def args(self, workdir, *extra):
    return _args(self.root, workdir, self.cache, *extra)


@pytest.fixture(scope="module")
def reference(corpus_and_tokenizer, tmp_path_factory) -> _Reference:
  """One uninterrupted run that the others are compared with; it also fills the compilation cache."""
  cache = tmp_path_factory.mktemp("jax-cache")
  workdir = tmp_path_factory.mktemp("reference") / "run"
  _completed(_args(corpus_and_tokenizer, workdir, cache))
  assert _steps_on_disk(workdir) == ["12", "4", "8"]
  return _Reference(corpus_and_tokenizer, cache, workdir)


def test_kill_mid_step_a_second_run_is_refused_and_the_killed_runs_lock_is_taken_over(tmp_path, reference):
  workdir = tmp_path / "run"
  first = _Watched(reference.args(workdir))
  first.freeze_when(lambda: (workdir / "checkpoints" / "4").is_dir())  # alive, mid-step, step 4 saved
  logged = (workdir / "metrics.jsonl").read_bytes()

  code, out = _run(reference.args(workdir))
  line = _error_line(out)
  assert code == 2 and "another run trains there" in line
  assert f"host {socket.gethostname()}, pid {first.proc.pid}, started " in line
  assert (workdir / "metrics.jsonl").read_bytes() == logged  # the refused run wrote nothing

  first.proc.kill()  # kill -9: no handler runs, the lock stays behind
  first.finish()
  assert json.loads((workdir / lock.LOCK_FILENAME).read_text())["pid"] == first.proc.pid
  newest = max(int(name) for name in _steps_on_disk(workdir) if name.isdigit())  # 4, or 8 when just saved
  out = _completed(reference.args(workdir))
  assert f"taking over the workdir lock of an earlier run (host {socket.gethostname()}, pid {first.proc.pid}" in out
  assert f"process {first.proc.pid} on this host is gone" in out
  assert f"resumed from checkpoint step {newest}" in out
  _assert_same_losses(workdir, reference)
  assert not (workdir / lock.LOCK_FILENAME).exists()


def _cut_mid_record(workdir: Path) -> None:
  """What a kill while appending leaves: the last metrics line and the newest TensorBoard record
  cut short."""
  jsonl = workdir / "metrics.jsonl"
  text = jsonl.read_bytes()
  start = text.rstrip(b"\n").rfind(b"\n") + 1
  jsonl.write_bytes(text[: start + (len(text) - start) // 2])
  events = max((workdir / "tb").iterdir(), key=lambda p: p.name)
  events.write_bytes(events.read_bytes()[:-7])


def test_kill_mid_save_and_mid_append_resume_with_the_same_losses(tmp_path, reference):
  from tensorboard.backend.event_processing import event_accumulator

  workdir = tmp_path / "run"
  checkpoints = workdir / "checkpoints"

  def saving():  # orbax is writing step 8 (its temporary folder)
    tmp = checkpoints.is_dir() and [
      p.name for p in checkpoints.iterdir() if p.name.startswith("8.orbax-checkpoint-tmp")
    ]
    return tmp and f"orbax writing {tmp[0]}"

  assert _Watched(reference.args(workdir)).kill_when(saving)
  assert [n for n in _steps_on_disk(workdir) if n.isdigit()] == ["4"]
  _cut_mid_record(workdir)
  assert metrics.read_metrics(workdir)  # readers skip the cut line
  assert plot.plot_curves(workdir).exists()

  def committed_unsealed():  # orbax has committed step 8; its manifest is not written yet
    step = checkpoints / "8"
    return step.is_dir() and not (step / manifest.MANIFEST).exists() and "step 8 committed, no manifest"

  again = _Watched(reference.args(workdir))
  assert again.kill_when(committed_unsealed)
  assert "resumed from checkpoint step 4" in again.output
  out = _completed(reference.args(workdir))
  assert "resumed from checkpoint step 8" in out  # committed by orbax: restorable without a manifest
  _assert_same_losses(workdir, reference)
  assert _steps_on_disk(workdir) == ["12", "4", "8"]  # orbax's temporary folder was cleaned up

  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  assert all(isinstance(json.loads(line), dict) for line in lines)  # the cut line was cut off
  accumulator = event_accumulator.EventAccumulator(str(workdir / "tb"))
  accumulator.Reload()  # reads past the cut record into the resumed runs' files
  assert {e.step for e in accumulator.Scalars("train/loss")} == set(range(1, STEPS + 1))
  assert len(list((workdir / "tb").iterdir())) == 3  # one events file per run


def test_damaged_newest_checkpoints_are_moved_aside_and_saved_afresh(tmp_path, reference):
  workdir = tmp_path / "run"
  shutil.copytree(reference.workdir, workdir)
  step_12 = workdir / "checkpoints" / "12"
  biggest = max((p for p in step_12.rglob("*") if p.is_file() and p.name != manifest.MANIFEST), key=os.path.getsize)
  biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])  # truncated
  params_8 = max((p for p in (workdir / "checkpoints" / "8" / "params").rglob("*") if p.is_file()), key=os.path.getsize)
  flipped = bytearray(params_8.read_bytes())
  flipped[len(flipped) // 2 : len(flipped) // 2 + 8] = bytes(b ^ 0xFF for b in flipped[len(flipped) // 2 :][:8])
  params_8.write_bytes(bytes(flipped))  # same size, other bytes

  out = _completed(reference.args(workdir))
  assert "skipping checkpoint step 12" in out and "the manifest says" in out
  assert "skipping checkpoint step 8" in out and "differs from its SHA-256 in the manifest" in out
  assert out.count("moved it aside to") == 2 and "resumed from checkpoint step 4" in out
  on_disk = _steps_on_disk(workdir)
  assert [n for n in on_disk if "." not in n] == ["12", "4", "8"]  # saved afresh
  assert sorted(n.split(".")[0] for n in on_disk if ".damaged-" in n) == ["12", "8"]
  for step in ("4", "8", "12"):
    assert manifest.damage(workdir / "checkpoints" / step) is None
  _assert_same_losses(workdir, reference)


def test_a_full_disk_during_a_save_stops_with_one_line_and_the_same_command_resumes(tmp_path, reference):
  workdir = tmp_path / "run"
  code, out = _run(["ENOSPC", "8", "--", *reference.args(workdir)], module="tests.support.faults")
  line = _error_line(out)
  assert code == 2 and "saving checkpoint step 8" in line and "No space left on device (ENOSPC)" in line
  assert "checkpoints 4 are intact" in line and "run the same command to resume from step 4" in line
  assert [n for n in _steps_on_disk(workdir) if n.isdigit()] == ["4"]
  assert manifest.damage(workdir / "checkpoints" / "4") is None
  assert not (workdir / lock.LOCK_FILENAME).exists()

  out = _completed(reference.args(workdir))
  assert "resumed from checkpoint step 4" in out
  _assert_same_losses(workdir, reference)
  assert _steps_on_disk(workdir) == ["12", "4", "8"]


def test_a_nonfinite_stop_names_the_step_and_leaves_the_checkpoint_from_before_it(tmp_path, reference):
  """A learning rate of 1e30 makes step 1's update overflow: step 2 is the first non-finite one."""
  workdir = tmp_path / "run"
  extra = ("--config.optim.lr=1e30", "--config.optim.max_nonfinite=3", "--config.checkpoint.every_steps=1")
  code, out = _run(reference.args(workdir, *extra))
  line = _error_line(out)
  assert code == 2 and line.startswith("bertjax: error: step 2 went non-finite, and so did every step to step 4")
  assert "checkpoint 1 is from before it" in line
  for advice in ("lower optim.lr", "optim.warmup_steps", "model.dtype=float32"):
    assert advice in line
  assert _steps_on_disk(workdir) == ["1"]
  assert _train_losses(workdir)[1] == [reference.losses[1]]  # before any update: the same loss
