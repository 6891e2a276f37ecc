"""The pretraining loop end to end: learning, logging, the guard, and real multi-process runs."""

import json
import time

import jax
import numpy as np
import pytest

from bertjax.config import loading as config_lib
from bertjax.errors import BertjaxError
from bertjax.metrics import writer as metrics
from bertjax.train import pretrain
from bertjax.train import run as run_lib
from tests.support.runs import MICRO_OVERRIDES, free_port, launch, run_config, train_args


def test_loss_falls_on_the_builtin_corpus_and_everything_is_logged(tmp_path):
  config = config_lib.load_config(
    "configs/tiny.py",
    MICRO_OVERRIDES
    + [
      "data.source=builtin",
      f"data.cache_dir={tmp_path}/cache",
      "train.steps=40",
      "train.eval_every=20",
      "data.tokenizer_sentences=5000",
    ],
  )
  result = pretrain.train(config, tmp_path / "run")
  final = result.final
  assert int(result.state.step) == 40
  records = metrics.read_metrics(tmp_path / "run")
  train = [r for r in records if r["split"] == "train"]
  evals = [r for r in records if r["split"] == "eval"]
  assert [r["step"] for r in train] == list(range(1, 41))
  assert [r["step"] for r in evals] == [20, 40]
  losses = [r["loss"] for r in train]
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses  # batches of 8 are noisy: average
  assert evals[1]["loss"] < evals[0]["loss"], evals
  for key in (
    "loss",
    "mlm_loss",
    "mlm_accuracy",
    "nsp_loss",
    "nsp_accuracy",
    "learning_rate",
    "grad_norm",
    "skipped_steps",
    "padding_fraction",
    "epoch",
    "tokens_per_s",
    "step_s",
  ):
    assert key in train[-1], key
  for key in ("mlm_accuracy", "nsp_accuracy", "mlm_baseline_accuracy", "nsp_baseline_accuracy"):
    assert key in evals[-1] and key in final
  assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == 40
  assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
  assert (tmp_path / "run" / "tokenizer").is_dir()


def test_the_nonfinite_guard_stops_the_run_with_its_message(tmp_path, corpus_and_tokenizer):
  config = run_config(corpus_and_tokenizer, "train.steps=20", "optim.max_nonfinite=3", "train.eval_every=100")
  run = run_lib.setup(config, tmp_path / "run")
  state = run.steps.init(0)
  poisoned = state.replace(params=jax.tree.map(lambda x: x * np.float32("nan"), state.params))
  with pytest.raises(BertjaxError, match="step 1 went non-finite, and so did every step to step 3: the gradient"):
    pretrain.train(config, tmp_path / "run", state=poisoned)
  logged = metrics.read_metrics(tmp_path / "run")
  assert [r["skipped_steps"] for r in logged if r["split"] == "train"][:2] == [1.0, 2.0]


def test_the_profiler_window_writes_a_trace(tmp_path, corpus_and_tokenizer):
  config = run_config(corpus_and_tokenizer, "train.steps=4", "train.eval_every=100", "train.profile_steps=1:3")
  pretrain.train(config, tmp_path / "run")
  traces = list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
  assert traces, list((tmp_path / "run").rglob("*"))
  # The steps are annotated (StepTraceAnnotation): their events carry a step_num stat.
  assert b"step_num" in b"".join(t.read_bytes() for t in traces)


def test_a_bad_profile_window_is_one_line(corpus_and_tokenizer):
  with pytest.raises(BertjaxError, match="train.profile_steps='3:1': expected START:STOP with START < STOP"):
    run_config(corpus_and_tokenizer, "train.steps=4", "train.profile_steps=3:1")  # loading, before any device work


def test_the_persistent_compilation_cache_fills(tmp_path, corpus_and_tokenizer):
  cache = tmp_path / "jax-cache"
  args = train_args(corpus_and_tokenizer, tmp_path / "run", steps=2) + [f"--config.train.compilation_cache={cache}"]
  proc = launch(args, devices=1)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-2000:]
  assert cache.is_dir() and any(cache.iterdir())  # the train step (compiled in seconds) is cached


def test_an_unwritable_workdir_fails_before_training(tmp_path, corpus_and_tokenizer):
  blocked = tmp_path / "file"
  blocked.write_text("not a folder")
  with pytest.raises(BertjaxError, match="cannot write there"):
    run_lib.prepare_data(run_config(corpus_and_tokenizer, "train.steps=2"), blocked / "run")


def test_a_full_workdir_fails_before_training(tmp_path, corpus_and_tokenizer, monkeypatch):
  import shutil

  from bertjax.train import save_failures

  almost_full = shutil._ntuple_diskusage(10**9, 10**9 - 1024, 1024)
  monkeypatch.setattr(save_failures.shutil, "disk_usage", lambda path: almost_full)
  with pytest.raises(BertjaxError, match=r"0 MiB free, but one checkpoint needs about [0-9.,]+ MiB"):
    pretrain.train(run_config(corpus_and_tokenizer, "train.steps=2"), tmp_path / "run")
  assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())


def test_a_process_that_cannot_reach_the_coordinator_fails_in_time(tmp_path, corpus_and_tokenizer):
  args = train_args(corpus_and_tokenizer, tmp_path / "lonely") + [
    "--coordinator",
    f"localhost:{free_port()}",
    "--num_processes",
    "2",
    "--process_id",
    "1",
    "--config.train.distributed_timeout_s=3",
  ]
  start = time.monotonic()
  proc = launch(args, devices=2)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 2, out[-2000:]
  assert "process 1 could not join the job at localhost:" in out and "within 3 s" in out
  assert time.monotonic() - start < 60
