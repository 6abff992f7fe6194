#!/usr/bin/env bash
# Peak memory of `petal server` aggregating K updates of a 10M-parameter
# model (40 MB each), for K = 100 and 1,000: it does not grow with K.
# FedAvg folds each update into one running sum as it arrives, and the
# updates in flight are bounded by --in-flight-memory-mb (default 1024), so
# the server holds the global model, the f64 sum and at most that much of
# updates, whatever the number of clients.
#
#   bench/server_memory.sh [VALUES] [K...]     (default 10000000 and 100 1000)
#
# The K clients are no-op clients (they return the model they receive)
# hosted by one `petal client --clients K` process.
set -euo pipefail
cd "$(dirname "$0")/.."
VALUES=${1:-10000000}
shift $(( $# > 0 ? 1 : 0 ))
KS=${*:-100 1000}
cargo build --release --quiet -p petal
target_dir=$(cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
PETAL="${target_dir:-target}/release/petal"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores; model: $VALUES f32 values ($((VALUES * 4 / 1000000)) MB)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for k in $KS; do
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  python3 bench/treemem.py --interval 0.05 -- "$PETAL" server --address "127.0.0.1:$port" --rounds 1 \
    --min-available-clients "$k" --fit-clients "$k" --fraction-evaluate 0 --out "$tmp/run-$k" \
    2>"$tmp/server-$k.log" &
  server=$!
  RUST_LOG=error "$PETAL" client --server "127.0.0.1:$port" --device noop --noop-values "$VALUES" \
    --clients "$k" --num-partitions "$k" --max-concurrent-fit 4 --dataset synthetic --connect-attempts 50
  wait "$server"
  stats=$(grep -o 'peak_rss_mb=[0-9.]* peak_pss_mb=[0-9.]* .* wall_s=[0-9.]*' "$tmp/server-$k.log")
  results=$(python3 -c "import json; r=json.load(open('$tmp/run-$k/history.json'))['rounds'][0]; print(r['fit_results'], 'updates folded,', r['fit_failures'], 'failures')")
  echo "K=$k: server $stats; $results"
done
