"""Shared test setup: 8 fake CPU devices, offline hubs, and the fixture modules of tests/support.

XLA_FLAGS must be set before JAX creates its backend, so this runs before any test imports jax.
"""

import atexit
import os
import shutil
import sys
import tempfile
import traceback

import pytest

from tests.support.xla import FAST_COMPILE

os.environ["XLA_FLAGS"] = " ".join(
  filter(None, [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8", FAST_COMPILE])
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
for _offline in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
  os.environ.setdefault(_offline, "1")
# google-auth never looks for a cloud metadata server (its probe would leave localhost).
os.environ.update(NO_GCE_CHECK="True", GCE_METADATA_HOST="127.0.0.1:9", GCE_METADATA_IP="127.0.0.1:9")
# The runs the tests launch use `train.compilation_cache=auto`, which is under XDG_CACHE_HOME: one
# folder for this session, so a program compiled by one test's run loads in the next ones (the
# suite launches about a hundred runs of a few configurations), and no user cache is read or
# filled. Hub caches (HF_HOME's default) are under it too, and the hubs are offline.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="bertjax-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)

# Fixtures shared across test folders live in these modules, never in another test file.
pytest_plugins = [
  "tests.support.micro",
  "tests.support.corpora",
  "tests.support.runs",
  "tests.support.finetune",
  "tests.support.finetune_families",
  "tests.support.gcs",
]


def pytest_configure(config):
  # Declared here too, so that `-p no:xdist` (one process, no plugin) accepts the marks below.
  config.addinivalue_line("markers", "xdist_group(name): tests that share a worker under pytest-xdist")


def pytest_collection_modifyitems(config, items):
  """With pytest-xdist (`make test` runs two workers): tests go to whichever worker is free, but
  a file that builds module-scoped fixtures keeps its tests on one worker, so each is built once,
  and tests/finetune shares one worker for its session-wide fine-tuned runs."""
  shares_fixtures = {}
  for item in items:
    path = item.path.relative_to(config.rootpath)
    if path not in shares_fixtures:
      shares_fixtures[path] = 'scope="module"' in item.path.read_text()
    if path.parts[:2] == ("tests", "finetune"):
      item.add_marker(pytest.mark.xdist_group("finetune"))
    elif shares_fixtures[path]:
      item.add_marker(pytest.mark.xdist_group(str(path)))


# Forks made while JAX runs threads in this process (a deadlock risk: the child inherits locks
# that no thread will release). JAX only warns; the suite fails the test that did it.
_FORKS_UNDER_JAX: list[str] = []


def _note_fork() -> None:
  bridge = sys.modules.get("jax._src.xla_bridge")
  started = getattr(bridge, "backends_are_initialized", None)
  if started and started():
    _FORKS_UNDER_JAX.append("".join(traceback.format_stack(limit=12)))


os.register_at_fork(before=_note_fork)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
  before = len(_FORKS_UNDER_JAX)
  yield
  if len(_FORKS_UNDER_JAX) > before:
    raise AssertionError(f"{item.nodeid} forked while JAX runs threads, from:\n{_FORKS_UNDER_JAX[-1]}")
