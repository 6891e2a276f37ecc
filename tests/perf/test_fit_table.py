"""benchmarks/tpu_fit_table.py's search: the largest power-of-two batch per chip that fits, compiling
as few fitting batches as it can (each takes minutes; one that runs out of memory, seconds)."""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).parents[2] / "benchmarks/tpu_fit_table.py"
_SPEC = importlib.util.spec_from_file_location("tpu_fit_table", _SCRIPT)
fit_table = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fit_table)


class FakeRuns:
  """Compiles nothing: a batch fits up to `limit` sequences a chip; records which were asked."""

  def __init__(self, limit: int):
    self.limit, self.asked = limit, []

  def get(self, argv):
    per_chip = int(next(a for a in argv if a.startswith("--config.train.batch_size=")).split("=")[1]) // 4
    self.asked.append(per_chip)
    figures = dict.fromkeys(("memory_per_device_gib", "hbm_gib", "estimated_mfu", "scheduled_mfu"), 0.5)
    step_s = dict.fromkeys(("estimated_step_s", "scheduled_step_s", "scheduled_tokens_per_s"), 1.0)
    return {"fits": per_chip <= self.limit, **figures, **step_s}


@pytest.mark.parametrize(
  "limit, guess, found, asked",
  [
    (96, 256, 64, [256, 128, 64]),  # from above: two fast failures, one fitting compile
    (96, 16, 64, [16, 32, 64, 128]),  # from below: doubles until the next does not fit
    (0, 4, None, [4, 2, 1]),  # nothing fits
  ],
)
def test_the_search_finds_the_largest_power_of_two_that_fits(limit, guess, found, asked):
  runs = FakeRuns(limit)
  assert fit_table.largest_fitting(runs, "base", "1", "v5e", "none", guess) == found
  assert runs.asked == asked


def test_lines_with_another_tag_are_compiled_again(tmp_path):
  """A line made for another program (an untagged one here) fills no cell, a fit or not."""
  tagged = fit_table.command("base", "1", "v5e", "none", 256)
  other = fit_table.command("base", "1", "v5e", "none", 512)
  lines = [
    {"records": fit_table.RECORDS, "command": tagged, "figures": {"fits": True}},
    {"command": other, "figures": {"fits": False}},
  ]
  (tmp_path / "runs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
  runs = fit_table.Runs(tmp_path)
  assert " ".join(tagged) in runs.done and " ".join(other) not in runs.done


@pytest.mark.parametrize(
  "remat, limit, asked, batch",
  [
    ("none", 300, [256, 512], "| 256 |"),  # from the first guess up
    ("full", 300, [4096, 2048, 1024, 512, 256], "| 256 |"),  # 16 times higher, failures down
    ("full", 10_000, [4096], "| ≥ 4096 |"),  # the search's cap fits: the row says so
  ],
)
def test_with_full_rematerialisation_the_search_starts_higher(remat, limit, asked, batch):
  runs = FakeRuns(limit)
  args = argparse.Namespace(models=["base"], phases=["1"], chips=["v5e"], remat=[remat], scan=False, attention="auto")
  rows = fit_table.table(runs, args).splitlines()
  assert runs.asked[: len(asked)] == asked and set(runs.asked[len(asked) :]) <= set(asked)
  assert batch in rows[-1]


def test_the_report_compiles_nothing_and_says_which_cells_are_not_searched_yet(tmp_path):
  """v5e's search is on record (256 fits, 512 does not); v6e's, which starts from it, is not."""
  figures = FakeRuns(limit=256).get(fit_table.command("base", "1", "v5e", "none", 256))
  lines = [
    {"records": fit_table.RECORDS, "command": fit_table.command("base", "1", "v5e", "none", 256), "figures": figures},
    {
      "records": fit_table.RECORDS,
      "command": fit_table.command("base", "1", "v5e", "none", 512),
      "figures": {"fits": False},
    },
  ]
  (tmp_path / "runs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
  args = argparse.Namespace(
    models=["base"], phases=["1"], chips=["v5e", "v6e", "v5p"], remat=["none"], scan=False, attention="auto"
  )
  rows = fit_table.table(fit_table.Runs(tmp_path, compile=False), args).splitlines()[2:]
  assert rows[0].startswith("| base | 1 (128) | v5e | none | auto | 256 |")
  assert [r.split(" | ")[2] for r in rows[1:]] == ["v6e", "v5p"] and all("not compiled yet" in r for r in rows[1:])


def test_an_attention_implementation_is_searched_as_its_own_cells():
  """`--attention pallas` compiles with that override; `auto` leaves the command as it was, so
  the lines already in runs.jsonl still match."""
  assert fit_table.command("base", "1", "v5e", "none", 256) == fit_table.command(
    "base", "1", "v5e", "none", 256, attention="auto"
  )
  pallas = fit_table.command("base", "1", "v5e", "none", 256, attention="pallas")
  assert pallas[-1] == "--config.model.attention_impl=pallas"
  runs = FakeRuns(300)
  args = argparse.Namespace(
    models=["base"], phases=["1"], chips=["v5e"], remat=["none"], scan=False, attention="pallas"
  )
  rows = fit_table.table(runs, args).splitlines()
  assert rows[-1].startswith("| base | 1 (128) | v5e | none | pallas | 256 |")
