"""Object stores (gs://) next to local disk: what differs, in one place.

    is_remote(path)                 a path of an object store (gs://, s3://, ...), not local disk
    bucket_of(path)                 the bucket of a gs:// path
    check_reachable(path, what)     a gs:// path's bucket exists and the credentials reach it,
                                    else one BertjaxError line naming `what`, the path and the fix
    configure_gcsfs()               bounded requests and no stale listings for etils.epath's gs://
    read_versioned(path)            (bytes, version), or (None, None) when there is no file
    create(path, data)              write a file only if none exists (else `Conflict`)
    replace_if(path, data, version) replace a file only if it is still `version` (else `Conflict`)
    delete_if(path, version)        delete a file only if it is still `version`

The last four are compare-and-swap on one small file, which the workdir lease needs: GCS has no
rename and no lock, but it has preconditions (`ifGenerationMatch`: 0 creates only if absent, a
generation replaces only if unchanged), used here through google-cloud-storage. Local disk has
the same operations under an `flock` on a guard file beside the target, with the content always
renamed (or hard-linked) in whole. A version is opaque: a GCS generation, or a local file's
(inode, mtime, size).

Every request to a store has a timeout (`REQUEST_TIMEOUT_S`, retried within `DEADLINE_S`), so no
caller, and no background thread, waits on a store forever.
"""

import contextlib
import fcntl
import functools
import os
import uuid

from etils import epath

from bertjax.errors import BertjaxError

REQUEST_TIMEOUT_S = 30.0  # one HTTP request to the store
DEADLINE_S = 90.0  # one operation, retries included
CLOSING_S = 15.0  # what a run that is ending waits for its last write to a store (the lease, metrics)


class Conflict(Exception):
  """A conditional write lost: the file exists already, or changed since it was read."""


def is_remote(path) -> bool:
  return "://" in str(path)


def _split_gs(path) -> tuple[str, str]:
  bucket, _, name = str(path).removeprefix("gs://").partition("/")
  return bucket, name


def bucket_of(path) -> str:
  """The bucket of a gs:// path."""
  return _split_gs(path)[0]


def configure_gcsfs() -> None:
  """etils.epath's gs:// (gcsfs) with a timeout on every request and no cached listings.

  Listings are not cached because other writers (tensorstore under orbax, other hosts) add
  checkpoints that a cached listing of this process would not show. Called by the CLI before any
  path is touched; library users call it themselves.
  """
  import fsspec

  conf = fsspec.config.conf.setdefault("gcs", {})
  conf.setdefault("requests_timeout", REQUEST_TIMEOUT_S)
  conf.setdefault("timeout", DEADLINE_S)
  conf.setdefault("use_listings_cache", False)


@functools.cache
def _client():
  from google.cloud import storage  # only gs:// paths need it

  return storage.Client()


def _retry(deadline: float = DEADLINE_S):
  from google.cloud.storage.retry import DEFAULT_RETRY

  return DEFAULT_RETRY.with_timeout(deadline)


def check_reachable(path, what: str) -> None:
  """Raise one BertjaxError line unless a gs:// path's bucket exists and can be reached.

  Args:
    path: any path; only gs:// ones are checked (local paths are checked where they are used).
    what: how the user named it, for the message (`--workdir`, `data.source`, ...).
  """
  if not str(path).startswith("gs://"):
    return
  import google.auth.exceptions
  from google.api_core import exceptions

  bucket, _ = _split_gs(path)
  try:
    _client().get_bucket(bucket, timeout=REQUEST_TIMEOUT_S, retry=_retry())
  except google.auth.exceptions.DefaultCredentialsError:
    raise BertjaxError(
      f"{what} {path}: no Google Cloud credentials were found; run `gcloud auth application-default login` "
      "(or set GOOGLE_APPLICATION_CREDENTIALS to a service account key; TPU VMs have them by default)"
    ) from None
  except exceptions.NotFound:
    raise BertjaxError(
      f"{what} {path}: bucket gs://{bucket} does not exist; create it (gcloud storage buckets create "
      f"gs://{bucket}) or fix the path"
    ) from None
  except exceptions.Forbidden:
    raise BertjaxError(
      f"{what} {path}: these credentials may not use bucket gs://{bucket}; grant them access "
      "(roles/storage.objectAdmin) or use another bucket"
    ) from None
  except (exceptions.GoogleAPICallError, exceptions.RetryError, OSError) as e:
    raise BertjaxError(
      f"{what} {path}: Cloud Storage cannot be reached ({type(e).__name__}: {str(e).splitlines()[0]}); "
      "check the network and try again"
    ) from None


# -- compare-and-swap on one file ---------------------------------------------------------------
def read_versioned(path) -> tuple[bytes | None, object]:
  """The file's bytes and version, or (None, None) when it does not exist."""
  if str(path).startswith("gs://"):
    bucket, name = _split_gs(path)
    blob = _client().bucket(bucket).get_blob(name, timeout=REQUEST_TIMEOUT_S, retry=_retry())
    if blob is None:
      return None, None
    from google.api_core import exceptions

    try:
      data = blob.download_as_bytes(if_generation_match=blob.generation, timeout=REQUEST_TIMEOUT_S, retry=_retry())
    except (exceptions.NotFound, exceptions.PreconditionFailed):  # replaced or removed meanwhile
      return read_versioned(path)
    return data, blob.generation
  try:
    fd = os.open(path, os.O_RDONLY)
  except FileNotFoundError:
    return None, None
  with os.fdopen(fd, "rb") as f:
    return f.read(), _local_version(os.fstat(f.fileno()))


def create(path, data: bytes):
  """Write `path` only if it does not exist; returns its version. Raises Conflict if it does."""
  if str(path).startswith("gs://"):
    return _gs_write(path, data, 0)
  with _guard(path):
    staging = _local_staging(path, data)
    try:
      os.link(staging, path)  # atomic, and fails when the name exists
    except FileExistsError:
      raise Conflict(str(path)) from None
    finally:
      os.unlink(staging)
    return _local_version(os.stat(path))


def replace_if(path, data: bytes, version):
  """Replace `path` only if it is still `version`; returns the new version. Raises Conflict."""
  if str(path).startswith("gs://"):
    return _gs_write(path, data, version)
  with _guard(path):
    if _local_version_of(path) != version:
      raise Conflict(str(path))
    os.replace(_local_staging(path, data), path)
    return _local_version(os.stat(path))


def delete_if(path, version, deadline: float = DEADLINE_S) -> None:
  """Delete `path` only if it is still `version`. Raises Conflict when it changed or is gone."""
  if str(path).startswith("gs://"):
    from google.api_core import exceptions

    bucket, name = _split_gs(path)
    try:
      blob = _client().bucket(bucket).blob(name)
      blob.delete(if_generation_match=version, timeout=min(REQUEST_TIMEOUT_S, deadline), retry=_retry(deadline))
    except (exceptions.NotFound, exceptions.PreconditionFailed):
      raise Conflict(str(path)) from None
    return
  with _guard(path):
    if _local_version_of(path) != version:
      raise Conflict(str(path))
    os.unlink(path)


def _gs_write(path, data: bytes, generation: int):
  from google.api_core import exceptions

  bucket, name = _split_gs(path)
  blob = _client().bucket(bucket).blob(name)
  try:
    blob.upload_from_string(data, if_generation_match=generation, timeout=REQUEST_TIMEOUT_S, retry=_retry())
  except exceptions.PreconditionFailed:
    raise Conflict(str(path)) from None
  return blob.generation


def _local_version(st: os.stat_result):
  return (st.st_ino, st.st_mtime_ns, st.st_size)


def _local_version_of(path):
  try:
    return _local_version(os.stat(path))
  except FileNotFoundError:
    return None


def _local_staging(path, data: bytes) -> str:
  staging = f"{path}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  with open(staging, "wb") as f:
    f.write(data)
  return staging


@contextlib.contextmanager
def _guard(path):
  """An exclusive flock on `.NAME.guard` beside `path`, for the length of one check-and-write."""
  path = epath.Path(path)
  with open(path.parent / f".{path.name}.guard", "a") as guard:
    fcntl.flock(guard, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(guard, fcntl.LOCK_UN)
