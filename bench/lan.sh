#!/usr/bin/env bash
# A federation across hosts with shaped links: a TLS server and three
# client hosts (network namespaces on one bridge; needs root), a model of
# SOAK_VALUES float32 values (default 2,500,000: 10 MB) from a Python
# learner whose fit takes no time, so a round is all transport. Each host's
# egress is shaped in turn: none, then tbf at each RATE (default 1gbit,
# 100mbit, 10mbit... as given), and netem delay/loss when the kernel has it.
# Prints seconds per round (median of ROUNDS rounds after the first) and
# what the links alone need per round: 3 models out of the server (fit
# instructions), then one out of each client at once (fit results), then 3
# out of the server again (evaluate instructions): 7 model transfers.
#
#   bench/lan.sh [ROUNDS] [RATE...]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}
shift || true
RATES=("$@")
[ ${#RATES[@]} -gt 0 ] || RATES=(1gbit 100mbit)
PYTHON=${PYTHON:-$HOME/.cache/petal/flwr-venv/bin/python}
export FIT_SECONDS=0 SOAK_VALUES=${SOAK_VALUES:-2500000}
cargo build --release --quiet -p petal
target_dir=$(cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
PETAL=$(realpath "${target_dir:-target}/release/petal")
tmp=$(mktemp -d)
p="plan$$"
hosts=4
cleanup() {
  for i in $(seq 0 $((hosts - 1))); do ip netns pids "$p-h$i" 2>/dev/null | xargs -r kill -9 2>/dev/null || true; ip netns del "$p-h$i" 2>/dev/null || true; done
  ip netns del "$p-sw" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
ip netns add "$p-sw"
ip -n "$p-sw" link add br0 type bridge
ip -n "$p-sw" link set br0 up
for i in $(seq 0 $((hosts - 1))); do
  ip netns add "$p-h$i"
  ip link add eth0 netns "$p-h$i" type veth peer name "p$i" netns "$p-sw"
  ip -n "$p-sw" link set "p$i" master br0 up
  ip -n "$p-h$i" addr add "10.77.0.$((i + 1))/24" dev eth0
  ip -n "$p-h$i" link set eth0 up
  ip -n "$p-h$i" link set lo up
done
bash examples/tls/make-certs.sh "$tmp/certs" 10.77.0.1 >/dev/null

# one_run LABEL: R rounds; prints the median seconds per round after the first
one_run() {
  local out="$tmp/run-$1"
  ip netns exec "$p-h0" env RUST_LOG=info "$PETAL" server --address 10.77.0.1:8443 \
    --ssl-certfile "$tmp/certs/server.pem" --ssl-keyfile "$tmp/certs/server.key" \
    --rounds "$((ROUNDS + 1))" --min-available-clients 3 --fit-clients 3 \
    --out "$out" >/dev/null 2>"$tmp/server.log" &
  local server=$!
  for i in 1 2 3; do
    ip netns exec "$p-h$i" env RUST_LOG=warn "$PETAL" client --server 10.77.0.1:8443 \
      --root-certificates "$tmp/certs/ca.crt" --isolation none \
      --learner "python:bench/soak_learner.py:make" --python "$PYTHON" \
      --partition-id "$((i - 1))" --num-partitions 3 --connect-attempts 100 \
      >/dev/null 2>"$tmp/client$i.log" &
  done
  wait "$server"
  wait
  python3 - "$out/history.json" <<'PY'
import json, statistics, sys
rounds = json.load(open(sys.argv[1]))["rounds"][1:]
print(f"{statistics.median(r['round_seconds'] for r in rounds):.2f}")
PY
}
shape() { # shape ARGS...: the same qdisc on every host's eth0 (none: remove)
  for i in $(seq 0 $((hosts - 1))); do
    ip netns exec "$p-h$i" tc qdisc del dev eth0 root 2>/dev/null || true
    [ "$1" = none ] || ip netns exec "$p-h$i" tc qdisc add dev eth0 root "$@"
  done
}
mb=$(python3 -c "print(round($SOAK_VALUES * 4 / 1e6, 1))")
echo "machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores; kernel $(uname -r)"
echo "model: $mb MB; 3 clients; TLS; median of $ROUNDS rounds"
printf "%-28s %10s %18s\n" link "s/round" "link-bound s/round"
shape none
printf "%-28s %10s %18s\n" "veth, unshaped" "$(one_run none)" "-"
for rate in "${RATES[@]}"; do
  shape tbf rate "$rate" burst 256kb latency 500ms
  bits=$(python3 -c "
import re,sys
m=re.fullmatch(r'(\d+)(k|m|g)bit','$rate'); print(int(m[1])*{'k':1e3,'m':1e6,'g':1e9}[m[2]])")
  bound=$(python3 -c "print(f'{7 * $SOAK_VALUES * 32 / $bits:.2f}')")
  printf "%-28s %10s %18s\n" "tbf $rate per host" "$(one_run "$rate")" "$bound"
done
if ip netns exec "$p-h0" tc qdisc add dev eth0 root netem delay 50ms 2>/dev/null; then
  ip netns exec "$p-h0" tc qdisc del dev eth0 root
  for spec in "delay 50ms" "delay 50ms loss 1%"; do
    # shellcheck disable=SC2086
    shape netem $spec
    printf "%-28s %10s %18s\n" "netem $spec" "$(one_run "netem-${spec// /-}")" "-"
  done
else
  echo "netem: not in this kernel (tc: 'Specified qdisc kind is unknown'); delay and loss not measured"
fi
shape none
