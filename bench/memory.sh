#!/usr/bin/env bash
# Peak resident memory of client processes and their workers during a run,
# for --isolation subprocess vs none.
#   bench/memory.sh [NBCLIENTS] [NBFITCLIENTS] [ROUNDS] [extra petal run flags...]
# Samples /proc every 50 ms; prints, per mode: the peak RSS of the busiest
# client process, the sum of all client processes' RSS between rounds
# (idle cost), and the peak RSS of any worker.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-4}; F=${2:-2}; R=${3:-2}
shift $(( $# < 3 ? $# : 3 ))
cargo build --release --quiet -p petal
PETAL=$PWD/target/release/petal

rss_of() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

measure() {
  local mode=$1; shift
  "$PETAL" run --clients "$N" --min-clients "$N" --fit-clients "$F" --rounds "$R" \
    --isolation "$mode" "$@" 2>/dev/null &
  local run=$!
  local peak_client=0 peak_worker=0 peak_sum=0
  while kill -0 "$run" 2>/dev/null; do
    local sum=0
    for pid in $(pgrep -P "$run" -f "petal client" || true); do
      local r; r=$(rss_of "$pid"); sum=$((sum + r))
      (( r > peak_client )) && peak_client=$r
      for w in $(pgrep -P "$pid" -f "petal worker" || true); do
        local wr; wr=$(rss_of "$w"); (( wr > peak_worker )) && peak_worker=$wr
      done
    done
    (( sum > peak_sum )) && peak_sum=$sum
    sleep 0.05
  done
  wait "$run"
  printf '%-10s clients=%d peak client RSS %6.1f MB | peak sum of clients %7.1f MB | peak worker RSS %6.1f MB\n' \
    "$mode" "$N" "$(echo "$peak_client/1024" | bc -l)" "$(echo "$peak_sum/1024" | bc -l)" "$(echo "$peak_worker/1024" | bc -l)"
}

measure subprocess "$@"
measure none "$@"
