#!/usr/bin/env bash
# `petal simulate` and `petal run` (a networked federation of client
# processes on loopback) on the same workload, seed and partitions: the
# accuracy each reaches and their seconds per round.
#
#   bench/sim_vs_run.sh [ROUNDS] [LR]      (default 100 and 0.001)
#
# The workload is bench/sim_vs_flower.sh's: 1,000 clients × 50 CIFAR-10
# images of ../shared/data/cifar10-subset, 50 per round, batch 10, momentum
# 0.9, server-side evaluation every 10 rounds. `petal run` hosts the 1,000
# clients in 10 processes of 100 (`--isolation none`).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-100}
LR=${2:-0.001}
DATA=${PETAL_CIFAR_SUBSET:-../shared/data/cifar10-subset}
cargo build --release --quiet -p petal
target_dir=$(cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
PETAL=${target_dir:-target}/release/petal
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
common=(--clients 1000 --examples-per-client 50 --fit-clients 50 --rounds "$ROUNDS"
  --batch-size 10 --lr "$LR" --dataset cifar10 --data-dir "$DATA" --server-eval-every 10
  --fraction-evaluate 0)
echo "machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores"
"$PETAL" simulate "${common[@]}" --no-progress --out "$work/sim" >/dev/null 2>"$work/sim.log"
"$PETAL" run "${common[@]}" --clients-per-process 100 --isolation none --out "$work/run" \
  >/dev/null 2>"$work/run.log"
for kind in sim run; do
  python3 - "$kind" "$work/$kind/history.json" <<'PY'
import json, sys
h = json.load(open(sys.argv[2]))
r = h["rounds"]
per = (r[-1]["elapsed_seconds"] - r[0]["elapsed_seconds"]) / max(1, len(r) - 1)
acc = [(x["round"], x["centralized"]["accuracy"]) for x in r if x.get("centralized")]
name = {"sim": "petal simulate", "run": "petal run     "}[sys.argv[1]]
print(f"{name}: {per:.3f} s/round, server accuracy " + ", ".join(f"r{n} {a:.4f}" for n, a in acc))
PY
done
