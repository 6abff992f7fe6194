"""Writes the PyTorch loss curves that crates/petal-nn/tests/torch_curve.rs
compares Petal's native engine with: the seed CNN on 3x32x32 inputs, from
weights and data both sides generate from the same integer formulas, 100
steps of batch 32, mean cross-entropy: SGD (lr 0.01, momentum 0.9), SGD
with weight decay 5e-4, or Adam (lr 0.001, weight decay 1e-4).

    python bench/torch_reference.py > crates/petal-nn/tests/fixtures/torch_curve.json
    python bench/torch_reference.py sgd-wd > crates/petal-nn/tests/fixtures/torch_curve_sgd_wd.json
    python bench/torch_reference.py adam > crates/petal-nn/tests/fixtures/torch_curve_adam.json
"""
import sys
import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

STEPS, BATCH, IMAGES = 100, 32, 64
LR, MOMENTUM = 0.01, 0.9


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def weight(j: int, i: int, fan_in: int) -> float:
    """Element i of parameter j: uniform in ±1/sqrt(fan_in) from an integer hash."""
    h = (i * 2654435761 + j * 40503 + 12345) % 2**32
    return (h / 2**32 * 2.0 - 1.0) / math.sqrt(fan_in)


def lcg_bytes(n: int, seed: int) -> list[int]:
    s, out = seed, []
    for _ in range(n):
        s = (s * 1664525 + 1013904223) % 2**32
        out.append(s >> 24)
    return out


def main() -> None:
    torch.set_num_threads(1)
    net = Net()
    with torch.no_grad():
        for j, (_, p) in enumerate(net.named_parameters()):
            fan_in = p.shape[1] * (p[0, 0].numel() if p.dim() == 4 else 1) if p.dim() > 1 else None
            if fan_in is None:  # a bias: the fan-in of its layer's weight
                w = list(net.parameters())[j - 1]
                fan_in = w[0].numel()
            values = [weight(j, i, fan_in) for i in range(p.numel())]
            p.copy_(torch.tensor(values, dtype=torch.float64).reshape(p.shape).float())
    pixels = torch.tensor(lcg_bytes(IMAGES * 3 * 32 * 32, 7), dtype=torch.uint8).reshape(IMAGES, 3, 32, 32)
    labels = torch.tensor([b % 10 for b in lcg_bytes(IMAGES, 11)])
    kind = sys.argv[1] if len(sys.argv) > 1 else "sgd"
    lr, momentum, wd = LR, MOMENTUM, 0.0
    if kind == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    elif kind == "sgd-wd":
        wd = 5e-4
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    else:
        lr, momentum, wd = 0.001, 0.0, 1e-4
        opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=wd, foreach=False)
    losses = []
    for t in range(STEPS):
        start = (t * BATCH) % IMAGES
        x = pixels[start : start + BATCH].float() / 127.5 - 1.0
        y = labels[start : start + BATCH]
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(json.dumps({
        "torch": torch.__version__, "steps": STEPS, "batch": BATCH, "images": IMAGES,
        "optimizer": "adam" if kind == "adam" else "sgd",
        "lr": lr, "momentum": momentum, "weight_decay": wd, "losses": losses,
    }, indent=1))


if __name__ == "__main__":
    main()
