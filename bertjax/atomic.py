"""Files and folders that a reader never sees half-written.

Every bertjax writer that creates or replaces a file or folder goes through here: the content is
written under a hidden temporary sibling name and renamed into place once complete. A crash, a
full disk or a concurrent process therefore leaves the old version or the new one, never a mix,
and a failed write leaves no temporary behind.

    write_text(path, text), write_bytes(path, data)   one file, replaced whole
    staging_prefix(name), is_staged(name)             the staged copies' names, to tell leftovers apart
    staged_folder(target, replace=True)               a folder built aside, then renamed in
    os_errno(exc)                                     why a write failed, as the OS said (errno)

Paths go through `etils.epath`, so `gs://` works as well. On an object store an object becomes
visible only once its upload is complete, so a file is uploaded straight to its name (there a
rename is a copy and a delete); a folder is still staged and renamed in, which there copies it
object by object: a reader may briefly see a folder that is still being copied, but never a
half-written file. Compare-and-swap writes (the workdir lease) are `bertjax.storage`'s.
"""

import contextlib
import os
import re
import socket
import uuid
from collections.abc import Iterable, Iterator

from etils import epath

from bertjax import storage


def _staging_name(target: epath.Path) -> epath.Path:
  # Host, process and a random part: processes of one job may stage the same target at once.
  return target.parent / f"{staging_prefix(target.name)}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def staging_prefix(name: str) -> str:
  """How the staged copy of `name` begins: `.NAME.partial-`."""
  return f".{name}.partial-"


def is_staged(name: str) -> bool:
  """Whether a file or folder name is a staged copy this module writes (a killed writer's leftover)."""
  return name.startswith(".") and ".partial-" in name


def write_bytes(path, data: bytes) -> epath.Path:
  """Write `data` to `path`, replacing any earlier file in one rename; returns the path."""
  path = epath.Path(path)
  if storage.is_remote(path):  # one upload: readers see the old object or the new one
    path.write_bytes(data)
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  staging = _staging_name(path)
  try:
    staging.write_bytes(data)
    staging.replace(path)
  finally:
    if staging.exists():
      staging.unlink()
  return path


def write_text(path, text: str) -> epath.Path:
  """Write `text` (UTF-8) to `path`, replacing any earlier file in one rename; returns the path."""
  return write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def staged_folder(target, *, replace: bool = True) -> Iterator[epath.Path]:
  """Yields an empty temporary folder beside `target`; once the block succeeds it becomes `target`.

  Args:
    target: the folder to create.
    replace: what happens when `target` exists by the time the block finishes. True: the old
      folder is replaced (moved aside, the new one renamed in, the old one deleted). False: the
      first writer wins and this copy is dropped, for content that every writer builds
      identically (a tokenizer, a tokenised corpus) and that several processes may build at once.

  On an exception the temporary folder is removed and `target` is left as it was.
  """
  target = epath.Path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  staging = _staging_name(target)
  staging.mkdir()
  try:
    yield staging
    if not target.exists():
      try:
        staging.rename(target)
      except OSError:  # another process renamed its copy in first
        if not target.exists():
          raise
    if replace and staging.exists():
      old = _staging_name(target)
      target.rename(old)
      staging.rename(target)
      old.rmtree()
  finally:
    if staging.exists():
      staging.rmtree()


# Writers in C++ (tensorstore, under orbax) report the OS's error as text: "[os_error_code='28']".
_ERRNO_IN_TEXT = re.compile(r"os_error_code='?(\d+)|\[Errno (\d+)\]")


def os_errno(exc: BaseException, known: Iterable[int] = ()) -> int | None:
  """The errno behind a failed write: from an OSError in the exception's chain, else from the
  OS's own words in the messages (`os_error_code=N`, `[Errno N]`, or the strerror of a `known` code)."""
  seen = []
  while exc is not None and exc not in seen and len(seen) < 16:
    seen.append(exc)
    if isinstance(exc, OSError) and exc.errno:
      return exc.errno
    exc = exc.__cause__ or exc.__context__
  text = " ".join(str(e) for e in seen)
  match = _ERRNO_IN_TEXT.search(text)
  if match:
    return int(match.group(1) or match.group(2))
  return next((code for code in known if os.strerror(code) in text), None)
