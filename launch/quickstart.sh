#!/usr/bin/env bash
# Fresh machine -> generated images: installs the built-in Fashion-MNIST data (Debian/Ubuntu package, where the
# system package manager can), a virtual environment with detailflow_jax, then runs the main job.
set -euo pipefail
# shellcheck source=launch/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'USAGE'
usage: bash launch/quickstart.sh [--install-only] [--no-apt] [--workdir DIR] [-- MAIN_JOB_ARGS...]

1. Fashion-MNIST: `apt-get install dataset-fashion-mnist` (IDX files in /usr/share/datasets/fashion-mnist) unless
   the files are already there, $DETAILFLOW_FASHION_MNIST_DIR points at them, or --no-apt is given.
2. Python: creates .venv in the checkout (Python >= 3.11) and installs detailflow_jax with its test extras.
3. Unless --install-only: runs the main job (python -m detailflow_jax.quickstart): tokenizer training, code
   extraction, GPT training, sampling and the quality check on Fashion-MNIST, all in DIR (default
   workdir/fashion_mnist; with `-- --smoke`, workdir/fashion_mnist_smoke). Running it again resumes where it
   stopped; a stage whose settings changed (e.g. -- --gpt_steps N) runs again.

options:
  --install-only   steps 1 and 2 only
  --no-apt         never call apt-get (give the data with DETAILFLOW_FASHION_MNIST_DIR instead)
  --workdir DIR    where the main job writes everything (default workdir/fashion_mnist)
  -h, --help       this text
USAGE
}

install_only=0
use_apt=1
workdir=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --install-only) install_only=1; shift ;;
    --no-apt) use_apt=0; shift ;;
    --workdir) workdir="${2:-}"; require "$workdir" "--workdir needs a directory"; shift 2 ;;
    --) shift; break ;;
    *) die "unknown option $1" ;;
  esac
done

fmnist_dir=/usr/share/datasets/fashion-mnist
if [[ -n "${DETAILFLOW_FASHION_MNIST_DIR:-}" || -f "$fmnist_dir/train-images-idx3-ubyte.gz" ]]; then
  :
elif [[ "$use_apt" == 1 ]] && command -v apt-get >/dev/null; then
  sudo_cmd=()
  [[ "$(id -u)" == 0 ]] || sudo_cmd=(sudo)
  echo "installing Fashion-MNIST (apt package dataset-fashion-mnist)" >&2
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
else
  echo "note: Fashion-MNIST not installed; the main job needs it: apt-get install dataset-fashion-mnist, or put the" \
       "four IDX files in a directory and set DETAILFLOW_FASHION_MNIST_DIR" >&2
fi

cd "$REPO_ROOT"
if [[ ! -x .venv/bin/python ]]; then
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "python3 is $(python3 --version 2>&1); detailflow_jax needs Python >= 3.11"
  python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[dev]'

[[ "$install_only" == 1 ]] && exit 0
exec .venv/bin/python -m detailflow_jax.quickstart ${workdir:+--workdir "$workdir"} "$@"
