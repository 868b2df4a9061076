#!/usr/bin/env bash
# Run a detailflow_jax command on this machine: CPU or one GPU box, optionally as several localhost processes.
set -euo pipefail
# shellcheck source=launch/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'USAGE'
usage: launch/local.sh [options] [--] MODULE [ARGS...]

Runs `python -m MODULE ARGS` from the repository root on this machine (CPU, or a box with one or more GPUs: one
process owns all its GPUs).

options:
  --fake-devices N   simulate N CPU devices (JAX_PLATFORMS=cpu, --xla_force_host_platform_device_count=N), for
                     sharding smoke runs; default $FAKE_DEVICES
  --processes N      start N processes on 127.0.0.1 that form one JAX run (jax.distributed over a free port, gloo
                     collectives); needs --fake-devices (each process gets N fake devices). Default 1.
  --port P           coordinator port for --processes (default: a free one)
  --recipe NAME      export launch/recipes/NAME.env (XLA flags) and set config.mesh to mesh recipe NAME
  -h, --help         this text
environment: PYTHON (default: .venv/bin/python, else python3).

examples:
  launch/local.sh detailflow_jax.train.tokenizer --config configs/tokenizer_fashion_mnist.py --workdir workdir/tok
  launch/local.sh --fake-devices 8 detailflow_jax.train.tokenizer \
      --config configs/tokenizer_fashion_mnist.py:smoke --workdir workdir/smoke --config.mesh.fsdp=4
  launch/local.sh --processes 2 --fake-devices 4 detailflow_jax.train.tokenizer \
      --config configs/tokenizer_fashion_mnist.py:smoke --workdir workdir/smoke2 --config.mesh.fsdp=4
USAGE
}

fake_devices="${FAKE_DEVICES:-}"
processes=1
port=""
recipe=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --fake-devices) fake_devices="${2:-}"; shift 2 ;;
    --processes) processes="${2:-}"; shift 2 ;;
    --port) port="${2:-}"; shift 2 ;;
    --recipe) recipe="${2:-}"; shift 2 ;;
    --) shift; break ;;
    -*) die "unknown option $1" ;;
    *) break ;;
  esac
done
require "${1:-}" "missing MODULE, e.g. detailflow_jax.train.tokenizer"
[[ "$processes" =~ ^[1-9][0-9]*$ ]] || die "--processes must be a positive integer (got '$processes')"
if [[ -n "$fake_devices" ]]; then
  [[ "$fake_devices" =~ ^[1-9][0-9]*$ ]] || die "--fake-devices must be a positive integer (got '$fake_devices')"
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$fake_devices"
elif (( processes > 1 )); then
  die "--processes $processes needs --fake-devices: several processes on one machine would compete for its GPUs"
fi

py="$(python_bin)"
if [[ -n "$recipe" ]]; then
  load_recipe "$recipe"
fi
module="$1"
shift
with_mesh_flags "$py" "$@"
cd "$REPO_ROOT"

if (( processes == 1 )); then
  exec "$py" -m "$module" "${MODULE_ARGS[@]}"
fi

port="${port:-$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT TERM
for (( i = 0; i < processes; i++ )); do
  DETAILFLOW_COORDINATOR="127.0.0.1:$port" DETAILFLOW_NUM_PROCESSES="$processes" DETAILFLOW_PROCESS_ID="$i" \
    "$py" -m "$module" "${MODULE_ARGS[@]}" &
  pids+=("$!")
done
# The first failure stops the others (they would wait for the dead process until JAX's timeouts).
status=0
for (( i = 0; i < processes; i++ )); do
  if ! wait -n; then
    status=1
    stop_all
  fi
done
exit "$status"
