#!/usr/bin/env bash
# Petal vs Flower 1.41 with N no-op clients on this machine, side by side:
# total memory and time per round, the largest N each completes, and a
# plot (bench/results/scale_vs_flower.svg). See bench/scale_vs_flower.py.
#
#   bench/scale_vs_flower.sh [N,N,...] [ROUNDS]      (default 2,50,200,1000 and 10)
#
# Flower comes from a venv created under ~/.cache/petal/flwr-venv (pip install
# flwr==1.41.0), or from PETAL_FLWR_PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
NS=${1:-2,50,200,1000}
ROUNDS=${2:-10}
PY=${PETAL_FLWR_PYTHON:-}
if [ -z "$PY" ]; then
  venv=${PETAL_CACHE:-$HOME/.cache/petal}/flwr-venv
  if ! "$venv/bin/python" -c 'import flwr' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet flwr==1.41.0
  fi
  PY=$venv/bin/python
fi
cargo build --release --quiet -p petal
target_dir=$(cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
echo "machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GB RAM"
ulimit -n 65536 2>/dev/null || true
python3 bench/scale_vs_flower.py "${target_dir:-target}/release/petal" "$PY" bench/results --n "$NS" --rounds "$ROUNDS"
