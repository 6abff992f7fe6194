#!/usr/bin/env bash
# Creates the Python venvs the tests and benchmarks use, outside the clone
# (so that CI and later sessions on the same machine reuse them):
#
#   tools/venvs.sh flwr     ~/.cache/petal/flwr-venv   flwr==1.41.0
#   tools/venvs.sh torch    ~/.cache/petal/torch-venv  torch==2.15.0 (CUDA build from
#                           PyPI, ~2.7 GB; runs on CPU), flwr[simulation]==1.41.0
#                           (Ray), ml_dtypes
#
# $PETAL_CACHE moves them. A venv is created only when its marker file
# (.installed, holding what was installed) is missing or different.
set -euo pipefail
cache=${PETAL_CACHE:-$HOME/.cache/petal}
mkdir -p "$cache"

make_venv() {
  local name=$1; shift
  local venv=$cache/$name-venv want="$*"
  if [ -f "$venv/.installed" ] && [ "$(cat "$venv/.installed")" = "$want" ]; then
    return
  fi
  (
    flock 9
    if [ -f "$venv/.installed" ] && [ "$(cat "$venv/.installed")" = "$want" ]; then
      exit 0
    fi
    echo "creating $venv ($want)" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$@"
    echo "$want" > "$venv/.installed"
  ) 9>"$cache/$name-venv.lock"
}

for what in "$@"; do
  case $what in
    flwr) make_venv flwr flwr==1.41.0 ;;
    torch) make_venv torch torch==2.15.0 "flwr[simulation]==1.41.0" ml_dtypes ;;
    *) echo "unknown venv '$what'" >&2; exit 2 ;;
  esac
done
