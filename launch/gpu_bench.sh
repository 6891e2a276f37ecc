#!/usr/bin/env bash
# bertjax's train step against transformers' BertForPreTraining on this machine's GPU, side by
# side: the same shapes, BERT's recipe (bf16 compute, dropout 0.1 on hidden states and on
# attention probabilities, vocabulary 30,522), in one call. Prints one JSON line per run and
# writes them to OUT/results.jsonl; docs/performance.md explains the figures.
#
# Usage: launch/gpu_bench.sh [--wheels DIR] [--out DIR] [--steps N] [--shapes LIST]
#                            [--variant 'NAME ARGS...']... [--peers LIST] [--no-compile]
#
#   launch/gpu_bench.sh --wheels .whl --out /tmp/bench
#   launch/gpu_bench.sh --variant default --variant 'fused --config.model.attention_impl=pallas'
#
# Options:
#   --wheels DIR     install the wheels in DIR first (pip --no-index, into a private folder on
#                    PYTHONPATH): for a machine without a package index that has JAX, Flax and
#                    PyTorch but lacks ml_collections or datasets. Never put JAX or Flax wheels
#                    there: the machine's own builds match its CUDA.
#   --out DIR        where results.jsonl and the runs' logs go (default: a new temporary folder)
#   --steps N        timed steps per run (default 20)
#   --shapes LIST    comma-separated SIZE:SEQ:BATCH (default base:128:256,large:512:32, the
#                    shapes of BERT-base phase 1 and BERT-large phase 2)
#   --variant 'NAME ARGS'  a bertjax run per shape named NAME with these extra bench arguments
#                    (--config.model.X=Y ...); repeatable, in order (default: one run, 'default')
#   --peers LIST     which peer runs per shape: eager,compiled (default), eager, compiled or none
#   --no-compile     the same as --peers eager
#   -h, --help       print this text
#
# Runs from the repository root with the machine's python3 (PYTHON=... picks another) and
# PYTHONPATH set to the checkout; nothing is installed into the machine's environment.
set -euo pipefail

die() {
  echo "launch/gpu_bench.sh: $*" >&2
  exit 2
}

# The usage text lives in the comment block at the top of this file; --help prints it.
# shellcheck source-path=SCRIPTDIR source=usage.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/usage.sh"

wheels="" out="" steps=20 shapes="base:128:256,large:512:32" peers="eager,compiled" variants=()
while [[ $# -gt 0 ]]; do
  case $1 in
    -h | --help) print_help "${BASH_SOURCE[0]}"; exit 0 ;;
    --wheels) [[ $# -ge 2 ]] || die "--wheels needs a folder (see launch/gpu_bench.sh --help)"; wheels=$2; shift 2 ;;
    --out) [[ $# -ge 2 ]] || die "--out needs a folder (see launch/gpu_bench.sh --help)"; out=$2; shift 2 ;;
    --steps) [[ $# -ge 2 && $2 =~ ^[1-9][0-9]*$ ]] || die "--steps needs a positive number (see launch/gpu_bench.sh --help)"
      steps=$2; shift 2 ;;
    --shapes) [[ $# -ge 2 ]] || die "--shapes needs SIZE:SEQ:BATCH,... (see launch/gpu_bench.sh --help)"; shapes=$2; shift 2 ;;
    --variant) [[ $# -ge 2 && -n $2 ]] || die "--variant needs 'NAME ARGS...' (see launch/gpu_bench.sh --help)"
      variants+=("$2"); shift 2 ;;
    --peers) [[ $# -ge 2 && $2 =~ ^(eager,compiled|compiled,eager|eager|compiled|none)$ ]] \
      || die "--peers needs eager,compiled, eager, compiled or none (see launch/gpu_bench.sh --help)"
      peers=$2; shift 2 ;;
    --no-compile) peers=eager; shift ;;
    *) die "unknown argument $1 (see launch/gpu_bench.sh --help)" ;;
  esac
done

[[ ${#variants[@]} -gt 0 ]] || variants=(default)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
out=${out:-$(mktemp -d "${TMPDIR:-/tmp}/bertjax-bench.XXXXXX")}
mkdir -p "$out"
cd "$repo"

site=""
if [[ -n $wheels ]]; then
  [[ -d $wheels ]] || die "--wheels $wheels is not a folder"
  shopt -s nullglob
  found=("$wheels"/*.whl)
  shopt -u nullglob
  [[ ${#found[@]} -gt 0 ]] || die "--wheels $wheels holds no .whl files"
  for wheel in "${found[@]}"; do
    case ${wheel##*/} in
      jax-* | jaxlib-* | flax-*) die "--wheels: $wheel would replace the machine's own JAX or Flax; remove it" ;;
    esac
  done
  site=$(mktemp -d "${TMPDIR:-/tmp}/bertjax-site.XXXXXX")
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${found[@]}"
fi
export PYTHONPATH="$repo${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"

# One JSON line per run goes to results.jsonl; everything else to the run's own log.
record() {
  local name=$1 log="$out/$1.log"
  shift
  if "$@" > "$log" 2>&1; then
    grep '^{' "$log" | tail -n 1 | tee -a "$out/results.jsonl"
  else
    echo "launch/gpu_bench.sh: $name failed; the end of $log:" >&2
    tail -n 20 "$log" >&2
    return 1
  fi
}

IFS=, read -r -a shape_list <<< "$shapes"
for shape in "${shape_list[@]}"; do
  IFS=: read -r size seq batch <<< "$shape"
  [[ $size =~ ^(tiny|mini|small|medium|base|large)$ && $seq =~ ^[0-9]+$ && $batch =~ ^[0-9]+$ ]] \
    || die "--shapes: $shape is not SIZE:SEQ:BATCH with SIZE one of tiny mini small medium base large"
  predictions=$(( seq >= 512 ? 80 : (seq * 15 + 99) / 100 ))
  for variant in "${variants[@]}"; do
    read -r -a variant_args <<< "$variant"
    name=${variant_args[0]}
    [[ $name =~ ^[A-Za-z0-9_.-]+$ ]] || die "--variant: the name $name may hold letters, digits, '.', '_' and '-' only"
    # A failed variant (say, one that does not fit) is reported; the others still run.
    record "bertjax-$name-$size-$seq" "$python" -m bertjax bench --config "configs/$size.py" --steps "$steps" \
      --config.data.seq_len="$seq" --config.data.max_predictions="$predictions" --config.train.batch_size="$batch" \
      --config.data.vocab_size=30522 --config.train.compilation_cache=off "${variant_args[@]:1}" || true
  done
  if [[ $peers == *eager* ]]; then
    record "peer-$size-$seq" "$python" benchmarks/peer_transformers.py "$size" "$seq" "$batch" --steps "$steps" || true
  fi
  if [[ $peers == *compiled* ]]; then
    record "peer-compiled-$size-$seq" "$python" benchmarks/peer_transformers.py "$size" "$seq" "$batch" \
      --steps "$steps" --compile || true
  fi
done
echo "launch/gpu_bench.sh: results in $out/results.jsonl" >&2
