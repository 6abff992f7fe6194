"""PyTorch side of bench/train_vs_torch.sh: the seed's CNN (conv 5x5 -> pool ->
conv 5x5 -> pool -> fc 120 -> fc 84 -> fc 10, ReLU; SGD momentum 0.9,
cross-entropy), trained on synthetic data of a given shape, one thread count.

    python torch_train.py --shape 3x32x32 --images 6400 --threads 1 [--batch-size 32]
        [--model examples/models/mlp.toml]   (a network file, via tools/torch_from_spec.py;
                                              default: examples/models/seed-cnn.toml)

Prints one line: `torch train <N> images/s evaluate <N> images/s`.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn as nn


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="3x32x32")
    p.add_argument("--images", type=int, default=6400)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    c, h, w = (int(v) for v in a.shape.split("x"))
    g = torch.Generator().manual_seed(0)
    # Same data path as the seed: uint8 pixels normalised to [-1, 1] per batch.
    pixels = torch.randint(0, 256, (a.images, c, h, w), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (a.images,), generator=g)
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    sys.path.insert(0, os.path.join(root, "tools"))
    from torch_from_spec import build

    net = build(a.model or os.path.join(root, "examples", "models", "seed-cnn.toml"), (c, h, w), 10)
    opt = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    bs = a.batch_size

    def epoch(train: bool) -> float:
        start = time.perf_counter()
        for i in range(0, a.images, bs):
            x = pixels[i : i + bs].float() / 127.5 - 1.0
            y = labels[i : i + bs]
            if train:
                opt.zero_grad()
                loss = loss_fn(net(x), y)
                loss.backward()
                opt.step()
            else:
                with torch.no_grad():
                    logits = net(x)
                    loss_fn(logits, y)
                    logits.argmax(1)
        return a.images / (time.perf_counter() - start)

    epoch(True)  # warm-up
    train = epoch(True)
    epoch(False)
    evaluate = epoch(False)
    print(f"torch train {train:.0f} images/s evaluate {evaluate:.0f} images/s")


if __name__ == "__main__":
    main()
