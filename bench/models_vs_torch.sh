#!/usr/bin/env bash
# Network files (examples/models) trained by Petal's engine and by PyTorch
# (the same network from tools/torch_from_spec.py), side by side on this
# machine: random data of the model's input shape, SGD lr 0.001 momentum
# 0.9, batch 32, after a warm-up epoch; 1 and 2 threads; median of REPEATS
# runs (default 3). Default: the MLP on 64-feature tabular rows, and the
# seed CNN file on 3x32x32.
#
#   bench/models_vs_torch.sh [IMAGES]        (default 6400 examples per epoch)
#
# PyTorch comes from ~/.cache/petal/torch-venv (tools/venvs.sh torch) or
# PETAL_TORCH_PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGES=${1:-6400}
REPEATS=${REPEATS:-3}
PY=${PETAL_TORCH_PYTHON:-}
if [ -z "$PY" ]; then
  tools/venvs.sh torch
  PY=${PETAL_CACHE:-$HOME/.cache/petal}/torch-venv/bin/python
fi
cargo build --release --quiet -p petal
target_dir=$(cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
PETAL="${target_dir:-target}/release/petal"
median() { sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
field() { sed -n "s/.*$1 \([0-9.]*\) images\/s.*/\1/p" <<<"$2"; }
echo "machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores;" \
  "flags: $(grep -o -w -E 'avx512f|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"
printf '%-14s %-9s %7s | %12s %12s %7s | %12s %12s %7s\n' model shape threads \
  "petal train" "torch train" ratio "petal eval" "torch eval" ratio
for case in "mlp.toml 64x1x1" "seed-cnn.toml 3x32x32"; do
  read -r model shape <<<"$case"
  for threads in 1 2; do
    pt=(); pe=(); tt=(); te=()
    for _ in $(seq "$REPEATS"); do
      p=$("$PETAL" bench train --model "examples/models/$model" --shape "$shape" --threads "$threads" --images "$IMAGES")
      t=$("$PY" bench/torch_train.py --model "examples/models/$model" --shape "$shape" --threads "$threads" --images "$IMAGES")
      pt+=("$(field train "$p")"); pe+=("$(field evaluate "$p")")
      tt+=("$(field train "$t")"); te+=("$(field evaluate "$t")")
    done
    a=$(printf '%s\n' "${pt[@]}" | median); b=$(printf '%s\n' "${tt[@]}" | median)
    c=$(printf '%s\n' "${pe[@]}" | median); d=$(printf '%s\n' "${te[@]}" | median)
    printf '%-14s %-9s %7s | %12.0f %12.0f %6.2fx | %12.0f %12.0f %6.2fx\n' "$model" "$shape" "$threads" \
      "$a" "$b" "$(echo "$a / $b" | bc -l)" "$c" "$d" "$(echo "$c / $d" | bc -l)"
  done
done
echo "(examples/s, median of $REPEATS runs; ratio = Petal / PyTorch)"
