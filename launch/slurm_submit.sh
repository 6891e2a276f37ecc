#!/usr/bin/env bash
# Submit launch/slurm_gpu.sbatch sized for N nodes x G GPUs (one process per GPU).
#
# Usage: launch/slurm_submit.sh --nodes N --gpus-per-node G [OPTIONS] -- COMMAND [ARGS...]
#
#   launch/slurm_submit.sh --nodes 8 --gpus-per-node 8 --partition gpu --time 2-00:00:00 -- \
#       bertjax train --config configs/large.py --workdir /shared/runs/large
#
# Tokenise a corpus once, 4 nodes x 32 processes each taking a share, then train from it:
#
#   launch/slurm_submit.sh --nodes 4 --tasks-per-node 32 --partition cpu -- \
#       bertjax data prepare --config configs/large.py --out /shared/prepared/wiki
#   launch/slurm_submit.sh --nodes 8 --gpus-per-node 8 --partition gpu -- \
#       bertjax train --config configs/large.py --workdir /shared/runs/large \
#       --config.data.source=prepared:/shared/prepared/wiki
#
# Options:
#   --nodes N              nodes in the job
#   --gpus-per-node G      GPUs per node, one process each
#   --tasks-per-node T     instead of --gpus-per-node, for a command that uses no GPU
#                          (bertjax data prepare): T processes per node, no GPUs
#   --partition P, --account A, --time T, --job-name NAME
#                          passed to sbatch as --partition=P and so on
#   --dry-run              print the commands instead of running them
#   -h, --help             print this text
#
# The command needs a --workdir (bertjax data prepare: --out) on storage every node shares. The
# job inherits this shell's environment (activate bertjax's virtualenv first). Its log is
# WORKDIR/slurm/bertjax-JOBID.out (./slurm-logs/ for a gs:// workdir), appended to on requeue.
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

# The value of flag $1 in the command that follows it ("" when it has none).
flag_value() {
  local flag=$1 previous="" arg
  shift
  for arg in "$@"; do
    if [[ $arg == "$flag"=* ]]; then echo "${arg#"$flag"=}"; return; fi
    if [[ $previous == "$flag" ]]; then echo "$arg"; return; fi
    previous=$arg
  done
}

nodes="" gpus="" tasks="" dry_run=0 extra=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --nodes) nodes=$2; shift 2 ;;
    --gpus-per-node) gpus=$2; shift 2 ;;
    --tasks-per-node) tasks=$2; shift 2 ;;
    --partition | --account | --time | --job-name) extra+=("$1=$2"); shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) print_help "${BASH_SOURCE[0]}"; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument $1 (see launch/slurm_submit.sh --help)" ;;
  esac
done
[[ $nodes =~ ^[1-9][0-9]*$ && ($gpus =~ ^[1-9][0-9]*$ || $tasks =~ ^[1-9][0-9]*$) ]] ||
  die "give --nodes N and --gpus-per-node G (or --tasks-per-node T for a command without GPUs)"
[[ -z $gpus || -z $tasks ]] || die "give --gpus-per-node or --tasks-per-node, not both"
[[ $# -gt 0 ]] || die "give the command after --, e.g. -- bertjax train --config ... --workdir ..."
if [[ " $* " == *" data prepare "* ]]; then
  workdir=$(flag_value --out "$@")
  [[ -n $workdir ]] || die "the command has no --out: give one on storage every node shares"
else
  workdir=$(flag_value --workdir "$@")
  [[ -n $workdir ]] || die "the command has no --workdir: give one on storage every node shares"
fi
sizing=("--ntasks-per-node=$tasks")
[[ -n $tasks ]] || sizing=("--ntasks-per-node=$gpus" "--gpus-per-node=$gpus")

log_dir="$workdir/slurm"
[[ $workdir == *://* ]] && log_dir=slurm-logs  # SLURM writes logs to a file system only
run mkdir -p "$log_dir"
run sbatch "--nodes=$nodes" "${sizing[@]}" \
  "--output=$log_dir/%x-%j.out" "${extra[@]}" "$SCRIPT_DIR/slurm_gpu.sbatch" "$@"
