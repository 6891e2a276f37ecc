"""One run per workdir: a lease file naming the run that trains there, kept fresh by a heartbeat.

    WORKDIR/bertjax_lock.json   {"host", "pid", "started", "heartbeat", "run", "proc_start"}

    hold(workdir)   a context manager around a training run: process 0 takes the lease (or every
                    process refuses together, with one line naming the run that holds it), keeps
                    it fresh, and gives it back at the end

A lease, not `flock`: object stores (gs:// through etils.epath) have no locks, and a lease file
works the same there and on shared POSIX filesystems. The holder rewrites its `heartbeat` every
HEARTBEAT_S seconds. A lease is stale, and the next run takes it over with a warning, when its
heartbeat is older than STALE_S (a run killed on another host; clocks must agree to well within
that), or at once when it names a process of this host that is gone (a run killed here, kill -9
included). Taking the lease is: write it whole (`bertjax.atomic`), wait SETTLE_S, read it back;
of two runs that raced, the later writer holds it and the other refuses. A holder that finds the
lease in another run's name (it stalled past STALE_S and was taken over) marks itself `lost`, and
the loop stops before its next save. A multi-process job is one run: only process 0 holds it.
"""

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import jax
from etils import epath

from bertjax import atomic
from bertjax.errors import BertjaxError
from bertjax.train import processes

log = logging.getLogger(__name__)
LOCK_FILENAME = "bertjax_lock.json"
HEARTBEAT_S = 15.0
STALE_S = 120.0
SETTLE_S = 0.5


class WorkdirInUse(BertjaxError):
  """Another run trains in this workdir."""


def _process_start(pid: int) -> str | None:
  """When a process of this host started (Linux: /proc), so that a reused pid is not taken for it."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive_here(holder: dict) -> bool:
  pid = holder.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # another user's process
  recorded = holder.get("proc_start")
  return recorded is None or _process_start(pid) in (None, recorded)


def describe(holder: dict) -> str:
  """`host H, pid P, started TIME` for a lock file's holder record, for messages."""
  started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
  return f"host {holder.get('host')}, pid {holder.get('pid')}, started {started}"


class WorkdirLock:
  """The lease of one workdir. `acquire` raises WorkdirInUse when a live run holds it."""

  def __init__(self, workdir, *, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S, settle_s=SETTLE_S):
    self.path = epath.Path(workdir) / LOCK_FILENAME
    self.heartbeat_s, self.stale_s, self.settle_s = heartbeat_s, stale_s, settle_s
    self.lost: str | None = None  # who took the lease over, once that happened
    now = time.time()
    self.mine = {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "started": now,
      "heartbeat": now,
      "run": uuid.uuid4().hex,
      "proc_start": _process_start(os.getpid()),
    }
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def read(self) -> dict | None:
    """The lease on disk; None when there is none. A lease that does not parse is stale."""
    try:
      holder = json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {"heartbeat": 0}
    return holder if isinstance(holder, dict) else {"heartbeat": 0}

  def stale_because(self, holder: dict) -> str | None:
    """Why a lease may be taken over, or None while its run is alive."""
    if holder.get("host") == self.mine["host"] and not _alive_here(holder):
      return f"process {holder.get('pid')} on this host is gone"
    heartbeat = holder.get("heartbeat")
    age = time.time() - (heartbeat if isinstance(heartbeat, (int, float)) else 0)
    if age > self.stale_s:
      return f"its last heartbeat was {age:,.0f} s ago"
    return None

  def _refusal(self, holder: dict) -> WorkdirInUse:
    return WorkdirInUse(
      f"--workdir {self.path.parent}: another run trains there ({describe(holder)}); wait for it to end, "
      f"stop it, or choose another workdir (a run killed on another host releases the workdir "
      f"{self.stale_s:.0f} s after its last heartbeat)"
    )

  def acquire(self) -> None:
    """Take the lease (over a stale one, with a warning) and start its heartbeat thread.

    Raises:
      WorkdirInUse: a live run holds the lease, or another run took it in the same moment.
      BertjaxError: the lock file cannot be written.
    """
    holder = self.read()
    if holder is not None:
      why = self.stale_because(holder)
      if why is None:
        raise self._refusal(holder)
      log.warning("taking over the workdir lock of an earlier run (%s): %s", describe(holder), why)
    try:
      atomic.write_text(self.path, json.dumps(self.mine))
    except OSError as e:
      raise BertjaxError(
        f"--workdir {self.path.parent}: cannot write its lock file ({e.strerror or e}); choose a writable folder"
      ) from None
    time.sleep(self.settle_s)  # a run that raced us has written by now: the later writer holds it
    holder = self.read()
    if holder is None or holder.get("run") != self.mine["run"]:
      raise self._refusal(holder or {})
    self._thread = threading.Thread(target=self._beat, name="bertjax-lock-heartbeat", daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    warned = False
    while not self._stop.wait(self.heartbeat_s):
      try:
        holder = self.read()
        if holder is None or holder.get("run") != self.mine["run"]:
          self.lost = describe(holder) if holder else "nobody (the lock file was removed)"
          log.error("the workdir lock of %s now names %s: this run stops before its next save", self.path, self.lost)
          return
        self.mine["heartbeat"] = time.time()
        atomic.write_text(self.path, json.dumps(self.mine))
        warned = False
      except OSError as e:  # a full disk, a network hiccup: try again at the next beat
        if not warned:
          log.warning("cannot refresh the workdir lock %s (%s); retrying", self.path, e.strerror or e)
          warned = True

  def check(self) -> None:
    """Raise when another run has taken the lease over (asked before each save)."""
    if self.lost is not None:
      raise WorkdirInUse(
        f"--workdir {self.path.parent}: this run's heartbeat stalled past {self.stale_s:.0f} s and "
        f"another run took the workdir over ({self.lost}); this run stops without saving"
      )

  def release(self) -> None:
    """Stop the heartbeat and delete the lock file if it still names this run."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self.lost is None:
      holder = self.read()
      if holder is not None and holder.get("run") == self.mine["run"]:
        with contextlib.suppress(OSError):
          self.path.unlink()


@contextlib.contextmanager
def hold(workdir) -> Iterator[WorkdirLock | None]:
  """Hold the workdir for a run: process 0 takes the lease and the processes refuse together.

  Yields the lock on process 0, None on the others.
  """
  lock, refusal = None, None
  if jax.process_index() == 0:
    lock = WorkdirLock(workdir)
    try:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      lock.acquire()
    except OSError as e:
      lock, refusal = (
        None,
        BertjaxError(f"--workdir {workdir}: cannot create it ({e.strerror or e}); choose a writable folder"),
      )
    except BertjaxError as e:  # WorkdirInUse, or a lock file it cannot write
      lock, refusal = None, e
  if processes.from_primary(refusal is not None):
    raise refusal or BertjaxError(f"--workdir {workdir}: process 0 cannot hold it for this run (it says why)")
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
