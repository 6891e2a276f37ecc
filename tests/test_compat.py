"""A run folder written by bertjax 0.1.0 (tests/fixtures/run_v0) still resumes and exports the same.

The fixture's README says how it was made. Its `expected.json` holds what that version logged and
exported: the losses of a resume from step 4 to 6 must agree to a few float32 ulps (`LOSS_RTOL`),
and every export file byte for byte. Two exceptions: the export markers hold the export's own path, so they are
compared without it, and the params export's config.json may describe model settings added since
(at their defaults), compared value by value with the copy in `exports/params_config.json`.
The commands run the real CLI in a process with one CPU device, as the fixture was made.
"""

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from bertjax.metrics import writer
from bertjax.model.config import BertConfig
from tests.support.runs import launch

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run_v0"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
MARKER = "bertjax_export.json"
# On some CPUs the resumed losses are bit for bit those 0.1.0 logged; on an AMD EPYC with AVX-512,
# XLA's CPU kernels rounded train step 5's loss 2 ulps away (9.5e-7 at 6.17: relative 1.5e-7),
# while step 6 and the evaluation stayed bit for bit. A resume that restored anything differently
# (batch, RNG, parameters, optimizer moments) computes another step, not the same one rounded
# another way: the losses move between steps by 5e-3 relative here.
LOSS_RTOL = 1e-6


@pytest.fixture
def old_run(tmp_path) -> Path:
  """A copy of the fixture (runs write into their folder)."""
  shutil.copytree(FIXTURE, tmp_path / "fixture")
  return tmp_path / "fixture"


def _run(args, timeout=300) -> str:
  proc = launch(args, devices=1)
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-3000:]
  return out


def _sha256(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("fmt", ["hf", "params"])
def test_an_old_run_exports_byte_identically(old_run, tmp_path, fmt):
  out = tmp_path / fmt
  _run(["export", "--workdir", str(old_run / "run"), "--format", fmt, "--out", str(out)])
  expected = EXPECTED["exports"][fmt]
  written = {str(p.relative_to(out)): p for p in sorted(out.rglob("*")) if p.is_file()}
  assert sorted(written) == sorted(expected)
  for name, path in written.items():
    if name == MARKER:  # holds the --workdir given to export
      marker = json.loads(path.read_text())
      assert {k: v for k, v in marker.items() if k != "workdir"} == EXPECTED["exports"]["skip_or_normalise"][
        f"{fmt}/{MARKER}"
      ]["normalised"]
    elif (fmt, name) == ("params", "config.json") and _sha256(path) != expected[name]:
      _assert_same_model_description(json.loads(path.read_text()))
    else:
      assert _sha256(path) == expected[name], f"{fmt}/{name} differs from bertjax 0.1.0's export"


def _assert_same_model_description(exported: dict) -> None:
  """The params export's config.json may gain model settings that did not exist in 0.1.0, at
  their defaults (so loading it builds the same model); every value 0.1.0 wrote stays as it was."""
  old = json.loads((FIXTURE / "exports" / "params_config.json").read_text())
  assert {k: v for k, v in exported.items() if k != "bert_config"} == {
    k: v for k, v in old.items() if k != "bert_config"
  }
  new_model, old_model = exported["bert_config"], old["bert_config"]
  assert {k: new_model[k] for k in old_model} == old_model
  defaults = {f.name: f.default for f in dataclasses.fields(BertConfig)}
  added = {k: v for k, v in new_model.items() if k not in old_model}
  assert added == {k: defaults[k] for k in added}


def test_an_old_run_resumes_with_the_losses_it_would_have_logged(old_run, tmp_path):
  corpus = old_run / "corpus"
  out = _run(
    [
      "train",
      "--workdir",
      str(old_run / "run"),
      "--config.train.steps=6",
      f"--config.data.source=files:{corpus}/*.txt",
      f"--config.data.cache_dir={tmp_path / 'cache'}",
    ]
  )
  assert "resumed from checkpoint step 4" in out
  records = writer.read_metrics(old_run / "run")
  for split in ("train", "eval"):
    logged = {r["step"]: r for r in records if r["split"] == split}
    for step, losses in EXPECTED["losses"][split].items():
      if split == "train" and int(step) <= 4:
        continue  # logged by bertjax 0.1.0 itself: in the fixture's metrics.jsonl already
      got = {name: logged[int(step)][name] for name in losses}
      assert got == pytest.approx(losses, rel=LOSS_RTOL, abs=0), f"{split} step {step}: {got} != {losses}"
