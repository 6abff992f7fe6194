"""PyTorch side of bench/train_vs_torch.sh: the seed's CNN (conv 5x5 -> pool ->
conv 5x5 -> pool -> fc 120 -> fc 84 -> fc 10, ReLU; SGD momentum 0.9,
cross-entropy), trained on synthetic data of a given shape, one thread count.

    python torch_train.py --shape 3x32x32 --images 6400 --threads 1 [--batch-size 32]
        [--model examples/models/mlp.toml]   (a network file, via tools/torch_from_spec.py)

Prints one line: `torch train <N> images/s evaluate <N> images/s`.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self, c: int, h: int, w: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        fh, fw = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(16 * fh * fw, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


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
    if a.model:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
        from torch_from_spec import build

        net = build(a.model, (c, h, w), 10)
    else:
        net = Net(c, h, w)
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
