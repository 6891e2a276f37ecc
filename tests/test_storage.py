"""bertjax.storage: the checks a gs:// path gets before any work, against the test GCS server.
(The compare-and-swap writes are tested through the lease, tests/train/test_lock.py.)"""

import pytest

from bertjax import storage
from bertjax.errors import BertjaxError


def test_a_bucket_that_exists_passes_and_local_paths_are_not_checked(gcs_bucket, tmp_path):
  storage.check_reachable(f"{gcs_bucket}/run", "--workdir")
  storage.check_reachable(str(tmp_path / "missing"), "--workdir")


def test_a_missing_bucket_is_one_line_naming_the_flag_and_the_fix(gcs):
  with pytest.raises(BertjaxError) as error:
    storage.check_reachable("gs://no-such-bucket/runs/a", "train.init_from")
  assert str(error.value) == (
    "train.init_from gs://no-such-bucket/runs/a: bucket gs://no-such-bucket does not exist; create it "
    "(gcloud storage buckets create gs://no-such-bucket) or fix the path"
  )


def test_missing_credentials_are_one_line(monkeypatch, tmp_path):
  """Outside the test server's environment, with no credentials to be found (and no metadata
  server probed: conftest sets NO_GCE_CHECK)."""
  monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
  monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-key.json"))
  storage._client.cache_clear()
  try:
    with pytest.raises(
      BertjaxError, match=r"^--workdir gs://bkt/run: no Google Cloud credentials were found; run `gcloud"
    ):
      storage.check_reachable("gs://bkt/run", "--workdir")
  finally:
    storage._client.cache_clear()
