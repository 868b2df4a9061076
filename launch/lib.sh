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

# mesh_flags PYTHON: the --config.mesh.* overrides of $DETAILFLOW_MESH (none when it is unset).
mesh_flags() {
  [[ -n "${DETAILFLOW_MESH:-}" ]] || return 0
  (cd "$REPO_ROOT" && "$1" -m configs.common mesh-flags "$DETAILFLOW_MESH")
}
