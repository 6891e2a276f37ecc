"""Every command with its run folder, corpus, init and outputs on gs://, against a real GCS server
(fake-gcs-server, `tests/support/gcs.py`): nothing mocked.

One micro pretraining run on gs:// is stopped with SIGTERM while a second run is refused on the
same folder, then resumed; its losses equal an uninterrupted local run's, bit for bit. Further
tests take that run on: a damaged newest checkpoint, export and import, a fine-tune, the other
commands, and the store going away in the middle of a save.
"""

import json
import signal
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from etils import epath
from flax import nnx

from bertjax.metrics import writer as metrics
from bertjax.train import lock
from tests.support.finetune import pair_examples, write_jsonl
from tests.support.runs import MICRO_OVERRIDES, launch

STEPS, EVERY = 8, 4
pytestmark = pytest.mark.slow


def _upload(local: Path, remote: epath.Path) -> None:
  for path in sorted(p for p in local.rglob("*") if p.is_file()):
    target = remote / path.relative_to(local).as_posix()
    target.write_bytes(path.read_bytes())


def _files(folder: epath.Path) -> list[epath.Path]:
  """Every file below `folder` (epath's gs:// has no recursive glob)."""
  out = []
  for path in folder.iterdir():
    out.extend(_files(path) if path.is_dir() else [path])
  return out


def _train_args(corpus: str, tokenizer: str, workdir, *extra) -> list[str]:
  overrides = MICRO_OVERRIDES + [
    f"data.source=files:{corpus}",
    f"data.tokenizer={tokenizer}",
    f"train.steps={STEPS}",
    f"checkpoint.every_steps={EVERY}",
    "checkpoint.keep=10",
    "train.eval_every=100",
    "train.eval_batches=0",
    "metrics.upload_every_s=0",
  ]
  return ["train", "--config", "configs/tiny.py", "--workdir", str(workdir), *(f"--config.{o}" for o in overrides)]


def _run(args, timeout=300) -> tuple[int, str]:
  proc = launch(args, devices=1)
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def _completed(args) -> str:
  code, out = _run(args)
  assert code == 0, out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  return out


def _error_line(out: str) -> str:
  lines = out.rstrip().splitlines()
  assert lines[-1].startswith("bertjax: error:"), out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  return lines[-1]


def _losses(workdir) -> dict[int, list[float]]:
  losses: dict[int, list[float]] = {}
  for record in metrics.read_metrics(workdir):
    if record["split"] == "train":
      losses.setdefault(record["step"], []).append(record["loss"])
  return losses


def _wait_for(condition, seconds=120.0, proc=None):
  deadline = time.monotonic() + seconds
  while not condition():
    assert time.monotonic() < deadline, "timed out"
    assert proc is None or proc.poll() is None, proc.communicate()[0][-3000:]
    time.sleep(0.05)


class _GsRun:
  def __init__(self, bucket, corpus, tokenizer, workdir, reference):
    self.bucket, self.corpus, self.tokenizer, self.workdir, self.reference = (
      bucket,
      corpus,
      tokenizer,
      workdir,
      reference,
    )

  def args(self, workdir=None, *extra):
    return _train_args(self.corpus, self.tokenizer, workdir or self.workdir) + list(extra)

  def assert_reference_losses(self, workdir):
    logged = _losses(workdir)
    assert sorted(logged) == list(range(1, STEPS + 1))
    for step, losses in logged.items():
      assert losses == [self.reference[step]] * len(losses), (step, losses, self.reference[step])


@pytest.fixture(scope="module")
def gs_run(gcs, corpus_and_tokenizer, tmp_path_factory) -> _GsRun:
  """A run on gs:// (corpus and tokenizer there too), stopped by SIGTERM while a second run is
  refused on the same folder, then resumed to the end."""
  root = corpus_and_tokenizer
  reference_dir = tmp_path_factory.mktemp("local") / "run"
  _completed(_train_args(f"{root}/corpus.txt", f"{root}/tokenizer", reference_dir))
  reference = {step: losses[-1] for step, losses in _losses(reference_dir).items()}

  bucket = epath.Path(f"gs://{gcs.make_bucket()}")
  _upload(root / "tokenizer", bucket / "tokenizer")
  (bucket / "corpus" / "part-0.txt").write_bytes((root / "corpus.txt").read_bytes())
  run = _GsRun(bucket, f"{bucket}/corpus/*.txt", f"{bucket}/tokenizer", bucket / "run", reference)

  # A checkpoint at every step slows the first run down enough to stop it midway.
  first = launch(run.args(None, "--config.checkpoint.every_steps=1"), devices=1)
  try:
    _wait_for(lambda: (run.workdir / "checkpoints" / "2").exists(), proc=first)
    first.send_signal(signal.SIGSTOP)
    # While it is held, a second run is refused, and its metrics are readable.
    assert len(metrics.read_metrics(run.workdir)) >= 1
    code, out = _run(run.args())
    assert code == 2 and "another run trains there" in _error_line(out)
    first.send_signal(signal.SIGTERM)
    first.send_signal(signal.SIGCONT)
    out, _ = first.communicate(timeout=120)
  finally:
    first.kill()
  assert first.returncode == 0, out[-3000:]
  stopped = [line for line in out.splitlines() if line.startswith("stopped by SIGTERM after step")]
  assert stopped and int(stopped[0].split()[5].rstrip(":")) < STEPS, out[-3000:]
  assert not (run.workdir / lock.LOCK_FILENAME).exists()
  out = _completed(run.args())
  assert "resumed from checkpoint step" in out
  return run


def test_a_run_on_gcs_resumes_after_sigterm_with_the_local_runs_losses(gs_run):
  gs_run.assert_reference_losses(gs_run.workdir)
  steps = sorted(p.name for p in (gs_run.workdir / "checkpoints").iterdir())
  assert str(STEPS) in steps and str(EVERY) in steps
  events = list((gs_run.workdir / "tb").iterdir())
  assert len(events) == 2 and all(e.stat().length > 0 for e in events)  # one events file per run


def test_a_damaged_newest_checkpoint_on_gcs_is_moved_aside_and_the_run_resumes_before_it(gs_run):
  workdir = gs_run.bucket / "damaged"
  for path in _files(gs_run.workdir):
    (workdir / path.relative_to(gs_run.workdir).as_posix()).write_bytes(path.read_bytes())
  newest = workdir / "checkpoints" / str(STEPS)
  biggest = max(_files(newest), key=lambda p: p.stat().length)
  biggest.write_bytes(biggest.read_bytes()[: biggest.stat().length // 2])  # truncated
  (workdir / "metrics.jsonl").write_text(
    "".join(json.dumps(r) + "\n" for r in metrics.read_metrics(workdir) if r["step"] <= EVERY)
  )
  out = _completed(gs_run.args(workdir))
  assert f"skipping checkpoint step {STEPS}" in out and "moved it aside to" in out
  assert f"resumed from checkpoint step {EVERY}" in out
  gs_run.assert_reference_losses(workdir)
  names = [p.name for p in (workdir / "checkpoints").iterdir()]
  assert str(STEPS) in names and any(n.startswith(f"{STEPS}.damaged-") for n in names)


def test_export_import_eval_and_plot_through_gcs(gs_run, tmp_path):
  from bertjax.hf import load

  export = gs_run.bucket / "export"
  _completed(["export", "--workdir", str(gs_run.workdir), "--format", "hf", "--out", str(export)])
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in export.iterdir()}
  imported = gs_run.bucket / "imported"
  _completed(["import-hf", "--hf", str(export), "--workdir", str(imported)])
  trained, _ = load.from_pretrained(str(gs_run.workdir))
  again, _ = load.from_pretrained(str(imported))
  for a, b in zip(jax.tree.leaves(nnx.state(trained, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  out = _completed(["eval", "--workdir", str(gs_run.workdir), "--config.train.eval_batches=2"])
  assert "mlm_accuracy" in out
  _completed(["plot", "--workdir", str(gs_run.workdir)])
  assert (gs_run.workdir / "curves.png").stat().length > 1000


def test_a_fine_tune_with_its_init_and_data_on_gcs(gs_run, tmp_path):
  words = "river mill children play weather markets songs people".split()
  data = gs_run.bucket / "task"
  write_jsonl(tmp_path / "train.jsonl", pair_examples(words, 64, seed=1))
  write_jsonl(tmp_path / "dev.jsonl", pair_examples(words, 32, seed=2))
  for name in ("train.jsonl", "dev.jsonl"):
    (data / name).write_bytes((tmp_path / name).read_bytes())
  workdir = gs_run.bucket / "finetuned"
  overrides = [
    f"finetune.train_file={data}/train.jsonl",
    f"finetune.dev_file={data}/dev.jsonl",
    "finetune.labels=no,yes",
    "finetune.max_seq_len=16",
    "finetune.epochs=1",
    "train.batch_size=16",
    "metrics.upload_every_s=0",
  ]
  args = ["finetune", "--task", "classification", "--config", "configs/finetune/classification.py"]
  args += ["--workdir", str(workdir), "--init", str(gs_run.workdir), *(f"--config.{o}" for o in overrides)]
  _completed(args)
  results = json.loads((workdir / "eval_results.json").read_text())
  assert 0.0 <= results["accuracy"] <= 1.0
  assert metrics.read_metrics(workdir)


def test_a_missing_bucket_is_one_line_before_any_work(gs_run):
  code, out = _run(gs_run.args("gs://no-such-bucket/run"))
  line = _error_line(out)
  assert code == 2 and "--workdir gs://no-such-bucket/run: bucket gs://no-such-bucket does not exist" in line
  code, out = _run(gs_run.args(None, "--config.data.source=files:gs://no-such-bucket/corpus/*.txt"))
  assert code == 2 and "data.source gs://no-such-bucket/corpus/: bucket gs://no-such-bucket does not exist" in (
    _error_line(out)
  )


def test_the_store_going_away_mid_save_loses_nothing(gs_run, gcs):
  """The server stops while step 8 is being written and comes back a few seconds later (the
  data stays): the run's retries ride the outage out, or the run fails with one line and the
  same command resumes; either way every logged loss equals the reference's. (A store that stays
  away fails the save with one line after the clients' retries, minutes later: docs/scaling.md.)"""
  workdir = gs_run.bucket / "outage"
  run = launch(gs_run.args(workdir), devices=1)
  try:
    _wait_for(lambda: any((workdir / "checkpoints").glob(f"{STEPS}*")), proc=run, seconds=300)
    gcs.stop()
    time.sleep(5)
    gcs.start()
    out, _ = run.communicate(timeout=400)
  finally:
    run.kill()
    if gcs._process is None:
      gcs.start()
  if run.returncode != 0:  # the save failed: one line, naming it, and the same command resumes
    line = _error_line(out)
    assert run.returncode == 2 and f"saving checkpoint step {STEPS}" in line, line
    _completed(gs_run.args(workdir))
  else:
    assert "Traceback" not in out, out[-3000:]
  gs_run.assert_reference_losses(workdir)
  assert str(STEPS) in [p.name for p in (workdir / "checkpoints").iterdir()]


def test_the_other_commands_take_gcs_folders(gs_run, tmp_path):
  """tokenizer train, data preview and bench, and the dry run, with their folders on gs://."""
  corpus = ["--config", "configs/tiny.py", *(f"--config.{o}" for o in MICRO_OVERRIDES)]
  corpus.append(f"--config.data.source=files:{gs_run.corpus}")
  tokenizer = gs_run.bucket / "tokenizer-trained"
  _completed(["tokenizer", "train", *corpus, "--out", str(tokenizer)])
  assert (tokenizer / "spm.model").exists()
  with_tokenizer = [*corpus, f"--config.data.tokenizer={tokenizer}"]
  preview = tmp_path / "preview.npz"
  work = gs_run.bucket / "data-work"
  _completed(["data", "preview", *with_tokenizer, "--workdir", str(work), "--batches", "1", "--out", str(preview)])
  assert np.load(preview)["input_ids"].shape[1] == 32
  out = _completed(["data", "bench", *with_tokenizer, "--workdir", str(work), "--seconds", "1"])
  assert json.loads(out.strip().splitlines()[-1])["pipeline_tokens_per_s"] > 0
  out = _completed(["train", *with_tokenizer, "--workdir", str(gs_run.bucket / "planned"), "--dry-run"])
  assert "step time" in out
  assert not (gs_run.bucket / "planned").exists()  # a plan writes nothing


def test_glue_with_its_data_init_and_runs_on_gcs(gs_run, tmp_path):
  from tests.support.finetune import write_learnable_glue

  write_learnable_glue(
    tmp_path / "glue", "river mill children play weather markets songs people".split(), "sst2", 32, 16
  )
  _upload(tmp_path / "glue", gs_run.bucket / "glue")
  suite = gs_run.bucket / "suite"
  overrides = ["finetune.epochs=1", "finetune.max_seq_len=16", "train.batch_size=16", "metrics.upload_every_s=0"]
  args = ["glue", "--init", str(gs_run.workdir), "--data", str(gs_run.bucket / "glue"), "--workdir", str(suite)]
  _completed([*args, "--tasks", "sst2", "--seeds", "1", *(f"--config.{o}" for o in overrides)])
  results = json.loads((suite / "glue_results.json").read_text())
  assert "sst2" in json.dumps(results)
