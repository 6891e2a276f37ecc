#!/usr/bin/env bash
# Submit launch/slurm_gpu.sbatch sized for N nodes x G GPUs (one process per GPU).
#
# Usage: launch/slurm_submit.sh --nodes N --gpus-per-node G [OPTIONS] -- COMMAND [ARGS...]
#
#   launch/slurm_submit.sh --nodes 8 --gpus-per-node 8 --partition gpu --time 2-00:00:00 -- \
#       bertjax train --config configs/large.py --workdir /shared/runs/large
#
# Options:
#   --nodes N              nodes in the job
#   --gpus-per-node G      GPUs per node, one process each
#   --partition P, --account A, --time T, --job-name NAME
#                          passed to sbatch as --partition=P and so on
#   --dry-run              print the commands instead of running them
#   -h, --help             print this text
#
# The command needs a --workdir on storage every node shares. The job inherits this shell's
# environment (activate bertjax's virtualenv first). Its log is WORKDIR/slurm/bertjax-JOBID.out
# (./slurm-logs/ for a gs:// workdir), appended to on requeue.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() {
  echo "launch/slurm_submit.sh: $*" >&2
  exit 2
}

# The usage text lives in the comment block at the top of this file; --help prints it.
# shellcheck source-path=SCRIPTDIR source=usage.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/usage.sh"

# Checked with the script when both are given to shellcheck (`shellcheck launch/*`); a run on
# this file alone has nothing to report about a file it was not asked to read.
# shellcheck source-path=SCRIPTDIR source=shell_quote.sh disable=SC1091
source "$SCRIPT_DIR/shell_quote.sh"

run() {
  if [[ $dry_run == 1 ]]; then shell_quote "$@"; else "$@"; fi
}

workdir_of() {
  local previous="" arg
  for arg in "$@"; do
    if [[ $arg == --workdir=* ]]; then echo "${arg#--workdir=}"; return; fi
    if [[ $previous == --workdir ]]; then echo "$arg"; return; fi
    previous=$arg
  done
}

nodes="" gpus="" dry_run=0 extra=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --nodes) nodes=$2; shift 2 ;;
    --gpus-per-node) gpus=$2; shift 2 ;;
    --partition | --account | --time | --job-name) extra+=("$1=$2"); shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) print_help "${BASH_SOURCE[0]}"; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument $1 (see launch/slurm_submit.sh --help)" ;;
  esac
done
[[ $nodes =~ ^[1-9][0-9]*$ && $gpus =~ ^[1-9][0-9]*$ ]] || die "give --nodes N and --gpus-per-node G"
[[ $# -gt 0 ]] || die "give the command after --, e.g. -- bertjax train --config ... --workdir ..."
workdir=$(workdir_of "$@")
[[ -n $workdir ]] || die "the command has no --workdir: give one on storage every node shares"

log_dir="$workdir/slurm"
[[ $workdir == *://* ]] && log_dir=slurm-logs  # SLURM writes logs to a file system only
run mkdir -p "$log_dir"
run sbatch "--nodes=$nodes" "--ntasks-per-node=$gpus" "--gpus-per-node=$gpus" \
  "--output=$log_dir/%x-%j.out" "${extra[@]}" "$SCRIPT_DIR/slurm_gpu.sbatch" "$@"
