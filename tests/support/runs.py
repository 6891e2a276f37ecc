"""Runs of the real trainer: the micro overrides, a corpus with its tokenizer, launching the CLI.

Multi-process jobs are real processes joined through `jax.distributed` on localhost.
"""

import os
import socket
import subprocess
import sys
import threading

import pytest

from bertjax.config import loading
from bertjax.data import tokenizer as tokenizer_lib
from bertjax.metrics import writer
from tests.support.corpora import numbered_documents, write_bert_text
from tests.support.micro import MICRO
from tests.support.xla import FAST_COMPILE

MICRO_OVERRIDES = [f"model.{k}={v}" for k, v in MICRO.items()] + [
  "data.seq_len=32",
  "data.max_predictions=5",
  "data.vocab_size=256",
  "train.batch_size=8",
  "train.log_every=1",
  "train.eval_batches=2",
  "optim.warmup_steps=0",
  "optim.lr=3e-3",
  "train.compilation_cache=off",  # in this process; launched runs share a cache (`launch`)
]


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
  """A local corpus in google-research/bert's format and a 256-piece tokenizer trained on it."""
  root = tmp_path_factory.mktemp("pretrain-data")
  write_bert_text(root / "corpus.txt", numbered_documents(40))
  config = loading.load_config("configs/tiny.py", MICRO_OVERRIDES + [f"data.source=files:{root}/corpus.txt"])
  tokenizer_lib.train_tokenizer(config, root / "tokenizer")
  return root


def run_config(root, *extra):
  """The validated micro run config over `corpus_and_tokenizer`'s corpus, with `extra` overrides."""
  return loading.load_config(
    "configs/tiny.py",
    MICRO_OVERRIDES
    + [
      f"data.source=files:{root}/corpus.txt",
      f"data.tokenizer={root}/tokenizer",
      f"data.cache_dir={root}/cache",
      *extra,
    ],
  )


def train_args(root, workdir, steps=4):
  """`bertjax train` arguments for the micro run over `corpus_and_tokenizer`'s corpus."""
  overrides = MICRO_OVERRIDES + [
    f"data.source=files:{root}/corpus.txt",
    f"data.tokenizer={root}/tokenizer",
    f"data.cache_dir={root}/cache",
    f"train.steps={steps}",
    "train.eval_every=100",
  ]
  return ["train", "--config", "configs/tiny.py", "--workdir", str(workdir), *(f"--config.{o}" for o in overrides)]


def train_losses(workdir) -> list[float]:
  return [r["loss"] for r in writer.read_metrics(workdir) if r["split"] == "train"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


# What a launched run adds to the environment: every program into the shared cache, not only those
# over JAX's 1 s default (a micro run compiles some thirty small ones: init, placement, eval).
LAUNCHED_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def with_shared_cache(args: list) -> list:
  """CLI arguments that compile into the session's cache (XDG_CACHE_HOME, set by conftest), so the
  same program compiled by an earlier test's run loads. An in-process run keeps it off
  (MICRO_OVERRIDES), since JAX's cache setting would stay on for the rest of the test process."""
  return ["--config.train.compilation_cache=auto" if a == "--config.train.compilation_cache=off" else a for a in args]


def launch(args, devices: int, extra_env=None, module: str = "bertjax") -> subprocess.Popen:
  """`python -m bertjax ARGS` in a new process with `devices` fake CPU devices; output merged.
  `module` runs another entry point instead (tests.support.faults wraps the CLI)."""
  env = dict(
    os.environ,
    PYTHONPATH=os.getcwd(),
    JAX_PLATFORMS="cpu",
    PYTHONUNBUFFERED="1",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
    **LAUNCHED_ENV,
    **(extra_env or {}),
  )
  return subprocess.Popen(
    [sys.executable, "-m", module, *with_shared_cache(args)],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def launch_job(args, processes=2, devices=2, extra_env=None) -> list[subprocess.Popen]:
  """`processes` processes of one command, joined through a coordinator on localhost."""
  port = free_port()
  return [
    launch(
      args + ["--coordinator", f"localhost:{port}", "--num_processes", str(processes), "--process_id", str(i)],
      devices=devices,
      extra_env=extra_env,
    )
    for i in range(processes)
  ]


def signal_at_step(procs, step: int, steps: int, sig, target: int) -> list[str]:
  """Read every process's output; once process 0 logs `step`, send `sig` to process `target`."""
  outputs = [[] for _ in procs]

  def read(i):
    for line in procs[i].stdout:
      outputs[i].append(line)
      if i == 0 and line.split("|")[0].split() == ["step", f"{step}/{steps}"]:
        procs[target].send_signal(sig)

  readers = [threading.Thread(target=read, args=(i,)) for i in range(len(procs))]
  for reader in readers:
    reader.start()
  for proc in procs:
    proc.wait(timeout=300)
  for reader in readers:
    reader.join()
  return ["".join(lines) for lines in outputs]
