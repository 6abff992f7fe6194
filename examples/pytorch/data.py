"""Data for the example learners: Fashion-MNIST (Debian's
dataset-fashion-mnist idx files) or CIFAR-10 (the official binary batches),
as uint8 arrays, cut into seeded IID partitions. NumPy only.

Set PETAL_DATASET (fashion-mnist, the default, or cifar10) and
PETAL_DATA_DIR (default: /usr/share/datasets/fashion-mnist, or
./data/cifar-10-batches-bin for CIFAR-10).
"""
import gzip
import os

import numpy as np


def _idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _find(d, name):
    for candidate in (name, name + ".gz"):
        p = os.path.join(d, candidate)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"{name}(.gz) is not in {d} (PETAL_DATA_DIR)")


def fashion_mnist(d):
    """(train images N×1×28×28, train labels, test images, test labels)."""
    x = _idx(_find(d, "train-images-idx3-ubyte"))[:, None]
    y = _idx(_find(d, "train-labels-idx1-ubyte"))
    xt = _idx(_find(d, "t10k-images-idx3-ubyte"))[:, None]
    yt = _idx(_find(d, "t10k-labels-idx1-ubyte"))
    return x, y, xt, yt


def _cifar_batch(path):
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, 3073)
    return raw[:, 1:].reshape(-1, 3, 32, 32), raw[:, 0].copy()


def cifar10(d):
    """(train images N×3×32×32, train labels, test images, test labels)."""
    if os.path.isdir(os.path.join(d, "cifar-10-batches-bin")):
        d = os.path.join(d, "cifar-10-batches-bin")
    parts = [_cifar_batch(os.path.join(d, f"data_batch_{i}.bin")) for i in range(1, 6)]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    xt, yt = _cifar_batch(os.path.join(d, "test_batch.bin"))
    return x, y, xt, yt


def load():
    """The data set PETAL_DATASET names, from PETAL_DATA_DIR."""
    name = os.environ.get("PETAL_DATASET", "fashion-mnist")
    if name in ("cifar10", "cifar-10"):
        return cifar10(os.environ.get("PETAL_DATA_DIR", "data/cifar-10-batches-bin"))
    if name == "fashion-mnist":
        return fashion_mnist(os.environ.get("PETAL_DATA_DIR", "/usr/share/datasets/fashion-mnist"))
    raise ValueError(f"unknown PETAL_DATASET '{name}' (fashion-mnist or cifar10)")


def partition(n, partition_id, num_partitions, seed=42):
    """Indices of IID shard partition_id of num_partitions over n items."""
    order = np.random.default_rng(seed).permutation(n)
    return order[partition_id * n // num_partitions:(partition_id + 1) * n // num_partitions]
