"""One run per workdir: a lease file naming the run that trains there, kept fresh by a heartbeat.

    WORKDIR/bertjax_lock.json   {"host", "pid", "started", "heartbeat", "run", "proc_start"}

    hold(workdir)   a context manager around a training run: process 0 takes the lease (or every
                    process refuses together, with one line naming the run that holds it), keeps
                    it fresh, and gives it back at the end

A lease, not `flock`: object stores (gs://) have no locks, and a lease file works the same there
and on shared POSIX filesystems. Every write of the lease is a compare-and-swap
(`bertjax.storage`: on GCS an object precondition, locally an flock around a rename): a new lease
is created only if none exists, a stale one is replaced only if it is still the one judged stale,
and the heartbeat replaces only the holder's own last version. So of two runs racing for one
workdir, on any backend, exactly one wins. The holder rewrites its `heartbeat` every HEARTBEAT_S
seconds. A lease is stale, and the next run takes it over with a warning, when its heartbeat is
older than STALE_S (a run killed on another host; clocks must agree to well within that), or at
once when it names a process of this host that is gone (a run killed here, kill -9 included). A
holder whose heartbeat finds the lease changed (it stalled past STALE_S and was taken over) marks
itself `lost`, and the loop stops before its next save. A multi-process job is one run: only
process 0 holds it. Every request to the store has a timeout, so neither the heartbeat thread nor
the release waits forever.
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

from bertjax import storage
from bertjax.errors import BertjaxError
from bertjax.train import processes

log = logging.getLogger(__name__)
LOCK_FILENAME = "bertjax_lock.json"
HEARTBEAT_S = 15.0
STALE_S = 120.0


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

  def __init__(self, workdir, *, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
    self.path = epath.Path(workdir) / LOCK_FILENAME
    self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
    self.version = None  # the lease's version as this run last wrote it
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
    return self._read_versioned()[0]

  def _read_versioned(self) -> tuple[dict | None, object]:
    data, version = storage.read_versioned(self.path)
    if data is None:
      return None, None
    try:
      holder = json.loads(data)
    except ValueError:
      return {"heartbeat": 0}, version
    return (holder if isinstance(holder, dict) else {"heartbeat": 0}), version

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
    holder, version = self._read_versioned()
    if holder is not None:
      why = self.stale_because(holder)
      if why is None:
        raise self._refusal(holder)
      log.warning("taking over the workdir lock of an earlier run (%s): %s", describe(holder), why)
    data = json.dumps(self.mine).encode()
    try:
      self.version = storage.create(self.path, data) if holder is None else storage.replace_if(self.path, data, version)
    except storage.Conflict:  # another run wrote the lease since it was read: that run holds it
      raise self._refusal(self.read() or {}) from None
    except OSError as e:
      raise BertjaxError(
        f"--workdir {self.path.parent}: cannot write its lock file ({e.strerror or e}); choose a writable folder"
      ) from None
    self._thread = threading.Thread(target=self._beat, name="bertjax-lock-heartbeat", daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    warned = False
    while not self._stop.wait(self.heartbeat_s):
      beat = dict(self.mine, heartbeat=time.time())
      try:
        try:
          self.version = storage.replace_if(self.path, json.dumps(beat).encode(), self.version)
        except storage.Conflict:
          holder, version = self._read_versioned()
          if holder == beat:  # the write went through, but its answer was lost: keep holding
            self.version = version
          else:
            self.lost = describe(holder) if holder else "nobody (the lock file was removed)"
            log.error("the workdir lock of %s now names %s: this run stops before its next save", self.path, self.lost)
            return
        self.mine = beat
        warned = False
      except Exception as e:  # a full disk, a store that does not answer: try again at the next beat
        if not warned:
          log.warning("cannot refresh the workdir lock %s (%s); retrying", self.path, getattr(e, "strerror", None) or e)
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
      self._thread.join(timeout=storage.CLOSING_S)  # a daemon: one stuck on a store dies at exit
      self._thread = None
    if self.lost is None and self.version is not None:
      try:
        storage.delete_if(self.path, self.version, deadline=storage.CLOSING_S)
      except Exception as e:  # taken over, or the store is gone: the lease goes stale by itself
        log.warning("could not remove the workdir lock %s (%s); it goes stale by itself", self.path, e)


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
