# Helpers shared by the launch scripts (sourced, not run).
# shellcheck shell=bash

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() {
  echo "error: $*" >&2
  exit 2
}

# require VALUE "what is missing and how to set it"
require() {
  [[ -n "$1" ]] || die "$2 (see --help)"
}

# The Python to use: $PYTHON, else the checkout's .venv, else python3.
python_bin() {
  if [[ -n "${PYTHON:-}" ]]; then
    echo "$PYTHON"
  elif [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
    echo "$REPO_ROOT/.venv/bin/python"
  else
    echo python3
  fi
}

recipe_file() {
  local file="$REPO_ROOT/launch/recipes/$1.env"
  if [[ ! -f "$file" ]]; then
    local known=() f
    for f in "$REPO_ROOT"/launch/recipes/*.env; do
      known+=("$(basename "$f" .env)")
    done
    die "no recipe '$1': expected $file (known: ${known[*]})"
  fi
  echo "$file"
}

# load_recipe NAME: exports the recipe's variables (XLA_FLAGS, LIBTPU_INIT_ARGS, DETAILFLOW_MESH, ...).
load_recipe() {
  local file
  file="$(recipe_file "$1")" || exit 2
  set -a
  # shellcheck source=/dev/null
  . "$file"
  set +a
}

# recipe_value NAME VAR: one variable of a recipe, without exporting anything.
recipe_value() {
  local file
  file="$(recipe_file "$1")" || exit 2
  # shellcheck source=/dev/null
  (. "$file" && eval "echo \"\${$2:-}\"")
}

# with_mesh_flags PYTHON ARGS...: sets MODULE_ARGS to ARGS with the --config.mesh.* overrides of $DETAILFLOW_MESH
# (a recipe's mesh) placed right after `--config FILE`: ml_collections takes overrides only after the file, and the
# user's own --config.mesh.* later on the line still win.
with_mesh_flags() {
  local py="$1" mesh=() placed=0
  shift
  if [[ -n "${DETAILFLOW_MESH:-}" ]]; then
    read -r -a mesh <<< "$(cd "$REPO_ROOT" && "$py" -m configs.common mesh-flags "$DETAILFLOW_MESH")"
  fi
  MODULE_ARGS=()
  while [[ $# -gt 0 ]]; do
    MODULE_ARGS+=("$1")
    if (( ! placed )) && [[ "$1" == --config=* ]]; then
      MODULE_ARGS+=("${mesh[@]}")
      placed=1
    elif (( ! placed )) && [[ "$1" == --config && $# -gt 1 ]]; then
      MODULE_ARGS+=("$2" "${mesh[@]}")
      placed=1
      shift
    fi
    shift
  done
  (( placed )) || MODULE_ARGS+=("${mesh[@]}")
}
