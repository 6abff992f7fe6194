#!/usr/bin/env bash
# Soak: a server and two client processes of 500 clients each, for MINUTES
# (default 20), with fits of FIT_SECONDS (default 5) on a 4 MB model, 50
# clients sampled per round, the machine loaded by a CPU hog (one busy loop
# per core). Reports rounds played, every disconnect the server and the
# clients saw (with its reason), and the memory of the server and the
# client processes over time (it should stay flat): each client process
# with its Python learner processes, and in brackets the Petal process alone.
#
#   bench/soak.sh [MINUTES]
# Needs the flwr venv's Python for NumPy (tools/venvs.sh flwr) or
# PYTHON=/path/to/python with NumPy.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-20}
PER_PROCESS=${PER_PROCESS:-500}
PYTHON=${PYTHON:-$HOME/.cache/petal/flwr-venv/bin/python}
export FIT_SECONDS=${FIT_SECONDS:-5}
cargo build --release --quiet -p petal
target_dir=$(cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
PETAL="${target_dir:-target}/release/petal"
tmp=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
total=$((2 * PER_PROCESS))
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

RUST_LOG=info "$PETAL" server --address "127.0.0.1:$port" --rounds 1000000 \
  --min-available-clients "$total" --fit-clients 50 --fraction-evaluate 0.05 \
  --out "$tmp/run" >/dev/null 2>"$tmp/server.log" &
server=$!
pids+=("$server")
clients=()
for p in 0 1; do
  RUST_LOG=info "$PETAL" client --server "127.0.0.1:$port" --isolation none \
    --learner "python:bench/soak_learner.py:make" --python "$PYTHON" \
    --clients "$PER_PROCESS" --partition-id $((p * PER_PROCESS)) --num-partitions "$total" \
    --max-concurrent-fit 25 --connect-attempts 1000 >/dev/null 2>"$tmp/client$p.log" &
  clients+=($!)
  pids+=($!)
done
for _ in $(seq "$(nproc)"); do (while :; do :; done) & pids+=($!); done

tree_rss() { # KB of a process and its descendants
  local total=0 pid
  for pid in $1 $(pgrep -P "$1" || true); do
    total=$((total + $(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)))
  done
  echo "$total"
}
echo "machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores"
echo "soak: 2 x $PER_PROCESS clients, ${FIT_SECONDS}s fits, 50 per round, CPU hog on every core, ${MINUTES} min"
printf "%8s %8s %10s %20s %20s\n" minute rounds server_MB "client0_MB (petal)" "client1_MB (petal)"
start=$SECONDS
end=$((SECONDS + MINUTES * 60))
while [ $SECONDS -lt "$end" ]; do
  sleep 60
  rounds=$(grep -c "aggregate_fit: received" "$tmp/server.log" || true)
  own() { echo $(($(awk '/^VmRSS:/ {print $2}' "/proc/$1/status") / 1024)); }
  printf "%8d %8d %10d %20s %20s\n" $(((SECONDS - start + 30) / 60)) "$rounds" \
    $(($(tree_rss "$server") / 1024)) \
    "$(($(tree_rss "${clients[0]}") / 1024)) ($(own "${clients[0]}"))" \
    "$(($(tree_rss "${clients[1]}") / 1024)) ($(own "${clients[1]}"))"
done
joined=$(grep -c "client joined" "$tmp/server.log" || true)
left=$(grep -c "client left\|client dropped" "$tmp/server.log" || true)
lost=$(cat "$tmp"/client*.log | grep -c "lost the connection" || true)
failures=$(grep -c " failed: " "$tmp/server.log" || true)
echo "joins seen by the server: $joined (of $total clients)"
echo "clients the server saw leave: $left"
echo "connections lost, as the clients saw them: $lost"
echo "failed fit/evaluate calls: $failures"
if [ "$left" -gt 0 ] || [ "$lost" -gt 0 ] || [ "$failures" -gt 0 ]; then
  echo "--- why (first lines):"
  grep -h "client left\|client dropped\|lost the connection\| failed: " "$tmp"/*.log | head -20
fi
