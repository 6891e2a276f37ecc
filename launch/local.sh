#!/usr/bin/env bash
# Run N processes of one bertjax command on this machine, joined through a coordinator on
# localhost: a multi-host job in miniature (tests, debugging a pod launch on a laptop).
#
# Usage: launch/local.sh NUM_PROCESSES -- COMMAND [ARGS...]     (-h, --help: print this text)
#
#   launch/local.sh 2 -- bertjax train --config configs/tiny.py --workdir runs/mp
#
# Process i runs `COMMAND... --coordinator localhost:PORT --num_processes N --process_id i`.
# Every output line is prefixed with "[i] ". If any process fails, the others are stopped and
# the script exits with the failed process's status; otherwise it exits 0.
#
# Ctrl-C (or SIGTERM to this script) sends SIGTERM to every process and waits: `bertjax train`
# saves one step on all of them and exits 0, and so does this script; other commands just stop.
# A second Ctrl-C kills them unsaved (exit 130). When a process fails, a job can no longer save
# together: the others get SIGTERM, and SIGKILL after LOCAL_SH_GRACE seconds (default 10).
# Needs bash 5.1 or later (wait -n -p).
#
# Hardware and placement (environment):
#   LOCAL_DEVICES=K       K fake CPU devices per process (JAX_PLATFORMS=cpu)
#   GPUS_PER_PROCESS=G    process i sees GPUs i*G .. i*G+G-1 (CUDA_VISIBLE_DEVICES)
#   PORT=P                coordinator port (default: a free one)
#   PYTHON=python3        the interpreter used to find a free port
set -euo pipefail

# The usage text lives in the comment block at the top of this file; --help prints it.
# shellcheck source-path=SCRIPTDIR source=usage.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/usage.sh"

# A mistake in the arguments: one line on stderr, exit status 2.
usage_error() {
  echo "launch/local.sh: $* (see launch/local.sh --help)" >&2
  exit 2
}

# Before the bash version check: the help says which bash to install.
case ${1:-} in
  -h | --help) print_help "${BASH_SOURCE[0]}"; exit 0 ;;
  -*) usage_error "unknown argument $1" ;;
esac

if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
  echo "$0: needs bash 5.1 or later (this is $BASH_VERSION); on macOS: brew install bash" >&2
  exit 2
fi

free_port() {
  "${PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])'
}

# Per-process device placement, exported in the subshell that runs process $1.
place_devices() {
  local index=$1
  if [[ -n ${LOCAL_DEVICES:-} ]]; then
    export JAX_PLATFORMS=cpu
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${LOCAL_DEVICES}"
  fi
  if [[ -n ${GPUS_PER_PROCESS:-} ]]; then
    local first=$((index * GPUS_PER_PROCESS)) ids=() g
    for ((g = first; g < first + GPUS_PER_PROCESS; g++)); do ids+=("$g"); done
    CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${ids[*]}")
    export CUDA_VISIBLE_DEVICES
  fi
}

# "[i] " before every line, and after every carriage return (progress bars redraw with one).
prefix_lines() {
  trap '' TERM  # read the command's output to its end: on SIGTERM it saves, reports, then exits
  local line
  while IFS= read -r line || [[ -n $line ]]; do
    printf '[%s] %s\n' "$1" "${line//$'\r'/$'\r'"[$1] "}"
  done
}

run_process() {
  local index=$1
  shift
  place_devices "$index"
  # A caught (not ignored) TERM: this subshell outlives the stop request and waits for its
  # pipeline; the command itself starts with the default action, as handlers are not inherited.
  trap : TERM
  # Unbuffered Python output, so the prefixed lines of all processes interleave as they happen.
  PYTHONUNBUFFERED=1 "$@" --coordinator "localhost:${port}" --num_processes "$num_processes" \
    --process_id "$index" 2>&1 | prefix_lines "$index"
}

stop_all() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || true  # the process group: the command and its prefixer
  done
}

[[ $# -ge 3 && $1 =~ ^[1-9][0-9]*$ && $2 == "--" ]] ||
  usage_error "usage: launch/local.sh NUM_PROCESSES -- COMMAND [ARGS...]"
num_processes=$1
shift 2
port=${PORT:-$(free_port)}

# shellcheck disable=SC2329  # also called from on_interrupt, the trap below
kill_all() {
  local pid
  for pid in "${pids[@]}"; do
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
}

# SIGTERM to every process, then SIGKILL to what still runs after $1 seconds.
stop_within() {
  local deadline=$((SECONDS + $1))
  stop_all
  while [[ -n $(jobs -rp) ]] && ((SECONDS < deadline)); do
    sleep 0.2
  done
  if [[ -n $(jobs -rp) ]]; then
    echo "launch/local.sh: killing the processes still running after $1 s" >&2
    kill_all
  fi
}

stopping=0
# shellcheck disable=SC2329  # the INT/TERM trap
on_interrupt() {
  if ((stopping)); then
    echo "launch/local.sh: interrupted again: killing the processes without saving" >&2
    kill_all
    exit 130
  fi
  stopping=1
  echo "launch/local.sh: asking every process to save and stop (interrupt again to kill them)" >&2
  stop_all
}

# Job control gives every process its own process group, so stopping one stops its whole pipeline.
pids=()
trap on_interrupt INT TERM
set -m
for ((i = 0; i < num_processes; i++)); do
  run_process "$i" "$@" &
  pids+=("$!")
done
set +m  # groups made; without monitor mode bash prints no job notices ("Terminated") when stopping

status=0
left=$num_processes
while ((left > 0)); do
  if wait -n -p finished; then rc=0; else rc=$?; fi
  if [[ -z ${finished:-} ]]; then  # unset: no process finished
    ((rc != 127)) || break          # none is left to wait for
    ((rc > 128)) && continue        # a signal cut the wait short; its trap has run
    echo "launch/local.sh: wait failed with status $rc" >&2
    kill_all
    exit 1
  fi
  left=$((left - 1))
  if ((rc != 0)); then
    ((status != 0)) || status=$rc
    if ((left > 0)); then
      echo "launch/local.sh: a process exited with status $rc; stopping the others" >&2
      stopping=1
      stop_within "${LOCAL_SH_GRACE:-10}"
    fi
  fi
done
exit "$status"
