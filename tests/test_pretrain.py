"""The pretraining loop end to end: learning, logging, the guard, and real multi-process runs."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bertjax import config as config_lib
from bertjax import metrics, pretrain
from bertjax.data import tokenizer as tokenizer_lib
from bertjax.errors import BertjaxError
from tests.conftest import MICRO
from tests.data_fixtures import numbered_documents, write_bert_text

MICRO_OVERRIDES = [f"model.{k}={v}" for k, v in MICRO.items()] + [
    "data.seq_len=32", "data.max_predictions=5", "data.vocab_size=256", "train.batch_size=8",
    "train.log_every=1", "train.eval_batches=2", "optim.warmup_steps=0", "optim.lr=3e-3",
    "train.compilation_cache=off"]


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
  """A local corpus in google-research/bert's format and a 256-piece tokenizer trained on it."""
  root = tmp_path_factory.mktemp("pretrain-data")
  write_bert_text(root / "corpus.txt", numbered_documents(40))
  config = config_lib.load_config("configs/tiny.py", MICRO_OVERRIDES + [f"data.source=files:{root}/corpus.txt"])
  tokenizer_lib.train_tokenizer(config, root / "tokenizer")
  return root


def _config(root, *extra):
  return config_lib.load_config("configs/tiny.py", MICRO_OVERRIDES + [
      f"data.source=files:{root}/corpus.txt", f"data.tokenizer={root}/tokenizer",
      f"data.cache_dir={root}/cache", *extra])


def test_loss_falls_on_the_builtin_corpus_and_everything_is_logged(tmp_path):
  config = config_lib.load_config("configs/tiny.py", MICRO_OVERRIDES + [
      "data.source=builtin", f"data.cache_dir={tmp_path}/cache", "train.steps=40", "train.eval_every=20",
      "data.tokenizer_sentences=5000"])
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
  for key in ("loss", "mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy", "learning_rate", "grad_norm",
              "skipped_steps", "padding_fraction", "epoch", "tokens_per_s", "step_s"):
    assert key in train[-1], key
  for key in ("mlm_accuracy", "nsp_accuracy", "mlm_baseline_accuracy", "nsp_baseline_accuracy"):
    assert key in evals[-1] and key in final
  assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == 40
  assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
  assert (tmp_path / "run" / "tokenizer").is_dir()


def test_the_nonfinite_guard_stops_the_run_with_its_message(tmp_path, corpus_and_tokenizer):
  config = _config(corpus_and_tokenizer, "train.steps=20", "optim.max_nonfinite=3", "train.eval_every=100")
  run = pretrain.setup(config, tmp_path / "run")
  state = run.steps.init(0)
  poisoned = state.replace(params=jax.tree.map(lambda x: x * np.float32("nan"), state.params))
  with pytest.raises(BertjaxError, match="step 3: the gradient was not finite for 3 consecutive steps"):
    pretrain.train(config, tmp_path / "run", state=poisoned)
  logged = metrics.read_metrics(tmp_path / "run")
  assert [r["skipped_steps"] for r in logged if r["split"] == "train"][:2] == [1.0, 2.0]


def test_the_profiler_window_writes_a_trace(tmp_path, corpus_and_tokenizer):
  config = _config(corpus_and_tokenizer, "train.steps=4", "train.eval_every=100", "train.profile_steps=1:3")
  pretrain.train(config, tmp_path / "run")
  traces = list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
  assert traces, list((tmp_path / "run").rglob("*"))


def test_a_bad_profile_window_is_one_line(tmp_path, corpus_and_tokenizer):
  config = _config(corpus_and_tokenizer, "train.steps=4", "train.profile_steps=3:1")
  with pytest.raises(BertjaxError, match="train.profile_steps='3:1': expected START:STOP with START < STOP"):
    pretrain.prepare_data(config, tmp_path / "run")  # before any device work


def test_the_persistent_compilation_cache_fills(tmp_path, corpus_and_tokenizer):
  cache = tmp_path / "jax-cache"
  args = _train_args(corpus_and_tokenizer, tmp_path / "run", steps=2) + [f"--config.train.compilation_cache={cache}"]
  proc = _launch(args, devices=1)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-2000:]
  assert cache.is_dir() and any(cache.iterdir())  # the train step (compiled in seconds) is cached


def test_an_unwritable_workdir_fails_before_training(tmp_path, corpus_and_tokenizer):
  blocked = tmp_path / "file"
  blocked.write_text("not a folder")
  with pytest.raises(BertjaxError, match="cannot write there"):
    pretrain.prepare_data(_config(corpus_and_tokenizer, "train.steps=2"), blocked / "run")


def test_a_full_workdir_fails_before_training(tmp_path, corpus_and_tokenizer, monkeypatch):
  import shutil

  from bertjax import checkpoint

  monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1024, 1024))
  with pytest.raises(BertjaxError, match=r"0 MiB free, but one checkpoint needs about [0-9.,]+ MiB"):
    pretrain.train(_config(corpus_and_tokenizer, "train.steps=2"), tmp_path / "run")
  assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(args, devices: int, extra_env=None) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=os.getcwd(), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
             **(extra_env or {}))
  return subprocess.Popen([sys.executable, "-m", "bertjax", *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _launch_job(args, processes=2, devices=2, extra_env=None) -> list[subprocess.Popen]:
  """`processes` processes of one command, joined through a coordinator on localhost."""
  port = _free_port()
  return [_launch(args + ["--coordinator", f"localhost:{port}", "--num_processes", str(processes),
                          "--process_id", str(i)], devices=devices, extra_env=extra_env) for i in range(processes)]


def _train_args(root, workdir, steps=4):
  overrides = MICRO_OVERRIDES + [f"data.source=files:{root}/corpus.txt", f"data.tokenizer={root}/tokenizer",
                                 f"data.cache_dir={root}/cache", f"train.steps={steps}", "train.eval_every=100"]
  return ["train", "--config", "configs/tiny.py", "--workdir", str(workdir), *(f"--config.{o}" for o in overrides)]


def _train_losses(workdir) -> list[float]:
  return [r["loss"] for r in metrics.read_metrics(workdir) if r["split"] == "train"]


def test_two_processes_of_two_devices_log_what_one_process_of_four_logs(tmp_path, corpus_and_tokenizer):
  one = _launch(_train_args(corpus_and_tokenizer, tmp_path / "one"), devices=4)
  out, _ = one.communicate(timeout=300)
  assert one.returncode == 0, out[-3000:]

  procs = _launch_job(_train_args(corpus_and_tokenizer, tmp_path / "two"))
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "held-out MLM accuracy" in outs[0] and "held-out MLM accuracy" not in outs[1]  # process 0 reports

  single, multi = _train_losses(tmp_path / "one"), _train_losses(tmp_path / "two")
  assert len(single) == 4 and len(multi) == 4
  np.testing.assert_allclose(multi, single, rtol=1e-5)


def test_a_process_that_cannot_reach_the_coordinator_fails_in_time(tmp_path, corpus_and_tokenizer):
  args = _train_args(corpus_and_tokenizer, tmp_path / "lonely") + [
      "--coordinator", f"localhost:{_free_port()}", "--num_processes", "2", "--process_id", "1",
      "--config.train.distributed_timeout_s=3"]
  start = time.monotonic()
  proc = _launch(args, devices=2)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 2, out[-2000:]
  assert "process 1 could not join the job at localhost:" in out and "within 3 s" in out
  assert time.monotonic() - start < 60
