"""One run per workdir: the lease, its heartbeat, stale leases, races, and a multi-process job.

The lease's tests run on local disk and on a GCS server (`tests/support/gcs.py`): the same
compare-and-swap must hold on both. The concurrent second run and the takeover after kill -9, on
the real CLI, are in test_faults.py; on gs://, in tests/io/test_gcs_runs.py.
"""

import json
import logging
import os
import socket
import subprocess
import threading
import time

import pytest
from etils import epath

from bertjax.train import lock, saving
from tests.support.runs import launch_job, train_args

HOST = socket.gethostname()


@pytest.fixture(params=["local", "gs"])
def workdir(request, tmp_path):
  """An empty workdir on local disk, or in a bucket of the test GCS server."""
  if request.param == "local":
    return epath.Path(tmp_path)
  return epath.Path(request.getfixturevalue("gcs_bucket")) / "run"


def _on_disk(workdir) -> dict:
  return json.loads((workdir / lock.LOCK_FILENAME).read_text())


def _lease(workdir, **fields):
  now = time.time()
  holder = {"host": HOST, "pid": os.getpid(), "started": now - 60, "heartbeat": now, "run": "other", **fields}
  (workdir / lock.LOCK_FILENAME).write_text(json.dumps(holder))
  return holder


def _one_line(error) -> str:
  message = str(error.value)
  assert "\n" not in message
  return message


def test_a_run_holds_the_workdir_and_gives_it_back(workdir):
  held = lock.WorkdirLock(workdir)
  held.acquire()
  on_disk = _on_disk(workdir)
  assert on_disk["host"] == HOST and on_disk["pid"] == os.getpid() and on_disk["run"] == held.mine["run"]
  held.release()
  assert not (workdir / lock.LOCK_FILENAME).exists()


def test_a_live_run_on_this_host_is_refused_by_name(workdir):
  with subprocess.Popen(["sleep", "60"]) as other:
    try:
      holder = _lease(workdir, pid=other.pid, started=1_700_000_000)
      with pytest.raises(lock.WorkdirInUse) as error:
        lock.WorkdirLock(workdir).acquire()
      started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
      assert f"another run trains there (host {HOST}, pid {other.pid}, started {started})" in _one_line(error)
    finally:
      other.kill()


def test_a_lease_of_a_process_gone_from_this_host_is_taken_over_at_once(workdir, caplog):
  gone = subprocess.Popen(["true"])
  gone.wait()
  _lease(workdir, pid=gone.pid)  # a run killed with kill -9: its heartbeat is still fresh
  held = lock.WorkdirLock(workdir)
  with caplog.at_level(logging.WARNING):
    held.acquire()
  assert f"process {gone.pid} on this host is gone" in caplog.text
  assert _on_disk(workdir)["run"] == held.mine["run"]
  held.release()


def test_a_reused_pid_is_not_taken_for_the_run_that_died(workdir):
  _lease(workdir, proc_start="1")  # this process's pid, but a process that started at another time
  held = lock.WorkdirLock(workdir)
  assert held.stale_because(_on_disk(workdir))
  assert held.stale_because(held.mine) is None  # the live process itself
  held.acquire()
  held.release()


def test_another_hosts_lease_holds_while_its_heartbeat_is_fresh(workdir, caplog):
  _lease(workdir, host="node-7", pid=4242, heartbeat=time.time() - 30)
  with pytest.raises(lock.WorkdirInUse, match="host node-7, pid 4242"):
    lock.WorkdirLock(workdir).acquire()
  _lease(workdir, host="node-7", pid=4242, heartbeat=time.time() - lock.STALE_S - 1)
  held = lock.WorkdirLock(workdir)
  with caplog.at_level(logging.WARNING):
    held.acquire()
  assert "taking over the workdir lock of an earlier run (host node-7, pid 4242" in caplog.text
  assert "its last heartbeat was" in caplog.text
  held.release()


def test_an_unreadable_lease_is_stale(workdir):
  (workdir / lock.LOCK_FILENAME).write_text('{"host": "node-7", "pi')  # not a lease bertjax writes
  held = lock.WorkdirLock(workdir)
  held.acquire()
  held.release()


def _race(workdir, runs: int) -> list:
  """`runs` runs acquire the workdir at the same moment; what each got (the lock, or its refusal)."""
  locks = [lock.WorkdirLock(workdir) for _ in range(runs)]
  start = threading.Barrier(runs)
  results = [None] * runs

  def take(i):
    start.wait()
    try:
      locks[i].acquire()
      results[i] = locks[i]
    except lock.WorkdirInUse as e:
      results[i] = e

  threads = [threading.Thread(target=take, args=(i,)) for i in range(runs)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return results


def test_of_runs_that_race_for_a_free_workdir_exactly_one_wins(workdir):
  results = _race(workdir, 6)
  winners = [r for r in results if isinstance(r, lock.WorkdirLock)]
  assert len(winners) == 1, results
  assert _on_disk(workdir)["run"] == winners[0].mine["run"]
  assert all("another run trains there" in str(r) for r in results if r is not winners[0])
  winners[0].release()


def test_of_runs_that_race_to_take_over_a_stale_lease_exactly_one_wins(workdir):
  _lease(workdir, host="node-7", pid=99, heartbeat=time.time() - lock.STALE_S - 1)
  results = _race(workdir, 4)
  winners = [r for r in results if isinstance(r, lock.WorkdirLock)]
  assert len(winners) == 1, results
  assert _on_disk(workdir)["run"] == winners[0].mine["run"]
  winners[0].release()


def test_the_heartbeat_keeps_the_lease_fresh_and_notices_a_takeover(workdir):
  held = lock.WorkdirLock(workdir, heartbeat_s=0.02)
  held.acquire()
  first = held.mine["heartbeat"]
  deadline = time.monotonic() + 10
  while _on_disk(workdir)["heartbeat"] == first:
    assert time.monotonic() < deadline
    time.sleep(0.01)
  held.check()  # still ours
  _lease(workdir, host="node-7", pid=99)  # this run stalled; another took the workdir over
  while held.lost is None:
    assert time.monotonic() < deadline
    time.sleep(0.01)
  with pytest.raises(lock.WorkdirInUse, match=r"another run took the workdir over \(host node-7, pid 99"):
    held.check()
  held.release()
  assert _on_disk(workdir)["host"] == "node-7"  # not removed


def test_a_run_whose_lease_was_taken_over_saves_nothing_more(workdir):
  held = lock.WorkdirLock(workdir)
  held.lost = "host node-7, pid 99, started 2024-01-01 00:00:00"
  saver = saving.Saver(checkpoints=None, workdir_lock=held, workdir=workdir, meta=lambda step: {})
  with pytest.raises(lock.WorkdirInUse, match=r"another run took the workdir over \(host node-7, pid 99"):
    saver.save(state=None, step=5)


def test_hold_gives_the_lease_back_when_the_run_fails(workdir):
  with pytest.raises(RuntimeError), lock.hold(workdir) as held:
    assert held is not None and (workdir / lock.LOCK_FILENAME).exists()
    raise RuntimeError("the run failed")
  assert not (workdir / lock.LOCK_FILENAME).exists()


def test_a_multi_process_job_refuses_together_naming_the_other_run(tmp_path, corpus_and_tokenizer):
  """Process 0 reads the lease; every process of the job stops with it, none waits in a collective."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  _lease(workdir, host="node-7", pid=4242)
  procs = launch_job(train_args(corpus_and_tokenizer, workdir, steps=2))
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [2, 2], outs[0][-2000:] + outs[1][-2000:]
  # Gloo's C++ threads print their connection notices whenever they connect, even after the error.
  ours = [line for line in outs[0].strip().splitlines() if not line.startswith("[Gloo]")]
  assert ours[-1].startswith("bertjax: error: --workdir")
  assert "another run trains there (host node-7, pid 4242" in outs[0]
  assert "process 0 cannot hold it for this run (it says why)" in outs[1]
  assert json.loads((workdir / lock.LOCK_FILENAME).read_text())["pid"] == 4242  # left as it was
  assert sorted(p.name for p in workdir.iterdir()) == [lock.LOCK_FILENAME, "tokenizer"]
