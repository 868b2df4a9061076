#!/usr/bin/env bash
# Per-host bootstrap (TPU VM workers, SLURM nodes): create or reuse a venv, export a recipe, run one process.
set -euo pipefail
# shellcheck source=launch/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'USAGE'
usage: launch/run_on_host.sh --accelerator tpu|cuda|cpu [options] [--] MODULE [ARGS...]

Runs on every host of a multi-host job (tpu_vm.sh and slurm_gpu.sbatch call it; the same command line everywhere):
  1. creates the venv on first use and installs this checkout with the JAX build for the accelerator
     (pip install -e . "jax[tpu]" / "jax[cuda12]"); later runs reuse it until setup.py or the accelerator changes;
  2. exports launch/recipes/NAME.env (XLA_FLAGS / LIBTPU_INIT_ARGS) when --recipe is given;
  3. execs `python -m MODULE [--config.mesh.* of the recipe] ARGS` from the repository root.
jax.distributed starts by itself under SLURM (more than one task) and wherever DETAILFLOW_DISTRIBUTED=1 is set
(tpu_vm.sh sets it); see detailflow_jax/distributed.py for explicit settings.

options:
  --accelerator A   tpu, cuda or cpu (required; or $DETAILFLOW_ACCELERATOR)
  --venv DIR        virtual environment (default $DETAILFLOW_VENV, else ~/.venvs/detailflow_jax)
  --recipe NAME     hardware recipe: launch/recipes/NAME.env (XLA flags + config.mesh)
  --install-only    set up the venv, then exit (no MODULE)
  --no-install      do not check the venv (it must exist): for many hosts sharing one venv on a network disk
  -h, --help        this text

example (what every TPU worker runs):
  DETAILFLOW_DISTRIBUTED=1 bash launch/run_on_host.sh --accelerator tpu --recipe v5e-256 -- \
      detailflow_jax.train.tokenizer --config configs/tokenizer_imagenet.py:DF-16 --workdir gs://bucket/tok
USAGE
}

accelerator="${DETAILFLOW_ACCELERATOR:-}"
venv="${DETAILFLOW_VENV:-$HOME/.venvs/detailflow_jax}"
recipe=""
install=check
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --accelerator) accelerator="${2:-}"; shift 2 ;;
    --venv) venv="${2:-}"; shift 2 ;;
    --recipe) recipe="${2:-}"; shift 2 ;;
    --install-only) install=only; shift ;;
    --no-install) install=skip; shift ;;
    --) shift; break ;;
    -*) die "unknown option $1" ;;
    *) break ;;
  esac
done
require "$accelerator" "missing --accelerator (tpu, cuda or cpu; or DETAILFLOW_ACCELERATOR)"
case "$accelerator" in
  tpu) jax_extra=("jax[tpu]") ;;
  cuda) jax_extra=("jax[cuda12]") ;;
  cpu) jax_extra=() ;;
  *) die "--accelerator must be tpu, cuda or cpu (got '$accelerator')" ;;
esac
[[ "$install" == only || -n "${1:-}" ]] || die "missing MODULE, e.g. detailflow_jax.train.tokenizer"
[[ -z "$recipe" ]] || recipe_file "$recipe" >/dev/null

setup_venv() {
  local stamp="$venv/.detailflow_install" want
  want="$accelerator $(cksum < "$REPO_ROOT/setup.py")"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return 0
  fi
  if [[ ! -x "$venv/bin/python" ]]; then
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
      || die "python3 is $(python3 --version 2>&1); detailflow_jax needs Python >= 3.11"
    echo "creating $venv" >&2
    python3 -m venv "$venv"
  fi
  echo "installing detailflow_jax (${jax_extra[*]:-jax cpu}) into $venv" >&2
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -e "$REPO_ROOT" "${jax_extra[@]}"
  echo "$want" > "$stamp"
}

case "$install" in
  check|only) setup_venv ;;
  skip) [[ -x "$venv/bin/python" ]] || die "--no-install, but $venv has no bin/python; run with --install-only first" ;;
esac
[[ "$install" != only ]] || exit 0

if [[ -n "$recipe" ]]; then
  load_recipe "$recipe"
fi
py="$venv/bin/python"
module="$1"
shift
with_mesh_flags "$py" "$@"
cd "$REPO_ROOT"
exec "$py" -m "$module" "${MODULE_ARGS[@]}"
