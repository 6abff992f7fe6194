#!/usr/bin/env bash
# `petal simulate` vs Flower 1.41's simulation engine (Ray, PyTorch clients,
# two actors of one CPU each) on pfl-research's cifar10_iid workload scaled to
# this machine, in one invocation, side by side:
#
#   bench/sim_vs_flower.sh [ROUNDS]        (default 100)
#
# 1,000 clients × 50 CIFAR-10 images of ../shared/data/cifar10-subset (drawn
# without repeats per client), 50 per round, 1 epoch, batch 10, SGD lr 0.001
# momentum 0.9, the example's CNN, FedAvg, server-side evaluation on the
# 1,000 test images at round 0, every 10 rounds and after the last.
# Prints seconds per round (end of round 1 to end of the last), wall time,
# peak memory of the whole process tree (bench/treemem.py) and the final
# accuracy of each, and the ratio; appends them to bench/results/sim_vs_flower.txt.
#
# Flower and PyTorch come from ~/.cache/petal/torch-venv (tools/venvs.sh torch),
# or PETAL_TORCH_PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-100}
DATA=${PETAL_CIFAR_SUBSET:-../shared/data/cifar10-subset}
PY=${PETAL_TORCH_PYTHON:-}
if [ -z "$PY" ]; then
  tools/venvs.sh torch
  PY=${PETAL_CACHE:-$HOME/.cache/petal}/torch-venv/bin/python
fi
cargo build --release --quiet -p petal
target_dir=$(cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
PETAL=${target_dir:-target}/release/petal
machine="$(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GB RAM"
work=${PETAL_BENCH_KEEP:-$(mktemp -d)}
trap 'rm -rf "$work"' EXIT

echo "machine: $machine"
echo "workload: 1000 clients x 50 images, 50 per round, batch 10, lr 0.001, $ROUNDS rounds"
# treemem.py's line is the last on stderr (it prints after the command exits).
python3 bench/treemem.py --interval 0.05 -- "$PETAL" simulate --clients 1000 \
  --examples-per-client 50 --fit-clients 50 --rounds "$ROUNDS" --batch-size 10 \
  --dataset cifar10 --data-dir "$DATA" --server-eval-every 10 --no-progress \
  --out "$work/petal" >/dev/null 2>"$work/petal.log"
mem=$(tail -1 "$work/petal.log")
read -r petal_round petal_acc < <(python3 - "$work/petal/history.json" <<'PY'
import json, sys
h = json.load(open(sys.argv[1]))
r = h["rounds"]
per = (r[-1]["elapsed_seconds"] - r[0]["elapsed_seconds"]) / max(1, len(r) - 1)
acc = next(x["centralized"]["accuracy"] for x in reversed(r) if x.get("centralized"))
print(f"{per:.4f} {acc:.4f}")
PY
)
echo "petal:  $petal_round s/round, accuracy $petal_acc, $mem"

python3 bench/treemem.py --interval 0.2 -- "$PY" bench/sim_flower.py "$DATA" "$ROUNDS" \
  >"$work/flower.out" 2>"$work/flower.log" || { echo "flower failed:"; tail -20 "$work/flower.log"; exit 1; }
fmem=$(tail -1 "$work/flower.log")
read -r flower_round flower_acc < <(grep '^{' "$work/flower.out" | tail -1 | python3 -c '
import json, sys
d = json.loads(sys.stdin.read())
print("%.4f %.4f" % (d["seconds_per_round"], d["accuracy"]))')
echo "flower: $flower_round s/round, accuracy $flower_acc, $fmem"
ratio=$(python3 -c "print(f'{$petal_round / $flower_round:.3f}')")
echo "petal / flower time per round: $ratio"
mkdir -p bench/results
{
  echo "$(date -u +%FT%TZ) $machine rounds=$ROUNDS"
  echo "  petal  $petal_round s/round accuracy $petal_acc $mem"
  echo "  flower $flower_round s/round accuracy $flower_acc $fmem"
  echo "  ratio  $ratio"
} >> bench/results/sim_vs_flower.txt
