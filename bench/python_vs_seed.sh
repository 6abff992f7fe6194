#!/usr/bin/env bash
# Petal with the seed's PyTorch code as a Python learner against the seed's
# Python system (Flower 1.41 + PyTorch + a spawned process per step), side
# by side on Fashion-MNIST. See bench/python_vs_seed.py.
#
#   bench/python_vs_seed.sh [CONFIG ...]    (default: 2,2,2,3 10,10,5,3)
#
# PyTorch and Flower come from ~/.cache/petal/torch-venv (tools/venvs.sh torch).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/venvs.sh torch
cargo build --release --quiet -p petal
target_dir=$(cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
py=${PETAL_CACHE:-$HOME/.cache/petal}/torch-venv/bin/python
echo "machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GB RAM"
configs=("$@")
[ ${#configs[@]} -eq 0 ] && configs=(2,2,2,3 10,10,5,3)
"$py" bench/python_vs_seed.py "${target_dir:-target}/release/petal" "$py" --configs "${configs[@]}" ${PETAL_BENCH_RUNS:+--runs $PETAL_BENCH_RUNS}
