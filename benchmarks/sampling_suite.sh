#!/usr/bin/env bash
# Every sampling figure the README and issue 3 report, in one run; the JSON lines go to $1 (default
# sampling_suite.jsonl) and the tables to stdout. On a GPU/TPU it adds GPT-L bf16 at batch 1 (latency) and batch 256
# (throughput). Usage: bash benchmarks/sampling_suite.sh [out.jsonl]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-sampling_suite.jsonl}
python=${PYTHON:-.venv/bin/python}
: > "$out"
run() {
  echo "== benchmarks/sampling.py $*"
  "$python" benchmarks/sampling.py "$@" | tee /dev/stderr | tail -n 1 >> "$out"
}
run --variant GPT-B --num_tokens 128 --batch 4 --cfg_scale 1.5
run --variant GPT-B --num_tokens 512 --batch 1 --cfg_scale 1.5
if [ "$("$python" -c 'import jax; print(jax.default_backend())')" != cpu ]; then
  run --variant GPT-L --num_tokens 128 --batch 1 --cfg_scale 1.5 --dtype bf16
  run --variant GPT-L --num_tokens 128 --batch 256 --cfg_scale 1.5 --dtype bf16
fi
echo "JSON lines in $out"
