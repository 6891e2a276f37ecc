"""bertjax.atomic: a reader sees the old version or the new one, never a mix, and no leftovers."""

import pytest

from bertjax import atomic


def _hidden(folder):
  return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_file_is_replaced_whole_and_nothing_is_left_beside_it(tmp_path):
  target = tmp_path / "sub" / "config.json"
  atomic.write_text(target, "old")
  atomic.write_text(target, "new")
  assert target.read_text() == "new" and _hidden(target.parent) == []


def test_a_failed_file_write_keeps_the_old_file(tmp_path, monkeypatch):
  target = tmp_path / "config.json"
  atomic.write_text(target, "old")
  with pytest.raises(TypeError):
    atomic.write_bytes(target, "not bytes")  # fails inside the write
  assert target.read_text() == "old" and _hidden(tmp_path) == []


def test_a_folder_appears_only_complete(tmp_path):
  target = tmp_path / "export"
  with atomic.staged_folder(target) as staging:
    (staging / "a.txt").write_text("a")
    assert not target.exists()  # nothing at the target until the block finishes
  assert (target / "a.txt").read_text() == "a" and _hidden(tmp_path) == []


def test_a_failed_folder_leaves_the_old_one_and_no_staging(tmp_path):
  target = tmp_path / "export"
  with atomic.staged_folder(target) as staging:
    (staging / "a.txt").write_text("old")
  with pytest.raises(RuntimeError), atomic.staged_folder(target) as staging:
    (staging / "a.txt").write_text("half")
    raise RuntimeError("the disk filled up")
  assert (target / "a.txt").read_text() == "old" and _hidden(tmp_path) == []


def test_replace_swaps_a_folder_and_first_writer_wins_keeps_it(tmp_path):
  target = tmp_path / "tokenizer"
  with atomic.staged_folder(target) as staging:
    (staging / "v").write_text("1")
  with atomic.staged_folder(target, replace=True) as staging:
    (staging / "v").write_text("2")
  assert (target / "v").read_text() == "2"
  with atomic.staged_folder(target, replace=False) as staging:  # another process built it already
    (staging / "v").write_text("3")
  assert (target / "v").read_text() == "2" and _hidden(tmp_path) == []
