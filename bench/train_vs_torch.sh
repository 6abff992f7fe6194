#!/usr/bin/env bash
# Petal's local training vs PyTorch's on the seed CNN, side by side on this
# machine: the same net, random data of the same shape, SGD (lr 0.001,
# momentum 0.9), batch 32, after a warm-up epoch; training (forward +
# backward + step) and evaluation (forward), 1 and 2 threads, for the
# CIFAR-10 shape and the Fashion-MNIST shape. Each figure is the median of
# REPEATS runs (default 3).
#
#   bench/train_vs_torch.sh [IMAGES]          (default 6400 images per epoch)
#
# PyTorch comes from a venv this script creates under target/torch-venv
# (pip install torch), or from PETAL_TORCH_PYTHON. Extra petal flags go in
# PETAL_BENCH_FLAGS (e.g. "--device burn").
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGES=${1:-6400}
REPEATS=${REPEATS:-3}

PY=${PETAL_TORCH_PYTHON:-}
if [ -z "$PY" ]; then
  venv=target/torch-venv
  if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
    echo "creating $venv with PyTorch (pip install torch)..." >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet torch
  fi
  PY=$venv/bin/python
fi
cargo build --release --quiet -p petal
target_dir=$(cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
PETAL="${target_dir:-target}/release/petal"

median() { sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
# field NAME LINE: the number after NAME in "... train N images/s evaluate N images/s".
field() { sed -n "s/.*$1 \([0-9.]*\) images\/s.*/\1/p" <<<"$2"; }

echo "machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores;" \
  "flags: $(grep -o -w -E 'avx512f|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "torch: $("$PY" -c 'import torch; print(torch.__version__)'); petal: $("$PETAL" --version)"
printf '%-9s %7s | %12s %12s %7s | %12s %12s %7s\n' shape threads \
  "petal train" "torch train" ratio "petal eval" "torch eval" ratio
for shape in 3x32x32 1x28x28; do
  for threads in 1 2; do
    pt=(); pe=(); tt=(); te=()
    for _ in $(seq "$REPEATS"); do
      # shellcheck disable=SC2086
      p=$("$PETAL" bench train --shape "$shape" --threads "$threads" --images "$IMAGES" ${PETAL_BENCH_FLAGS:-})
      t=$("$PY" bench/torch_train.py --shape "$shape" --threads "$threads" --images "$IMAGES")
      pt+=("$(field train "$p")"); pe+=("$(field evaluate "$p")")
      tt+=("$(field train "$t")"); te+=("$(field evaluate "$t")")
    done
    a=$(printf '%s\n' "${pt[@]}" | median); b=$(printf '%s\n' "${tt[@]}" | median)
    c=$(printf '%s\n' "${pe[@]}" | median); d=$(printf '%s\n' "${te[@]}" | median)
    printf '%-9s %7s | %12.0f %12.0f %6.2fx | %12.0f %12.0f %6.2fx\n' "$shape" "$threads" \
      "$a" "$b" "$(echo "$a / $b" | bc -l)" "$c" "$d" "$(echo "$c / $d" | bc -l)"
  done
done
echo "(images/s, median of $REPEATS runs; ratio = Petal / PyTorch; $(echo "$p" | sed 's/.*(\(.*\))/\1/'))"
