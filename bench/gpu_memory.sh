#!/usr/bin/env bash
# Peak GPU memory of N clients training on one GPU, under each way Petal
# can host them, to check the seed's claim on a machine with a GPU: with
# PyTorch each process that touched the GPU keeps its CUDA context and
# cached memory, so memory grows with the clients; Petal's answer is that
# it grows with the clients *training at once*, not with the clients.
#
#   bench/gpu_memory.sh [N] [FIT] [ROUNDS]     (default 20 clients, 5 train per round, 2 rounds)
#
# Needs an NVIDIA GPU with nvidia-smi and a CUDA build of Petal
# (`cargo build --release -p petal --features cuda`, network access needed
# at build time). Modes measured:
#   subprocess      a process per client, each fit/evaluate in a worker process
#   in-process      a process per client, the model kept in the client
#   one-process     all N clients in one process (--clients-per-process N),
#                   at most FIT training at once (--max-concurrent-fit FIT)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20}; FIT=${2:-5}; ROUNDS=${3:-2}
command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: this script needs an NVIDIA GPU" >&2; exit 2; }
cargo build --release --quiet -p petal --features cuda
target_dir=$(cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
PETAL="${target_dir:-target}/release/petal"
used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1; }
base=$(used)
echo "GPU: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1); idle use ${base} MiB"
measure() {
  local label=$1; shift
  local out; out=$(mktemp -d)
  "$PETAL" run --device cuda --clients "$N" --min-clients "$N" --fit-clients "$FIT" --rounds "$ROUNDS" \
    --dataset synthetic --synthetic-shape 3x32x32 --out "$out/run" "$@" >/dev/null 2>&1 &
  local pid=$! peak=0
  while kill -0 "$pid" 2>/dev/null; do
    local u; u=$(used); (( u > peak )) && peak=$u
    sleep 0.2
  done
  wait "$pid" || echo "  ($label: petal run failed)"
  printf '%-12s N=%d fit=%d: peak GPU memory %d MiB above idle\n' "$label" "$N" "$FIT" $((peak - base))
  rm -rf "$out"
}
measure subprocess --isolation subprocess
measure in-process --isolation none
measure one-process --isolation none --clients-per-process "$N" --max-concurrent-fit "$FIT"
