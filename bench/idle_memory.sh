#!/usr/bin/env bash
# What a client costs at rest: the RSS of an idle `petal client` process
# with subprocess isolation (no model or data held between rounds), and of
# a process hosting K idle logical clients, from which the cost of one
# logical client follows. The clients join a server that waits for more
# clients than will come, so they stay idle while measured.
#
#   bench/idle_memory.sh [K]        (default 1000)
set -euo pipefail
cd "$(dirname "$0")/.."
K=${1:-1000}
cargo build --release --quiet -p petal
target_dir=$(cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
PETAL="${target_dir:-target}/release/petal"
tmp=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$PETAL" server --address "127.0.0.1:$port" --rounds 1 --min-available-clients 1000000 \
  --fit-clients 1 --out "$tmp/run" 2>/dev/null &
server=$!
trap 'kill $server 2>/dev/null; kill $(jobs -p) 2>/dev/null; rm -rf "$tmp"' EXIT
rss() { awk '/^Rss:/ {print $2}' "/proc/$1/smaps_rollup"; }
pss() { awk '/^Pss:/ {print $2}' "/proc/$1/smaps_rollup"; }
settle() { # waits until the process's RSS stops changing
  local last=0 now; now=$(rss "$1")
  while [ "$now" != "$last" ]; do sleep 0.5; last=$now; now=$(rss "$1"); done
}
start() { RUST_LOG=error "$PETAL" client --server "127.0.0.1:$port" --dataset synthetic "$@" >/dev/null 2>&1 & echo $!; }
one=$(start --isolation subprocess)
many=$(start --isolation none --clients "$K" --num-partitions "$K" --max-concurrent-fit 1)
settle "$one"; settle "$many"; settle "$server"
r1=$(rss "$one"); rk=$(rss "$many")
echo "machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1)"
echo "idle client process (subprocess isolation): RSS $((r1 / 1024)).$(( (r1 % 1024) * 10 / 1024 )) MB, PSS $(( $(pss "$one") / 1024 )) MB"
echo "process hosting $K idle clients (in-process, synthetic data): RSS $((rk / 1024)) MB"
echo "one idle logical client: $(( (rk - r1) / (K - 1) )) KB"
echo "server with $((K + 1)) idle streams: RSS $(( $(rss "$server") / 1024 )) MB"
