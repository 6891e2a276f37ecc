"""launch/: local multi-process runs for real, and the TPU and SLURM scripts' exact commands.

The TPU and SLURM scripts are run with --dry-run (no gcloud, sbatch or network needed); their
output is the exact command lines they would run.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bertjax.metrics import writer as metrics
from bertjax.train import checkpoint
from tests.support.runs import LAUNCHED_ENV, launch, train_args, train_losses, with_shared_cache
from tests.support.xla import FAST_COMPILE

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = ["local.sh", "tpu_pod.sh", "slurm_submit.sh", "slurm_gpu.sbatch"]


def _env(**extra) -> dict:
  env = dict(
    os.environ,
    PYTHONPATH=str(REPO),
    JAX_PLATFORMS="cpu",
    PYTHONUNBUFFERED="1",
    XLA_FLAGS=FAST_COMPILE,
    **LAUNCHED_ENV,
    **extra,
  )
  return env


# Runs the command with SIGINT at its default action. A test runner started in the background
# (`make test &`) ignores SIGINT, its children inherit that, and bash cannot trap a signal that was
# ignored when it started, so local.sh would never see the tests' Ctrl-C. (A preexec_fn would do
# the same in the forked child, but runs Python between fork and exec in a process where JAX has
# started threads.)
_INTERRUPTIBLE = [
  sys.executable,
  "-c",
  "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])",
]


def _interruptible(args) -> list[str]:
  return [*_INTERRUPTIBLE, *(str(a) for a in args)]


def _run(args, timeout=60, **env) -> subprocess.CompletedProcess:
  return subprocess.run(
    _interruptible(args), env=_env(**env), capture_output=True, text=True, timeout=timeout, cwd=REPO
  )


# -- launch/local.sh --

FAKE_PROCESS = """#!/usr/bin/env bash
echo "args: $*"
echo "devices: ${XLA_FLAGS##* } gpus: ${CUDA_VISIBLE_DEVICES:-none}"
if [[ -n ${ON_TERM:-} ]]; then trap "$ON_TERM" TERM; fi
# The failing process waits a moment, so that the others have set their trap when it fails.
if [[ ${!#} == "$FAIL_ID" ]]; then echo "process ${!#} fails"; sleep 0.5; exit 3; fi
for ((i = 0; i < SLEEP * 10; i++)); do sleep 0.1; done
"""


@pytest.fixture
def fake_process(tmp_path) -> Path:
  path = tmp_path / "fake.sh"
  path.write_text(FAKE_PROCESS)
  path.chmod(0o755)
  return path


def test_local_sh_starts_n_processes_with_their_index_and_prefixes_their_lines(fake_process):
  result = _run(
    [LAUNCH / "local.sh", 2, "--", fake_process, "train", "a b"],
    PORT="4321",
    LOCAL_DEVICES="2",
    GPUS_PER_PROCESS="2",
    FAIL_ID="none",
    SLEEP="0",
  )
  assert result.returncode == 0, result.stderr
  lines = set(result.stdout.splitlines())
  for i in range(2):
    assert f"[{i}] args: train a b --coordinator localhost:4321 --num_processes 2 --process_id {i}" in lines
  assert "[0] devices: --xla_force_host_platform_device_count=2 gpus: 0,1" in lines
  assert "[1] devices: --xla_force_host_platform_device_count=2 gpus: 2,3" in lines


@pytest.mark.parametrize("on_term", ["", ":"], ids=["stop_on_sigterm", "ignore_sigterm"])
def test_local_sh_stops_the_others_and_fails_when_one_process_fails(fake_process, on_term):
  """A bertjax process only notes SIGTERM (JAX's preemption service): the others get SIGKILL after a grace."""
  start = time.monotonic()
  result = _run(
    [LAUNCH / "local.sh", 3, "--", fake_process], FAIL_ID="1", SLEEP="30", ON_TERM=on_term, LOCAL_SH_GRACE="1"
  )
  assert result.returncode == 3
  assert "[1] process 1 fails" in result.stdout
  assert "a process exited with status 3; stopping the others" in result.stderr
  assert ("killing the processes still running after 1 s" in result.stderr) == bool(on_term)
  assert time.monotonic() - start < 10  # the sleeping ones were stopped, not waited for


def _start(args, **env) -> subprocess.Popen:
  return subprocess.Popen(
    _interruptible(args), env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
  )


def test_local_sh_interrupted_waits_for_every_process_to_stop_and_reports_their_status(fake_process):
  """Ctrl-C: SIGTERM to each process, whose own handler finishes (here: says so, exits 0)."""
  proc = _start(
    [LAUNCH / "local.sh", 2, "--", fake_process],
    FAIL_ID="none",
    SLEEP="30",
    ON_TERM='sleep 1; echo "process saved"; exit 0',
  )
  time.sleep(2)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=20)
  assert proc.returncode == 0, err
  assert "asking every process to save and stop" in err
  lines = out.splitlines()
  assert "[0] process saved" in lines and "[1] process saved" in lines  # waited for, output kept


def test_local_sh_second_interrupt_kills_the_processes(fake_process):
  proc = _start([LAUNCH / "local.sh", 2, "--", fake_process], FAIL_ID="none", SLEEP="30", ON_TERM=":")
  time.sleep(2)
  proc.send_signal(signal.SIGINT)
  time.sleep(1)
  start = time.monotonic()
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=20)
  assert proc.returncode == 130 and "interrupted again: killing the processes" in err
  assert time.monotonic() - start < 5


def test_local_sh_explains_its_usage():
  result = _run([LAUNCH / "local.sh", "two", "--", "true"])
  assert result.returncode == 2 and "usage: " in result.stderr


def _local_sh_train(root, workdir, steps) -> list:
  """launch/local.sh running the micro training job in two processes."""
  args = with_shared_cache(train_args(root, workdir, steps=steps))
  return [LAUNCH / "local.sh", 2, "--", sys.executable, "-m", "bertjax", *args]


def test_local_sh_trains_with_two_processes_what_one_process_of_four_devices_trains(tmp_path, corpus_and_tokenizer):
  command = _local_sh_train(corpus_and_tokenizer, tmp_path / "two", steps=4)
  result = _run(command, timeout=300, LOCAL_DEVICES="2")
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
  lines = result.stdout.splitlines()
  assert all(line.startswith(("[0] ", "[1] ")) for line in lines), lines[:5]
  assert any(line.startswith("[0] held-out MLM accuracy") for line in lines)  # process 0 reports
  assert not any(line.startswith("[1] held-out MLM accuracy") for line in lines)
  train = [r for r in metrics.read_metrics(tmp_path / "two") if r["split"] == "train"]
  assert [r["step"] for r in train] == [1, 2, 3, 4]

  one = launch(train_args(corpus_and_tokenizer, tmp_path / "one", steps=4), devices=4)
  out, _ = one.communicate(timeout=300)
  assert one.returncode == 0, out[-3000:]
  # The same global batches, split over two processes: the same losses up to the all-reduce's order.
  np.testing.assert_allclose(train_losses(tmp_path / "two"), train_losses(tmp_path / "one"), rtol=1e-5)


def test_local_sh_interrupted_saves_one_step_on_every_process_and_exits_0(tmp_path, corpus_and_tokenizer):
  command = _local_sh_train(corpus_and_tokenizer, tmp_path / "run", steps=200)
  proc = _start(command, LOCAL_DEVICES="2")
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.replace("|", " ").split()[:3] == ["[0]", "step", "10/200"]:
      proc.send_signal(signal.SIGINT)  # what Ctrl-C sends: job control keeps it from the processes
      break
  out, err = proc.communicate(timeout=300)
  out = "".join(lines) + out
  assert proc.returncode == 0, out[-3000:] + err[-2000:]
  assert "[0] stopped by a preemption signal to the job after step " in out, out[-3000:]
  stopped_at = int(out.split("after step ")[1].split(":")[0])
  assert 10 <= stopped_at < 200
  with checkpoint.Checkpoints(tmp_path / "run", read_only=True) as ckpts:
    assert ckpts.good_steps() == [stopped_at]


# -- launch/slurm_gpu.sbatch and launch/slurm_submit.sh --


def test_slurm_submit_dry_run_prints_the_exact_commands():
  result = _run(
    [
      LAUNCH / "slurm_submit.sh",
      "--nodes",
      8,
      "--gpus-per-node",
      8,
      "--partition",
      "gpu",
      "--time",
      "2-00:00:00",
      "--dry-run",
      "--",
      "bertjax",
      "train",
      "--config",
      "configs/large.py",
      "--workdir",
      "/shared/runs/large",
      "--config.data.source=files:/shared/text/*.txt",
    ]
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
    "mkdir -p /shared/runs/large/slurm",
    "sbatch --nodes=8 --ntasks-per-node=8 --gpus-per-node=8 --output=/shared/runs/large/slurm/%x-%j.out "
    f"--partition=gpu --time=2-00:00:00 {LAUNCH}/slurm_gpu.sbatch bertjax train --config configs/large.py "
    "--workdir /shared/runs/large '--config.data.source=files:/shared/text/*.txt'",
  ]


def test_slurm_submit_needs_a_workdir_and_sizes():
  result = _run(
    [
      LAUNCH / "slurm_submit.sh",
      "--nodes",
      2,
      "--gpus-per-node",
      8,
      "--dry-run",
      "--",
      "bertjax",
      "train",
      "--config",
      "configs/base.py",
    ]
  )
  assert result.returncode == 2 and "the command has no --workdir" in result.stderr
  result = _run([LAUNCH / "slurm_submit.sh", "--nodes", 2, "--dry-run", "--", "bertjax", "train"])
  assert result.returncode == 2 and "give --nodes N and --gpus-per-node G" in result.stderr


def test_the_sbatch_script_runs_one_srun_step_of_the_command():
  result = _run(
    [
      LAUNCH / "slurm_gpu.sbatch",
      "bertjax",
      "train",
      "--config",
      "configs/large.py",
      "--workdir",
      "/shared/runs/large",
    ],
    BERTJAX_DRY_RUN="1",
  )
  assert result.returncode == 0, result.stderr
  assert (
    result.stdout == "srun --kill-on-bad-exit=1 bertjax train --config configs/large.py --workdir /shared/runs/large\n"
  )
  header = (LAUNCH / "slurm_gpu.sbatch").read_text()
  for directive in ("#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@300"):
    assert directive in header


FAKE_SRUN = """#!/usr/bin/env bash
# SLURM's environment for task 1 of 2; task 0, which hosts the coordinator, never starts.
while [[ $1 == --* ]]; do shift; done
SLURM_PROCID=1 SLURM_LOCALID=0 SLURM_NTASKS=2 SLURM_STEP_NODELIST=localhost SLURM_STEP_NUM_NODES=1 exec "$@"
"""


def _slurm_job_id_with_a_free_port() -> int:
  """A job id whose coordinator port (JAX: 61440 + id % 4096) nothing listens on."""
  with socket.socket() as s:
    for job_id in range(1000, 5096):
      try:
        s.bind(("localhost", 61440 + job_id % 4096))
        return job_id
      except OSError:
        continue
  pytest.skip("no free port in JAX's SLURM coordinator range")


def test_a_slurm_process_that_cannot_reach_the_coordinator_fails_in_time(tmp_path, corpus_and_tokenizer):
  fake_bin = tmp_path / "bin"
  fake_bin.mkdir()
  (fake_bin / "srun").write_text(FAKE_SRUN)
  (fake_bin / "srun").chmod(0o755)
  command = [
    LAUNCH / "slurm_gpu.sbatch",
    sys.executable,
    "-m",
    "bertjax",
    *train_args(corpus_and_tokenizer, tmp_path / "run", steps=2),
    "--config.train.distributed_timeout_s=3",
  ]
  start = time.monotonic()
  result = _run(
    command, timeout=120, PATH=f"{fake_bin}:{os.environ['PATH']}", SLURM_JOB_ID=str(_slurm_job_id_with_a_free_port())
  )
  assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
  assert "could not join the job at the slurm coordinator within 3 s (train.distributed_timeout_s)" in result.stderr
  assert time.monotonic() - start < 60


# -- launch/tpu_pod.sh --


def _tpu(*args, **env):
  return _run([LAUNCH / "tpu_pod.sh", "--dry-run", *args], TMPDIR="/tmp/t", **env)


TRAIN = [
  "--",
  "--config",
  "configs/large.py",
  "--workdir",
  "gs://bkt/runs/large",
  "--config.data.source=files:gs://bkt/text/*.txt",
]
INSTALL = (
  "'--command=rm -rf ~/bertjax && mkdir -p ~/bertjax && tar -xzf ~/bertjax-src.tar.gz -C ~/bertjax "
  '&& python3 -m pip install -q "jax[tpu]>=0.10,<0.13" -e ~/bertjax\''
)
START = (
  '\'--command=if [ -f ~/bertjax-train.pid ] && kill -0 "$(cat ~/bertjax-train.pid)" 2>/dev/null; then '
  'echo "bertjax is already training on $(hostname): launch/tpu_pod.sh stop first" >&2; exit 1; fi; '
  "cd ~/bertjax && BERTJAX_CLUSTER=tpu setsid nohup python3 -m bertjax train --config configs/large.py "
  "--workdir gs://bkt/runs/large '\\''--config.data.source=files:gs://bkt/text/*.txt'\\'' "
  ">> ~/bertjax-train.log 2>&1 < /dev/null & echo $! > ~/bertjax-train.pid'"
)
FOLLOW = "'--command=tail -n 100 -F --pid=\"$(cat ~/bertjax-train.pid)\" ~/bertjax-train.log'"
# The source tree travels as the files git tracks, packed into a private temporary file.
PACK = [
  "tarball=$(mktemp /tmp/t/bertjax-src.XXXXXX)",
  "trap 'rm -f -- \"$tarball\"' EXIT",
  f'git -C {REPO} ls-files -z --recurse-submodules | tar -czf "$tarball" -C {REPO} --null -T -',
]
REMOVE = 'rm -f -- "$tarball"'


def test_tpu_train_on_a_v5p_128_prints_every_command():
  result = _tpu("--name", "bert", "--zone", "us-east5-a", "--type", "v5p-128", "--project", "proj", "train", *TRAIN)
  assert result.returncode == 0, result.stderr
  z = "--zone=us-east5-a --project=proj"
  assert result.stdout.splitlines() == [
    f"gcloud compute tpus tpu-vm describe bert {z}",
    "# (assuming it does not exist yet)",
    f"gcloud compute tpus tpu-vm create bert --accelerator-type=v5p-128 --version=v2-alpha-tpuv5 {z}",
    *PACK,
    f'gcloud compute tpus tpu-vm scp "$tarball" bert:bertjax-src.tar.gz --worker=all {z}',
    REMOVE,
    f"gcloud compute tpus tpu-vm ssh bert --worker=all {INSTALL} {z}",
    f"gcloud compute tpus tpu-vm ssh bert --worker=all {START} {z}",
    "# worker 0's log (Ctrl-C stops following, not training):",
    f"gcloud compute tpus tpu-vm ssh bert --worker=0 {FOLLOW} {z}",
  ]


def test_tpu_multislice_goes_through_one_queued_resource():
  result = _tpu("--name", "bert", "--zone", "us-east5-a", "--type", "v5p-128", "--slices", 2, "--spot", "train", *TRAIN)
  assert result.returncode == 0, result.stderr
  z = "--zone=us-east5-a"
  assert result.stdout.splitlines() == [
    f"gcloud compute tpus queued-resources describe bert {z}",
    "# (assuming it does not exist yet)",
    "gcloud compute tpus queued-resources create bert --accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 "
    f"--node-count=2 --node-prefix=bert --spot {z}",
    "# every 60 s until the state is ACTIVE:",
    f"gcloud compute tpus queued-resources describe bert '--format=value(state.state)' {z}",
    *PACK,
    f'gcloud compute tpus tpu-vm scp "$tarball" bert-0:bertjax-src.tar.gz --worker=all {z}',
    f'gcloud compute tpus tpu-vm scp "$tarball" bert-1:bertjax-src.tar.gz --worker=all {z}',
    REMOVE,
    f"gcloud compute tpus tpu-vm ssh bert-0 --worker=all {INSTALL} {z}",
    f"gcloud compute tpus tpu-vm ssh bert-1 --worker=all {INSTALL} {z}",
    f"gcloud compute tpus tpu-vm ssh bert-0 --worker=all {START} {z}",
    f"gcloud compute tpus tpu-vm ssh bert-1 --worker=all {START} {z}",
    "# worker 0's log (Ctrl-C stops following, not training):",
    f"gcloud compute tpus tpu-vm ssh bert-0 --worker=0 {FOLLOW} {z}",
  ]


@pytest.mark.parametrize(
  "args, lines",
  [
    (["--queued", "delete"], ["gcloud compute tpus queued-resources delete bert --force --quiet --zone=z"]),
    (["delete"], ["gcloud compute tpus tpu-vm delete bert --quiet --zone=z"]),
    (
      ["stop"],
      [
        "gcloud compute tpus tpu-vm ssh bert --worker=all '--command=for pid in ~/bertjax-train.pid "
        '~/bertjax-prepare.pid; do [ -f "$pid" ] && kill -TERM "$(cat "$pid")"; done; true\' --zone=z'
      ],
    ),
    (
      ["--type", "v5litepod-16", "--queued", "create"],
      [
        "gcloud compute tpus queued-resources describe bert --zone=z",
        "# (assuming it does not exist yet)",
        "gcloud compute tpus queued-resources create bert --accelerator-type=v5litepod-16 "
        "--runtime-version=v2-alpha-tpuv5-lite --node-id=bert --zone=z",
        "# every 60 s until the state is ACTIVE:",
        "gcloud compute tpus queued-resources describe bert '--format=value(state.state)' --zone=z",
      ],
    ),
  ],
)
def test_tpu_subcommands_print_their_commands(args, lines):
  result = _tpu("--name", "bert", "--zone", "z", *args)
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == lines


@pytest.mark.parametrize(
  "args, message",
  [
    (["train", "--", "--config", "configs/large.py", "--workdir", "runs/large"], "give --workdir gs://BUCKET/RUN"),
    (["--type", "v9-8", "create"], "--type v9-8: no default TPU software version known; give --version"),
    (["--slices", "0", "create"], "--slices 0: give a number of slices"),
    (["launch"], "unknown argument launch"),
  ],
)
def test_tpu_mistakes_fail_before_any_command(args, message):
  result = _tpu("--name", "bert", "--zone", "z", *args)
  assert result.returncode == 2 and message in result.stderr
  assert "gcloud" not in result.stdout
