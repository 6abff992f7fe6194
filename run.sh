#!/usr/bin/env bash
# Federated training on one machine, as in Flower's "scaling on GPU" example:
#   ./run.sh [NBCLIENTS] [NBMINCLIENTS] [NBFITCLIENTS] [NBROUNDS] [extra `petal run` flags...]
# Defaults: 2 clients, 2 must be connected, 2 train per round, 3 rounds,
# on Fashion-MNIST (Debian package dataset-fashion-mnist, installed when missing).
# Results (history.json, history.csv, checkpoint.safetensors) go to
# runs/<UTC date and time>/ (runs/latest points to the newest); pass
# --out DIR to choose, or --resume DIR to continue a run.
set -euo pipefail
cd "$(dirname "$0")"

NBCLIENTS=${1:-2}
NBMINCLIENTS=${2:-2}
NBFITCLIENTS=${3:-2}
NBROUNDS=${4:-3}
shift $(( $# < 4 ? $# : 4 ))

dataset_needed=1
for arg in "$@"; do
  case "$arg" in --dataset|--dataset=*|--data-dir|--data-dir=*) dataset_needed=0 ;; esac
done
if [ "$dataset_needed" = 1 ] && [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)..." >&2
    $sudo apt-get install -y dataset-fashion-mnist >/dev/null 2>&1 ||
      { $sudo apt-get update >/dev/null && $sudo apt-get install -y dataset-fashion-mnist >/dev/null; }
  else
    echo "Fashion-MNIST is missing and apt-get is unavailable: pass --data-dir DIR with the idx files" >&2
  fi
fi

cargo build --release --quiet -p petal
# The binary cargo just built, wherever CARGO_TARGET_DIR or a cargo config puts it.
target_dir=$(cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
exec "${target_dir:-target}/release/petal" run \
  --clients "$NBCLIENTS" \
  --min-clients "$NBMINCLIENTS" \
  --fit-clients "$NBFITCLIENTS" \
  --rounds "$NBROUNDS" \
  "$@"
