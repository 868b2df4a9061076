#!/usr/bin/env bash
# Issue 12's recipe x topology rows, compiled ahead of time: no accelerator needed (TPU rows need
# libtpu: pip install -e ".[tpu-aot]"). DF-16/32/64 tokenizers at batch 256 and GPT-L
# N = 128/256/512 at batch 256 and 512, each on v5e:2x4, v5e:16x16, v4 (64 chips) and v5p
# (64 chips) with that slice's mesh recipe. Measures only: rows that do not fit are reported, not
# fixed. Each row prints its table; the JSON lines go to $1 (default preflight_suite.jsonl) and a
# summary table ends the run. Each compile takes 1-3 minutes on 2 cores. Then the sampling rows on one v5e
# chip (below).
# Usage: bash benchmarks/preflight_suite.sh [out.jsonl]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-preflight_suite.jsonl}
python=${PYTHON:-.venv/bin/python}
: > "$out"
# topology = mesh recipe of configs/common.py
slices=("v5e:2x4=v5e-8" "v5e:16x16=v5e-256" "v4:4x4x4=v4-128" "v5p:4x4x4=v5p-128")
rows=()
for df in DF-16 DF-32 DF-64; do
  rows+=("configs/tokenizer_imagenet.py:$df --config.batch_size=256")
done
for n in 128 256 512; do
  for batch in 256 512; do rows+=("configs/ar_imagenet.py:N=$n,batch=$batch"); done
done
for slice in "${slices[@]}"; do
  for row in "${rows[@]}"; do
    read -r config flags <<< "$row"
    echo "== $config $flags on ${slice%%=*} (recipe ${slice##*=})"
    # shellcheck disable=SC2086  # flags is a list of words
    "$python" -m detailflow_jax.preflight --config "$config" $flags --topology "${slice%%=*}" \
      --recipe "${slice##*=}" 2>/dev/null | tee /dev/stderr | tail -n 1 | grep '^{' >> "$out"
  done
done
# Sampling on one v5e chip (the FID batch 256 and batch 1): the KV-cache sampler, the no-cache reference (its
# fixed-length step x the steps) and the DF-16 decoder; mesh (1, 1, 1).
sampling=()
for n in 128 512; do
  for batch in 1 256; do
    for program in sample sample_reference; do
      sampling+=("configs/ar_imagenet.py:N=$n $program $batch")
    done
  done
done
sampling+=("configs/tokenizer_imagenet.py:DF-16 decode 1" "configs/tokenizer_imagenet.py:DF-16 decode 256")
for row in "${sampling[@]}"; do
  read -r config program batch <<< "$row"
  echo "== $config --program $program at batch $batch on v5e:1x1"
  "$python" -m detailflow_jax.preflight --config "$config" --program "$program" --topology v5e:1x1 \
    --config.batch_size="$batch" 2>/dev/null | tee /dev/stderr | tail -n 1 | grep '^{' >> "$out"
done
"$python" - "$out" <<'PY'
import json, sys
print(f"{'topology':12s} {'program':16s} {'mesh':>10s} {'batch':>5s} {'peak GiB':>8s} {'HBM':>5s} fits "
      f" {'step ms':>8s} {'MFU':>6s} {'ex/s':>8s}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    mesh = "x".join(str(v) for v in r["mesh"].values())
    peak = r.get("peak_bytes_per_chip", float("nan")) / 2 ** 30
    step, mfu = r.get("roofline_step_s", float("nan")) * 1e3, r.get("roofline_mfu", float("nan"))
    hbm = r["hbm_bytes_per_chip"] / 2 ** 30
    rate = r.get("roofline_examples_per_s", float("nan"))
    print(f"{r['topology']:12s} {r.get('program', 'train'):16s} {mesh:>10s} {r['global_batch']:5d} {peak:8.2f}"
          f" {hbm:5.0f} {str(r['fits']):5s} {step:8.1f} {mfu:6.1%} {rate:8.4g}")
PY
echo "JSON lines in $out"
