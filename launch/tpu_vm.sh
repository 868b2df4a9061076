#!/usr/bin/env bash
# Cloud TPU VM pods through gcloud: create, copy the code, install, run on all workers, logs, stop, delete.
set -euo pipefail
# shellcheck source=launch/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'USAGE'
usage: launch/tpu_vm.sh COMMAND [options] [-- MODULE ARGS...]

commands:
  create    create the TPU VM (gcloud compute tpus tpu-vm create)
  copy      pack this checkout (tracked and untracked files that git does not ignore) and unpack it on every worker
            into ~/REMOTE_DIR (over what is there)
  install   on every worker: create the venv and install detailflow_jax with jax[tpu] (run_on_host.sh --install-only)
  run       start `python -m MODULE ARGS` on every worker at once, detached from ssh, with DETAILFLOW_DISTRIBUTED=1
            (jax.distributed finds the pod by itself); each worker logs to ~/REMOTE_DIR/logs/RUN.log; then streams
            worker 0's log (Ctrl-C stops the streaming, not the run)
  logs      stream the log of a run on one worker (--worker, --run-name)
  stop      send SIGTERM to the run on every worker (the trainers save a checkpoint and exit); --force: SIGKILL
  delete    delete the TPU VM

settings (option, or environment variable):
  --name NAME       TPU_NAME      TPU VM name (required)
  --zone ZONE       TPU_ZONE      zone, e.g. us-west4-a (required)
  --project ID      TPU_PROJECT   project (default: gcloud's configured project)
  --recipe NAME     TPU_RECIPE    launch/recipes/NAME.env: libtpu flags and config.mesh for run; TPU type and
                                  runtime version for create (e.g. v5e-256, v4-128, v5p-128, v5e-8, v4-8)
  --type TYPE       TPU_TYPE      create: accelerator type, e.g. v5litepod-256 (default: the recipe's)
  --version V       TPU_VERSION   create: runtime image, e.g. v2-alpha-tpuv5-lite (default: the recipe's)
  --spot                          create: a spot TPU (preemptible; rerun `run` to resume from the checkpoint)
  --remote-dir DIR                code directory on the workers, relative to home (default detailflow_jax)
  --run-name NAME                 run: log name (default detailflow-DATE-TIME); logs/stop: default the latest run
  --env KEY=VALUE                 run: extra environment on the workers, e.g. TFDS_DATA_DIR=gs://bucket/tfds
                                  (repeatable)
  --worker N                      logs: which worker (default 0)
  --force                         stop: SIGKILL instead of SIGTERM
  --dry-run                       print the commands instead of running them
  -h, --help                      this text

Multi-worker ssh needs your key in the agent once: ssh-add ~/.ssh/google_compute_engine

example (TPU v5e-256):
  export TPU_NAME=df-v5e-256 TPU_ZONE=us-west4-a TPU_RECIPE=v5e-256
  launch/tpu_vm.sh create
  launch/tpu_vm.sh copy
  launch/tpu_vm.sh install
  launch/tpu_vm.sh run --env TFDS_DATA_DIR=gs://my-bucket/tfds -- detailflow_jax.train.tokenizer \
      --config configs/tokenizer_imagenet.py:DF-16 --workdir gs://my-bucket/runs/tok_df16
  launch/tpu_vm.sh logs --worker 3
  launch/tpu_vm.sh stop
  launch/tpu_vm.sh delete
USAGE
}

[[ $# -gt 0 ]] || { usage >&2; exit 2; }
command="$1"
shift
case "$command" in
  -h|--help) usage; exit 0 ;;
  create|copy|install|run|logs|stop|delete) ;;
  *) die "unknown command '$command'; one of: create copy install run logs stop delete" ;;
esac

name="${TPU_NAME:-}"
zone="${TPU_ZONE:-}"
project="${TPU_PROJECT:-}"
recipe="${TPU_RECIPE:-}"
tpu_type="${TPU_TYPE:-}"
tpu_version="${TPU_VERSION:-}"
spot=0
remote_dir=detailflow_jax
run_name=""
worker=0
force=0
dry_run=0
extra_env=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name) name="${2:-}"; shift 2 ;;
    --zone) zone="${2:-}"; shift 2 ;;
    --project) project="${2:-}"; shift 2 ;;
    --recipe) recipe="${2:-}"; shift 2 ;;
    --type) tpu_type="${2:-}"; shift 2 ;;
    --version) tpu_version="${2:-}"; shift 2 ;;
    --spot) spot=1; shift ;;
    --remote-dir) remote_dir="${2:-}"; shift 2 ;;
    --run-name) run_name="${2:-}"; shift 2 ;;
    --env)
      [[ "${2:-}" == *=* ]] || die "--env needs KEY=VALUE (got '${2:-}')"
      extra_env+=("$2"); shift 2 ;;
    --worker) worker="${2:-}"; shift 2 ;;
    --force) force=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) die "unknown option $1" ;;
  esac
done
require "$name" "missing --name (or TPU_NAME)"
require "$zone" "missing --zone (or TPU_ZONE)"
[[ "$remote_dir" =~ ^[A-Za-z0-9_./-]+$ && "$remote_dir" != /* ]] \
  || die "--remote-dir must be a plain path relative to the home directory (got '$remote_dir')"
[[ -z "$recipe" ]] || recipe_file "$recipe" >/dev/null

# Prints the command (--dry-run) or runs it.
run() {
  if (( dry_run )); then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

gcloud_tpu() {  # gcloud_tpu VERB [ARGS...]
  local verb="$1"
  shift
  run gcloud compute tpus tpu-vm "$verb" "$@" "--zone=$zone" ${project:+"--project=$project"}
}

on_workers() {  # on_workers WORKER SHELL_COMMAND
  gcloud_tpu ssh "$name" "--worker=$1" "--command=$2"
}

quote() {  # the arguments as one shell-quoted string
  local out
  printf -v out '%q ' "$@"
  echo "${out% }"
}

case "$command" in
  create)
    [[ -n "$tpu_type" || -z "$recipe" ]] || tpu_type="$(recipe_value "$recipe" TPU_TYPE)"
    [[ -n "$tpu_version" || -z "$recipe" ]] || tpu_version="$(recipe_value "$recipe" TPU_VERSION)"
    require "$tpu_type" "missing --type (or TPU_TYPE, or a TPU --recipe)"
    require "$tpu_version" "missing --version (or TPU_VERSION, or a TPU --recipe)"
    spot_flag=()
    (( spot )) && spot_flag=(--spot)
    gcloud_tpu create "$name" "--accelerator-type=$tpu_type" "--version=$tpu_version" "${spot_flag[@]}"
    ;;
  copy)
    git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 || die "copy packs the files git knows: $REPO_ROOT is not a git checkout"
    tarball="$(mktemp -t detailflow_jax.XXXXXX).tar.gz"
    trap 'rm -f "$tarball"' EXIT
    (cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard | tar czf "$tarball" --null -T -)
    echo "packed $(du -h "$tarball" | cut -f1) from $REPO_ROOT" >&2
    gcloud_tpu scp "$tarball" "$name:detailflow_jax.tar.gz" --worker=all
    on_workers all "mkdir -p $(quote "$remote_dir") && tar xzf detailflow_jax.tar.gz -C $(quote "$remote_dir") && rm detailflow_jax.tar.gz"
    ;;
  install)
    on_workers all "cd $(quote "$remote_dir") && bash launch/run_on_host.sh --accelerator tpu --install-only"
    ;;
  run)
    require "${1:-}" "missing the command after --, e.g. -- detailflow_jax.train.tokenizer --config ... --workdir gs://..."
    run_name="${run_name:-detailflow-$(date +%Y%m%d-%H%M%S)}"
    [[ "$run_name" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run-name may hold letters, digits, '.', '_' and '-' only"
    launcher=(bash launch/run_on_host.sh --accelerator tpu ${recipe:+--recipe "$recipe"} -- "$@")
    envs=(DETAILFLOW_DISTRIBUTED=1 "${extra_env[@]}")
    # A detached session per worker: it survives the ssh connection, and stop signals its whole process group.
    remote="cd $(quote "$remote_dir") || exit 1; mkdir -p logs"
    remote+="; env $(quote "${envs[@]}") setsid nohup $(quote "${launcher[@]}") > logs/$run_name.log 2>&1 < /dev/null &"
    remote+=" echo \$! > logs/$run_name.pid; ln -sfn $run_name.log logs/latest.log; ln -sfn $run_name.pid logs/latest.pid"
    on_workers all "$remote"
    echo "started $run_name on all workers of $name; streaming worker 0 (Ctrl-C stops streaming only)" >&2
    on_workers 0 "tail -n +1 -F $(quote "$remote_dir/logs/$run_name.log")"
    ;;
  logs)
    run_name="${run_name:-latest}"
    on_workers "$worker" "tail -n +1 -F $(quote "$remote_dir/logs/$run_name.log")"
    ;;
  stop)
    run_name="${run_name:-latest}"
    signal=TERM
    (( force )) && signal=KILL
    pidfile="$(quote "$remote_dir/logs/$run_name.pid")"
    # The run is a session leader (setsid), so its process group is exactly the run.
    on_workers all "if [ -f $pidfile ]; then kill -$signal -- -\$(cat $pidfile) 2>/dev/null && echo \"\$(hostname): sent SIG$signal\" || echo \"\$(hostname): not running\"; else echo \"\$(hostname): no run $run_name\"; fi"
    ;;
  delete)
    gcloud_tpu delete "$name" --quiet
    ;;
esac
