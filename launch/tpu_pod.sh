#!/usr/bin/env bash
# Pretrain on a Cloud TPU VM slice (or several, multislice): create or reuse the slice, install
# this source tree on every worker, run `bertjax train` on all workers at once, follow worker 0.
# Hardware and placement only: hyperparameters stay in configs/ and --config.KEY=VALUE.
#
#   launch/tpu_pod.sh --name bert-large --zone us-east5-a --type v5p-128 --queued \
#       train -- --config configs/large.py --workdir gs://BUCKET/runs/large
#
# Commands:
#   train    create (or reuse) the slice, install, start training on every worker in the
#            background (it survives a dropped connection), then follow worker 0's log
#   create   create (or reuse) the slice only
#   install  copy this source tree to every worker and pip-install it there
#   logs     follow worker 0's training log
#   stop     SIGTERM the training on every worker: bertjax saves a checkpoint and exits
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
#   --source DIR      the bertjax source tree to install (default: the one holding this script)
#   --dry-run         print every command instead of running it
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REMOTE_TARBALL=bertjax-src.tar.gz
# Paths on the workers: the tilde is expanded by the workers' shells, not here.
# shellcheck disable=SC2088
TRAIN_LOG='~/bertjax-train.log'
# shellcheck disable=SC2088
TRAIN_PID='~/bertjax-train.pid'

die() {
  echo "launch/tpu_pod.sh: $*" >&2
  exit 2
}

# shellcheck source-path=SCRIPTDIR source=shell_quote.sh
source "$SCRIPT_DIR/shell_quote.sh"

# A remark for the user: with the commands on stdout under --dry-run, else on stderr.
note() {
  if [[ $dry_run == 1 ]]; then echo "# $*"; else echo "$*" >&2; fi
}

# Run a command, or print it under --dry-run.
run() {
  if [[ $dry_run == 1 ]]; then
    shell_quote "$@"
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

# Every worker of every slice runs $1; slices in parallel, the first failure fails the launch.
on_all_workers() {
  local node pids=() pid
  for node in $(nodes); do
    if [[ $dry_run == 1 ]]; then
      gcloud_tpu tpu-vm ssh "$node" --worker=all "--command=$1"
    else
      gcloud_tpu tpu-vm ssh "$node" --worker=all "--command=$1" &
      pids+=("$!")
    fi
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
}

install() {
  # One tarball for every worker: all hosts run the same code (a mismatch fails in odd ways).
  local tarball node
  tarball="${TMPDIR:-/tmp}/bertjax-src-$name.tar.gz"
  run tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=runs --exclude=__pycache__ -C "$source_dir" .
  for node in $(nodes); do
    gcloud_tpu tpu-vm scp "$tarball" "$node:$REMOTE_TARBALL" --worker=all
  done
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

follow_logs() {
  local first_node
  first_node=$(nodes | head -n 1)
  note "worker 0's log (Ctrl-C stops following, not training):"
  gcloud_tpu tpu-vm ssh "$first_node" --worker=0 \
    "--command=tail -n 100 -F --pid=\"\$(cat $TRAIN_PID)\" $TRAIN_LOG"
}

check_workdir() {
  local previous="" arg
  for arg in "$@"; do
    if [[ $arg == --workdir=gs://* || ($previous == --workdir && $arg == gs://*) ]]; then
      return
    fi
    previous=$arg
  done
  die "train: give --workdir gs://BUCKET/RUN after --: a pod's workers share no disk, every one reads and writes the run there"
}

delete() {
  if [[ $queued == 1 ]]; then
    gcloud_tpu queued-resources delete "$name" --force --quiet
  else
    gcloud_tpu tpu-vm delete "$name" --quiet
  fi
}

name="" zone="" accelerator_type="" version="" project="" queued=0 spot="" slices=1 dry_run=0
source_dir=$(dirname "$SCRIPT_DIR")
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
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    train | create | install | logs | stop | delete) command=$1; shift ;;
    *) die "unknown argument $1 (see the top of $0 for usage)" ;;
  esac
done
[[ -n $command ]] || die "give a command: train, create, install, logs, stop or delete"
[[ -n $name && -n $zone ]] || die "give --name and --zone"
[[ $slices =~ ^[1-9][0-9]*$ ]] || die "--slices $slices: give a number of slices, 1 or more"
((slices == 1)) || queued=1  # multislice exists only through queued resources
[[ $command == train || $# -eq 0 ]] || die "$command takes no arguments after --"
[[ $command != train ]] || check_workdir "$@"
if [[ $command == train || $command == create ]]; then
  [[ -n $accelerator_type ]] || die "$command: give --type, e.g. --type v5p-128"
  version=${version:-$(default_version)} || exit 2  # its message is already on stderr
fi

case $command in
  train)
    create
    install
    start_training "$@"
    follow_logs
    ;;
  create) create ;;
  install) install ;;
  logs) follow_logs ;;
  stop) on_all_workers "kill -TERM \"\$(cat $TRAIN_PID)\"" ;;
  delete) delete ;;
esac
