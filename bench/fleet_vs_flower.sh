#!/usr/bin/env bash
# Petal nodes vs Flower 1.41's Python SuperNodes under one Flower SuperLink:
# node memory (idle and peak), node CPU time and round time, side by side.
# See bench/fleet_vs_flower.py.
#
#   bench/fleet_vs_flower.sh [N,N,...] [ROUNDS] [extra flags of fleet_vs_flower.py]
#   (default 1,10 and 6; e.g. `100 6 --kinds petal,petal-shared --name fleet_petal_100`)
#
# Flower comes from a venv created under ~/.cache/petal/flwr-venv (pip install
# flwr==1.41.0).
set -euo pipefail
cd "$(dirname "$0")/.."
NS=${1:-1,10}
ROUNDS=${2:-6}
shift $(( $# < 2 ? $# : 2 ))
venv=${PETAL_CACHE:-$HOME/.cache/petal}/flwr-venv
if ! "$venv/bin/python" -c 'import flwr' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet flwr==1.41.0
fi
cargo build --release --quiet -p petal
target_dir=$(cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
echo "machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GB RAM"
"$venv/bin/python" bench/fleet_vs_flower.py "${target_dir:-target}/release/petal" "$venv/bin" bench/results --n "$NS" --rounds "$ROUNDS" "$@"
