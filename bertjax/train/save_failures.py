"""When a checkpoint save fails: the operating system's reason in one line, found before orbax can hang.

    probe(folder, size)         why this process cannot write a checkpoint there, or None
    describe(what, exc, ...)    "... failed: No space left on device (ENOSPC); ...; free some space, ..."
    quiet_orbax()               while open, orbax's own reports of a failed save are not printed
    check_room(workdir, state)  fail before training when a local disk cannot hold one checkpoint

orbax writes arrays through tensorstore, whose errors carry the OS's words as text ("Failed to
write ...: No space left on device [os_error_code='28']"): `bertjax.atomic.os_errno` reads the
errno from there or from an OSError in the chain. When orbax cannot create a step folder, it
raises, but threads it started wait for that folder for its 5-minute coordination timeout and
hold the process at exit; and a disk that fills during a save fails it half-way. So every save
first writes a small file there (on gs://, beside the checkpoints folder) and, on a local disk,
compares the free space with its size.
"""

import contextlib
import errno
import logging
import os
import shutil
import socket
import sys
from collections.abc import Iterator

import jax
from etils import epath

from bertjax import storage
from bertjax.atomic import os_errno
from bertjax.errors import BertjaxError

# What to do about a failed write, by the operating system's reason.
FIXES = {
  errno.ENOSPC: "free some space",
  errno.EDQUOT: "free some space or raise the quota",
  errno.EACCES: "give this user write permission there",
  errno.EPERM: "give this user write permission there",
  errno.EROFS: "make the file system writable",
  # An object store (gs://) that went away or does not answer.
  errno.ECONNREFUSED: "check that the store is reachable",
  errno.ECONNRESET: "check that the store is reachable",
  errno.ETIMEDOUT: "check that the store is reachable",
  errno.EHOSTUNREACH: "check that the store is reachable",
  errno.ENETUNREACH: "check the network",
}


_PROBE_PREFIX = ".write-probe-"


def _remove_dead_probes(folder: epath.Path) -> None:
  """The probe files of this host's processes that died mid-probe (kill -9): they would stay in
  the checkpoints folder for good. Local folders only (a listing per save costs little there)."""
  if "://" in str(folder) or not folder.exists():
    return
  mine = f"{_PROBE_PREFIX}{socket.gethostname()}-"
  for leftover in folder.iterdir():
    pid = leftover.name.removeprefix(mine)
    if leftover.name.startswith(mine) and pid.isdigit() and not _alive(int(pid)):
      with contextlib.suppress(FileNotFoundError):
        leftover.unlink()


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def probe(folder: epath.Path, needed_bytes: int) -> OSError | None:
  """Why this process cannot write a checkpoint of `needed_bytes` into `folder` (a lost
  permission, a read-only file system, a full disk), or None."""
  folder = epath.Path(folder)
  # On an object store a folder is the objects under its prefix, and others list the checkpoints
  # folder while this process probes (orbax's start-up cleanup thread, the job's process 0): one
  # that found the probe, then an empty prefix once it was deleted, fails (gcsfs reads the emptied
  # prefix as a missing object). Write access there is the bucket's, so beside it tests the same.
  where = folder.parent if storage.is_remote(folder) else folder
  path = where / f"{_PROBE_PREFIX}{socket.gethostname()}-{os.getpid()}"
  try:
    _remove_dead_probes(folder)
    path.write_text("ok")
    path.unlink()
    free = shutil.disk_usage(os.fspath(folder)).free if "://" not in str(folder) else None
  except OSError as e:
    return e
  if free is not None and free < needed_bytes:  # a write that cannot fit fails half-way, noisily
    return OSError(
      errno.ENOSPC,
      f"{free / 2**20:,.2f} MiB free, a checkpoint needs about {needed_bytes / 2**20:,.2f} MiB",
      os.fspath(folder),
    )
  return None


def one_line(exc: BaseException) -> str:
  """The exception message's first line, or its type's name when the message is empty."""
  return str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__


def describe(what: str, exc: BaseException, intact: list[int]) -> str:
  """One line: what failed, the OS's reason, which steps are intact, and what to do.

  Args:
    what: the failed operation and its target (`saving checkpoint step 10 to DIR`).
    exc: the exception; its errno (`bertjax.atomic.os_errno`: its chain or its text) picks the reason and fix.
    intact: the complete steps left, oldest first; the last is where the run resumes. None when
      they cannot be listed (the store is out of reach).
  """
  code = os_errno(exc, FIXES)
  if code is None:
    reason = f"{type(exc).__name__}: {one_line(exc)}"
  else:  # an OSError's own words (the OS's, or the free-space check's), else the OS's for its code
    said = exc.strerror if isinstance(exc, OSError) and exc.errno == code and exc.strerror else os.strerror(code)
    reason = f"{said} ({errno.errorcode.get(code, code)})"
  if intact is None:
    kept = "the checkpoints cannot be listed now"
  else:
    kept = f"checkpoints {', '.join(map(str, intact))} are intact" if intact else "no earlier checkpoint is complete"
  resume = f" from step {intact[-1]}" if intact else " from the newest complete step" if intact is None else ""
  return (
    f"{what} failed: {reason}; {kept}; the run stops rather than go on without checkpoints: "
    f"{FIXES.get(code, 'fix what stopped it')}, then run the same command to resume{resume}"
  )


class _OrbaxTracebacks(logging.Filter):
  """orbax logs a failed background save with a traceback from each of its threads; the failure
  also reaches bertjax as an exception, which the CLI prints as one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    tb = record.exc_info[2] if record.exc_info else None
    while tb is not None:  # an exception raised inside orbax (a save's write, its commit)
      if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
        return False
      tb = tb.tb_next
    return True


def _late_tensorstore_callback(unraisable) -> bool:
  """After one write of a save fails, orbax closes its event loop while tensorstore still
  completes the others; each completion then fails to reach the closed loop, and Python reports
  it as unraisable: 'RuntimeError: Event loop is closed' from call_soon_threadsafe."""
  exc, tb = unraisable.exc_value, unraisable.exc_traceback
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return (
    isinstance(exc, RuntimeError)
    and str(exc) == "Event loop is closed"
    and tb is not None
    and tb.tb_frame.f_code.co_name == "_check_closed"
  )


_FILTER = _OrbaxTracebacks()
_open = 0
_previous_hook = None


def _unraisable_hook(unraisable) -> None:
  if not _late_tensorstore_callback(unraisable):
    (_previous_hook or sys.__unraisablehook__)(unraisable)


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
  """While open, a failed save is reported once, by bertjax: orbax's log records of it and the
  late tensorstore callbacks it causes are not printed. Nothing else is hidden."""
  global _open, _previous_hook
  if not _open:
    logging.getLogger("absl").addFilter(_FILTER)  # orbax logs through absl
    _previous_hook, sys.unraisablehook = sys.unraisablehook, _unraisable_hook
  _open += 1
  try:
    yield
  finally:
    _open -= 1
    if not _open:
      logging.getLogger("absl").removeFilter(_FILTER)
      if sys.unraisablehook is _unraisable_hook:
        sys.unraisablehook = _previous_hook


def checkpoint_bytes(abstract_state) -> int:
  """About what one checkpoint of this state takes on disk (uncompressed array bytes)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state) if hasattr(x, "dtype"))


def check_room(workdir, abstract_state) -> None:
  """Fail before training when a local workdir has no room for one more checkpoint."""
  if "://" in str(workdir):
    return  # object stores report no free space
  needed = checkpoint_bytes(abstract_state)
  free = shutil.disk_usage(os.fspath(workdir)).free
  if free < needed:
    raise BertjaxError(
      f"--workdir {workdir}: {free / 2**20:,.0f} MiB free, but one checkpoint needs about "
      f"{needed / 2**20:,.1f} MiB; free some space or choose another folder"
    )
