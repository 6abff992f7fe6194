#!/usr/bin/env bash
# GPU memory of Python learners (the seed's PyTorch CNN, on cuda) over a
# federation, on a machine with an NVIDIA GPU, as is:
#
#   bench/gpu_python.sh [CLIENTS] [FIT] [ROUNDS] [ISOLATION]
#   (default 50 clients, 10 trained per round, 5 rounds, subprocess)
#
# Device memory is sampled from nvidia-smi every 0.5 s. With --isolation
# subprocess every step runs in a process forked from its client's warm
# parent (which never touches the GPU) and exits when the step ends, so the
# memory in use between steps must come back to the idle level and each
# round's peak must stay flat (no round more than 10 % above the first);
# the script prints one line per round and exits 1 when it does not.
# Data: Fashion-MNIST (Debian's dataset-fashion-mnist), or set
# PETAL_DATASET=cifar10 PETAL_DATA_DIR=... for CIFAR-10.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-50}; FIT=${2:-10}; ROUNDS=${3:-5}; ISOLATION=${4:-subprocess}
command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: this script needs an NVIDIA GPU" >&2; exit 2; }
bash tools/venvs.sh torch
py=${PETAL_CACHE:-$HOME/.cache/petal}/torch-venv/bin/python
"$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' ||
  { echo "PyTorch in $py sees no CUDA device" >&2; exit 2; }
cargo build --release --quiet -p petal
target_dir=$(cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
PETAL="${target_dir:-target}/release/petal"
work=$(mktemp -d)
trap 'kill $sampler 2>/dev/null || true; rm -rf "$work"' EXIT
echo "GPU: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1)"
# Timestamped samples: epoch seconds, MiB used.
( while true; do
    printf '%s %s\n' "$(date +%s.%N)" "$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)"
    sleep 0.5
  done ) > "$work/samples" &
sampler=$!
sleep 2
start=$(date +%s.%N)
"$PETAL" run --clients "$N" --min-clients "$N" --fit-clients "$FIT" --rounds "$ROUNDS" \
  --clients-per-process 10 --max-concurrent-fit 2 --isolation "$ISOLATION" \
  --learner python:examples/pytorch/cnn.py:make --python "$py" --out "$work/run"
sleep 2
kill $sampler
"$py" - "$work/samples" "$work/run/history.json" "$start" <<'PY'
import json, sys
samples = [tuple(map(float, l.split())) for l in open(sys.argv[1]) if len(l.split()) == 2]
rounds = json.load(open(sys.argv[2]))["rounds"]
start = float(sys.argv[3])
idle = min(m for _, m in samples)
print(f"idle: {idle:.0f} MiB; samples: {len(samples)}")
peaks, prev = [], start
for r in rounds:
    end = start + r["elapsed_seconds"]
    window = [m for t, m in samples if prev <= t <= end]
    peaks.append(max(window) if window else idle)
    print(f"round {r['round']}: peak {peaks[-1]:.0f} MiB ({peaks[-1] - idle:.0f} above idle), "
          f"accuracy {r['accuracy']}")
    prev = end
after = [m for t, m in samples if t > prev]
print(f"after the run: {min(after) if after else float('nan'):.0f} MiB")
flat = all(p <= peaks[0] * 1.10 + 64 for p in peaks)
back = not after or min(after) <= idle + 64
print("flat across rounds" if flat and back else "NOT FLAT")
sys.exit(0 if flat and back else 1)
PY
