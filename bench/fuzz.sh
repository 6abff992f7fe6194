#!/usr/bin/env bash
# Property-based fuzzing of the decoders a peer's bytes reach: .npy,
# protobuf ClientMessage -> core types, gRPC frames (petal-proto), and
# Flower's Fleet message objects (petal-fleet), at full length. CI runs the
# same properties with 4,000 cases each as part of `cargo test`.
#   bench/fuzz.sh [CASES]   (default 1,000,000 per property)
set -euo pipefail
cd "$(dirname "$0")/.."
CASES=${1:-1000000}
echo "machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores"
for crate in petal-proto petal-fleet; do
  PETAL_FUZZ_CASES=$CASES cargo test --release -q -p $crate --test fuzz -- --nocapture --test-threads 1 2>&1 |
    grep -oE "fuzz .*: [0-9]+ inputs, [0-9]+ panics|test result.*|panicked.*"
done
