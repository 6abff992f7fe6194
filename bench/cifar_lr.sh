#!/usr/bin/env bash
# Which learning rate to recommend for CIFAR-10: `petal run` with 2 clients
# on the shared subset (4,000 train + 1,000 test real images), 10 rounds,
# SGD momentum 0.9, batch 32, 1 local epoch, for each LR given (default:
# the seed's 0.001, then 0.01, 0.03, 0.1). Prints federated accuracy after
# rounds 1, 3, 5 and 10. Accuracy only: times depend on the machine.
#
#   bench/cifar_lr.sh [DATA_DIR] [LR...]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cifar10-subset}
shift || true
LRS=("$@")
[ ${#LRS[@]} -gt 0 ] || LRS=(0.001 0.01 0.03 0.1)
cargo build --release --quiet -p petal
target_dir=$(cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
PETAL="${target_dir:-target}/release/petal"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf "%-8s %8s %8s %8s %8s\n" lr round1 round3 round5 round10
for lr in "${LRS[@]}"; do
  RUST_LOG=error "$PETAL" run --clients 2 --rounds 10 --dataset cifar10 --data-dir "$DATA" \
    --lr "$lr" --momentum 0.9 --batch-size 32 --epochs 1 --out "$tmp/$lr" >/dev/null 2>&1
  python3 - "$tmp/$lr/history.json" "$lr" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["rounds"]
acc = lambda n: f"{r[n - 1]['accuracy']:.3f}"
print(f"{sys.argv[2]:<8} {acc(1):>8} {acc(3):>8} {acc(5):>8} {acc(10):>8}")
PY
done
