#!/usr/bin/env bash
# Pretrain on a Cloud TPU VM slice (or several, multislice): create or reuse the slice, install
# this source tree on every worker, run `bertjax train` on all workers at once, follow worker 0.
# Hardware and placement only: hyperparameters stay in configs/ and --config.KEY=VALUE.
#
# Usage: launch/tpu_pod.sh --name NAME --zone ZONE [OPTIONS] COMMAND [-- TRAIN_ARGS...]
#
#   launch/tpu_pod.sh --name bert-large --zone us-east5-a --type v5p-128 --queued \
#       train -- --config configs/large.py --workdir gs://BUCKET/runs/large
#
# Tokenise the corpus once, every worker a share, then train from it:
#
#   launch/tpu_pod.sh --name bert-large --zone us-east5-a --type v5p-128 --queued \
#       prepare -- --config configs/large.py --out gs://BUCKET/prepared/wiki --workers 32
#   launch/tpu_pod.sh ... train -- --config configs/large.py --workdir gs://BUCKET/runs/large \
#       --config.data.source=prepared:gs://BUCKET/prepared/wiki
#
# Commands:
#   train    create (or reuse) the slice, install, start training on every worker in the
#            background (it survives a dropped connection), then follow worker 0's log
#   create   create (or reuse) the slice only
#   install  copy this source tree (its tracked files, below) to every worker and
#            pip-install it there
#   prepare  create (or reuse) the slice, install, start `bertjax data prepare` on every worker in
#            the background, each process I of N (its number on the slice, from the TPU VM's
#            metadata), then follow worker 0's log; the same command again finishes one that stopped
#   logs     follow worker 0's training log
#   stop     SIGTERM the training (and a prepare) on every worker: a training saves a checkpoint
#            and exits; a prepare stops, and the same `prepare` command finishes it
#   delete   delete the slice (and its queued resource)
#
# Options:
#   --name NAME       the TPU VM, or the queued resource (multislice nodes are NAME-0, NAME-1, ...)
#   --zone ZONE       e.g. us-east5-a
#   --type TYPE       accelerator type, e.g. v5p-128 (64 chips), v5litepod-64, v6e-256, v4-128
#   --version V       TPU software version (default: chosen from --type)
#   --project P       Google Cloud project (default: gcloud's)
#   --queued          create through a queued resource (waits for capacity; needed for multislice)
#   --spot            spot capacity: cheaper, preemptible (resume is automatic, see docs/scaling.md)
#   --slices N        multislice: N slices of --type in one queued resource; set
#                     --config.mesh.dcn_data=N so that only data parallelism crosses slices
#   --source DIR      the bertjax source tree to install, a git checkout (default: the one
#                     holding this script)
#   --include PATH    also install PATH, a file or folder inside --source that git does not track
#                     (relative to --source); repeatable
#   --dry-run         print every command instead of running it
#   -h, --help        print this text
#
# What install (and train) copies: the files `git ls-files` lists in --source (with those of
# its submodules), as they are in the working tree, uncommitted edits included, plus each
# --include. Untracked and ignored files (data, runs, virtualenvs, credentials) stay here.
# --source must therefore be a git checkout; a tracked file deleted from the working tree
# without `git rm` stops the launch before any command runs. The tarball is a private
# temporary file (mktemp, in $TMPDIR or /tmp), removed once copied, or when this script exits.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REMOTE_TARBALL=bertjax-src.tar.gz
# Expanded when the trap runs (or by the shell that runs the printed commands), not here.
# shellcheck disable=SC2016
TARBALL_VARIABLE='$tarball' REMOVE_TARBALL='rm -f -- "$tarball"'
# Paths on the workers: the tilde is expanded by the workers' shells, not here.
# shellcheck disable=SC2088
TRAIN_LOG='~/bertjax-train.log'
# shellcheck disable=SC2088
TRAIN_PID='~/bertjax-train.pid'
# shellcheck disable=SC2088
PREPARE_LOG='~/bertjax-prepare.log'
# shellcheck disable=SC2088
PREPARE_PID='~/bertjax-prepare.pid'
# The TPU VM's metadata, read on a worker: its number on its slice, and the slice's workers.
# shellcheck disable=SC2016
WORKER_METADATA='md() { curl -sf -H Metadata-Flavor:Google "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"; }; '
# shellcheck disable=SC2016
WORKER_METADATA+='worker=$(md agent-worker-number) && workers=$(md worker-network-endpoints | tr , "\n" | grep -c .) || exit 1'

die() {
  echo "launch/tpu_pod.sh: $*" >&2
  exit 2
}

# The usage text lives in the comment block at the top of this file; --help prints it.
# shellcheck source-path=SCRIPTDIR source=usage.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/usage.sh"

# Checked with the script when both are given to shellcheck (`shellcheck launch/*`); a run on
# this file alone has nothing to report about a file it was not asked to read.
# shellcheck source-path=SCRIPTDIR source=shell_quote.sh disable=SC1091
source "$SCRIPT_DIR/shell_quote.sh"

# A remark for the user: with the commands on stdout under --dry-run, else on stderr.
note() {
  if [[ $dry_run == 1 ]]; then echo "# $*"; else echo "$*" >&2; fi
}

# The shell line that runs a command. mktemp names the tarball only when the commands run, so
# under --dry-run it is "$tarball", the variable that the printed mktemp line sets.
command_line() {
  local line
  line=$(shell_quote "$@")
  echo "${line//"'$TARBALL_VARIABLE'"/\"$TARBALL_VARIABLE\"}"
}

# Run a command, or print it under --dry-run.
run() {
  if [[ $dry_run == 1 ]]; then
    command_line "$@"
  else
    "$@"
  fi
}

gcloud_tpu() {
  run gcloud compute tpus "$@" "--zone=$zone" ${project:+"--project=$project"}
}

default_version() {
  case $accelerator_type in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "--type $accelerator_type: no default TPU software version known; give --version" ;;
  esac
}

nodes() {
  if ((slices > 1)); then
    local i
    for ((i = 0; i < slices; i++)); do echo "$name-$i"; done
  else
    echo "$name"
  fi
}

# True when the slice (or queued resource) already exists; under --dry-run, print the check
# and assume it does not.
exists() {
  if [[ $dry_run == 1 ]]; then
    gcloud_tpu "$@" describe "$name"
    note "(assuming it does not exist yet)"
    return 1
  fi
  gcloud_tpu "$@" describe "$name" >/dev/null 2>&1
}

create() {
  if [[ $queued == 0 ]]; then
    if exists tpu-vm; then
      note "reusing TPU VM $name"
      return
    fi
    gcloud_tpu tpu-vm create "$name" "--accelerator-type=$accelerator_type" "--version=$version" \
      ${spot:+--spot}
    return
  fi
  if exists queued-resources; then
    note "reusing queued resource $name"
  else
    local placement=("--node-id=$name")
    ((slices > 1)) && placement=("--node-count=$slices" "--node-prefix=$name")
    gcloud_tpu queued-resources create "$name" "--accelerator-type=$accelerator_type" \
      "--runtime-version=$version" "${placement[@]}" ${spot:+--spot}
  fi
  wait_until_active
}

wait_until_active() {
  if [[ $dry_run == 1 ]]; then
    note "every 60 s until the state is ACTIVE:"
    gcloud_tpu queued-resources describe "$name" "--format=value(state.state)"
    return
  fi
  local state
  while true; do
    state=$(gcloud_tpu queued-resources describe "$name" "--format=value(state.state)")
    case $state in
      ACTIVE) return ;;
      FAILED | SUSPENDED) die "queued resource $name is $state; see gcloud compute tpus queued-resources describe $name" ;;
      *) note "queued resource $name is $state; waiting" && sleep 60 ;;
    esac
  done
}

# Every worker of every slice runs $1, with @SLICE@ in it replaced by the slice's index; slices in
# parallel, the first failure fails the launch.
on_all_workers() {
  local node pids=() pid index=0
  for node in $(nodes); do
    if [[ $dry_run == 1 ]]; then
      gcloud_tpu tpu-vm ssh "$node" --worker=all "--command=${1//@SLICE@/$index}"
    else
      gcloud_tpu tpu-vm ssh "$node" --worker=all "--command=${1//@SLICE@/$index}" &
      pids+=("$!")
    fi
    index=$((index + 1))
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
}

# Stops the launch before any command when --source cannot be shipped as documented at the top.
check_source() {
  local git_says path tracked=0 missing=()
  git_says=$(git -C "$source_dir" rev-parse --is-inside-work-tree 2>&1) || true
  [[ $git_says == true ]] || die "--source $source_dir is not a git checkout (${git_says#fatal: }); \
install ships the files git tracks there (see launch/tpu_pod.sh --help)"
  while IFS= read -r -d '' path; do
    tracked=$((tracked + 1))
    [[ -e $source_dir/$path || -L $source_dir/$path ]] || missing+=("$path")
  done < <(git -C "$source_dir" ls-files -z --recurse-submodules)
  ((tracked > 0)) || die "--source $source_dir: git tracks no files there"
  if ((${#missing[@]} > 0)); then
    local more=""
    ((${#missing[@]} == 1)) || more=" and $((${#missing[@]} - 1)) more"
    die "--source $source_dir: git tracks ${missing[0]}$more, deleted from the working tree: \
git rm what you deleted, or restore it with git checkout -- PATH"
  fi
  ((${#includes[@]} > 0)) || return 0  # bash before 4.4 takes "${includes[@]}" of none as unset
  for path in "${includes[@]}"; do
    [[ $path != /* && /$path/ != */../* ]] || die "--include $path: give a path inside --source, relative to it"
    [[ -e $source_dir/$path || -L $source_dir/$path ]] || die "--include $path: no such file or folder in $source_dir"
  done
}

# The tarball: a private file (mktemp makes it mode 600, under a name nobody can guess or
# pre-create), removed when this script exits, also on an error, Ctrl-C or SIGTERM.
make_tarball() {
  local template="${TMPDIR:-/tmp}/bertjax-src.XXXXXX"
  if [[ $dry_run == 1 ]]; then
    echo "tarball=\$(mktemp $(shell_quote "$template"))"
    echo "trap $(shell_quote "$REMOVE_TARBALL") EXIT"
    tarball=$TARBALL_VARIABLE
  else
    tarball=$(mktemp "$template")
    # shellcheck disable=SC2064  # expands to the command text now; $tarball in it at exit
    trap "$REMOVE_TARBALL" EXIT
  fi
  # git lists the tracked files, tar reads them from the working tree. NUL-separated names
  # (--null also makes GNU tar take a name that starts with "-" as a name); "--" before the
  # --include paths, for the same reason.
  local list=(git -C "$source_dir" ls-files -z --recurse-submodules)
  local archive=(tar -czf "$tarball" -C "$source_dir" --null -T -)
  ((${#includes[@]} == 0)) || archive+=(-- "${includes[@]}")
  if [[ $dry_run == 1 ]]; then
    echo "$(command_line "${list[@]}") | $(command_line "${archive[@]}")"
  else
    "${list[@]}" | "${archive[@]}"
  fi
}

install() {
  # One tarball for every worker: all hosts run the same code (a mismatch fails in odd ways).
  local node
  make_tarball
  for node in $(nodes); do
    gcloud_tpu tpu-vm scp "$tarball" "$node:$REMOTE_TARBALL" --worker=all
  done
  run rm -f -- "$tarball"  # copied: no need to keep it while training runs
  on_all_workers "rm -rf ~/bertjax && mkdir -p ~/bertjax && tar -xzf ~/$REMOTE_TARBALL -C ~/bertjax \
&& python3 -m pip install -q \"jax[tpu]>=0.10,<0.13\" -e ~/bertjax"
}

start_training() {
  local train_args
  train_args=$(shell_quote "$@")
  # BERTJAX_CLUSTER=tpu: this process is one of a TPU pod's; JAX reads the topology (and, for
  # multislice, the slices) from the TPU VM's metadata.
  on_all_workers "if [ -f $TRAIN_PID ] && kill -0 \"\$(cat $TRAIN_PID)\" 2>/dev/null; then \
echo \"bertjax is already training on \$(hostname): launch/tpu_pod.sh stop first\" >&2; exit 1; fi; \
cd ~/bertjax && BERTJAX_CLUSTER=tpu setsid nohup python3 -m bertjax train $train_args \
>> $TRAIN_LOG 2>&1 < /dev/null & echo \$! > $TRAIN_PID"
}

# Every worker prepares its share of the corpus: process slice x workers + worker of slices x workers.
start_prepare() {
  local prepare_args
  prepare_args=$(shell_quote "$@")
  on_all_workers "if [ -f $PREPARE_PID ] && kill -0 \"\$(cat $PREPARE_PID)\" 2>/dev/null; then \
echo \"bertjax is already preparing on \$(hostname): let it finish (its log: ~/bertjax-prepare.log)\" >&2; exit 1; fi; \
$WORKER_METADATA; cd ~/bertjax && setsid nohup python3 -m bertjax data prepare $prepare_args \
--process_id \$((@SLICE@ * workers + worker)) --num_processes \$(($slices * workers)) \
>> $PREPARE_LOG 2>&1 < /dev/null & echo \$! > $PREPARE_PID"
}

# Follow worker 0's log: $1 the log, $2 the file with the process id, $3 what it does.
follow_logs() {
  local first_node
  first_node=$(nodes | head -n 1)
  note "worker 0's log (Ctrl-C stops following, not $3):"
  gcloud_tpu tpu-vm ssh "$first_node" --worker=0 \
    "--command=tail -n 100 -F --pid=\"\$(cat $2)\" $1"
}

# True when the arguments give flag $1 a gs:// value.
on_gcs() {
  local flag=$1 previous="" arg
  shift
  for arg in "$@"; do
    if [[ $arg == "$flag"=gs://* || ($previous == "$flag" && $arg == gs://*) ]]; then
      return
    fi
    previous=$arg
  done
  return 1
}

check_workdir() {
  on_gcs --workdir "$@" || die "train: give --workdir gs://BUCKET/RUN after --: a pod's workers share no disk, \
every one reads and writes the run there"
}

check_out() {
  on_gcs --out "$@" || die "prepare: give --out gs://BUCKET/DIR after --: a pod's workers share no disk, \
every one writes its shards there"
  local arg
  for arg in "$@"; do
    [[ $arg != --process_id* && $arg != --num_processes* ]] ||
      die "prepare: leave out ${arg%%=*}: every worker's comes from the slice"
  done
}

delete() {
  if [[ $queued == 1 ]]; then
    gcloud_tpu queued-resources delete "$name" --force --quiet
  else
    gcloud_tpu tpu-vm delete "$name" --quiet
  fi
}

name="" zone="" accelerator_type="" version="" project="" queued=0 spot="" slices=1 dry_run=0
source_dir=$(dirname "$SCRIPT_DIR") includes=()
command=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --type) accelerator_type=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --slices) slices=$2; shift 2 ;;
    --source) source_dir=$2; shift 2 ;;
    --include) includes+=("$2"); shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) print_help "${BASH_SOURCE[0]}"; exit 0 ;;
    --) shift; break ;;
    train | prepare | create | install | logs | stop | delete) command=$1; shift ;;
    *) die "unknown argument $1 (see launch/tpu_pod.sh --help)" ;;
  esac
done
[[ -n $command ]] || die "give a command: train, prepare, create, install, logs, stop or delete"
[[ -n $name && -n $zone ]] || die "give --name and --zone"
[[ $slices =~ ^[1-9][0-9]*$ ]] || die "--slices $slices: give a number of slices, 1 or more"
((slices == 1)) || queued=1  # multislice exists only through queued resources
[[ $command == train || $command == prepare || $# -eq 0 ]] || die "$command takes no arguments after --"
[[ $command != train ]] || check_workdir "$@"
[[ $command != prepare ]] || check_out "$@"
[[ $command != train && $command != prepare && $command != install ]] || check_source
if [[ $command == train || $command == prepare || $command == create ]]; then
  [[ -n $accelerator_type ]] || die "$command: give --type, e.g. --type v5p-128"
  version=${version:-$(default_version)} || exit 2  # its message is already on stderr
fi

case $command in
  train)
    create
    install
    start_training "$@"
    follow_logs "$TRAIN_LOG" "$TRAIN_PID" training
    ;;
  prepare)
    create
    install
    start_prepare "$@"
    follow_logs "$PREPARE_LOG" "$PREPARE_PID" preparing
    ;;
  create) create ;;
  install) install ;;
  logs) follow_logs "$TRAIN_LOG" "$TRAIN_PID" training ;;
  stop) on_all_workers "for pid in $TRAIN_PID $PREPARE_PID; do [ -f \"\$pid\" ] && kill -TERM \"\$(cat \"\$pid\")\"; done; true" ;;
  delete) delete ;;
esac
