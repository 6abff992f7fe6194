#!/usr/bin/env bash
# `petal simulate` with many registered clients: its memory must not grow
# with the rounds. Runs
#
#   petal simulate --clients N --fit-clients F --rounds R --dataset synthetic
#
# and prints the resident memory after round 10 and after round R (from its
# progress lines, which report the process's RSS), their ratio, and the
# seconds per round.
#
#   bench/sim_scale.sh [N] [F] [R]      (default 100000 100 200)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
F=${2:-100}
R=${3:-200}
cargo build --release --quiet -p petal
target_dir=$(cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
PETAL=${target_dir:-target}/release/petal
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GB RAM"
echo "petal simulate --clients $N --fit-clients $F --rounds $R --dataset synthetic"
start=$(date +%s.%N)
"$PETAL" simulate --clients "$N" --fit-clients "$F" --rounds "$R" --dataset synthetic \
  --no-progress --out "$work/run" 2>"$work/log" >/dev/null
end=$(date +%s.%N)
mib() { grep -o "round $1/$R · [^·]* · [0-9.]* MiB" "$work/log" | tail -1 | grep -o '[0-9.]* MiB$' | cut -d' ' -f1; }
at10=$(mib 10)
atR=$(mib "$R")
echo "RSS after round 10: $at10 MiB; after round $R: $atR MiB; ratio $(python3 -c "print(f'{$atR / $at10:.3f}')")"
echo "RSS every 10 rounds (MiB): $(grep -o "round [0-9]*0/$R · [^·]* · [0-9.]* MiB" "$work/log" | grep -o '[0-9.]* MiB$' | cut -d' ' -f1 | tr '\n' ' ')"
echo "wall $(python3 -c "print(f'{$end - $start:.1f}')") s, $(python3 -c "print(f'{($end - $start) / $R:.3f}')") s/round"
