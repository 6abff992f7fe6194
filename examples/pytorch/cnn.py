"""The seed's PyTorch CNN (Flower's "scaling on GPU with PyTorch" example)
as a Petal Python learner, on a GPU when there is one:

    petal run --learner python:examples/pytorch/cnn.py:make --python .venv/bin/python

The training and test code is the seed's: SGD (lr 0.001, momentum 0.9),
cross-entropy, batches of 32, images normalised to [-1, 1]. The server's
config overrides `local_epochs` (or `epochs`), `lr`, `momentum` and
`batch_size`, and `proximal_mu` > 0 adds FedProx's proximal term
mu/2 · ||w - w_global||² to the loss.

The data set is loaded once, at import, by the warm parent process, and
shared by every step's process (see data.py for PETAL_DATASET and
PETAL_DATA_DIR). The model is built, and the GPU touched, only inside
a step.
"""
import os
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data

X, Y, XT, YT = data.load()
THREADS = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)


class Net(nn.Module):
    def __init__(self, c=1, h=28, w=28, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(c, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        fh, fw = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(16 * fh * fw, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, classes)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def batches(x, y, batch_size, dev, shuffle_seed=None):
    order = np.arange(len(x))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(x))
    for i in range(0, len(x), batch_size):
        idx = order[i:i + batch_size]
        xb = torch.from_numpy(x[idx]).to(dev).float().div_(127.5).sub_(1.0)
        yb = torch.from_numpy(y[idx].astype(np.int64)).to(dev)
        yield xb, yb


def train(net, x, y, epochs, lr, momentum, batch_size, dev, mu=0.0, seed=0):
    """The seed's train(): SGD with momentum on cross-entropy (plus FedProx's term)."""
    criterion = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    global_params = [p.detach().clone() for p in net.parameters()] if mu > 0 else None
    net.train()
    total, count = 0.0, 0
    for epoch in range(epochs):
        for xb, yb in batches(x, y, batch_size, dev, shuffle_seed=seed + epoch):
            opt.zero_grad()
            loss = criterion(net(xb), yb)
            if global_params is not None:
                prox = sum(((p - g) ** 2).sum() for p, g in zip(net.parameters(), global_params))
                loss = loss + mu / 2 * prox
            loss.backward()
            opt.step()
            total += loss.item() * len(yb)
            count += len(yb)
    return total / max(count, 1)


def test(net, x, y, batch_size, dev):
    """The seed's test(): mean cross-entropy and accuracy."""
    criterion = nn.CrossEntropyLoss(reduction="sum")
    net.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for xb, yb in batches(x, y, batch_size, dev):
            out = net(xb)
            loss += criterion(out, yb).item()
            correct += (out.argmax(1) == yb).sum().item()
    return loss / len(x), correct / len(x)


class TorchLearner:
    """Flower NumPyClient's three methods around a torch model."""

    model = Net

    def __init__(self, partition_id, num_partitions):
        if THREADS:
            torch.set_num_threads(THREADS)
        self.dev = device()
        torch.manual_seed(0)
        c, h, w = X.shape[1:]
        self.net = self.model(c, h, w).to(self.dev)
        train_idx = data.partition(len(X), partition_id, num_partitions)
        test_idx = data.partition(len(XT), partition_id, num_partitions)
        self.x, self.y = X[train_idx], Y[train_idx]
        self.xt, self.yt = XT[test_idx], YT[test_idx]

    def get_parameters(self, config):
        return OrderedDict((k, v.cpu()) for k, v in self.net.state_dict().items())

    def set_parameters(self, parameters):
        keys = list(self.net.state_dict().keys())
        state = OrderedDict((k, torch.from_numpy(np.asarray(v))) for k, v in zip(keys, parameters))
        self.net.load_state_dict(state, strict=True)

    def fit(self, parameters, config):
        self.set_parameters(parameters)
        epochs = int(config.get("local_epochs", config.get("epochs", 1)))
        loss = train(self.net, self.x, self.y, epochs,
                     lr=float(config.get("lr", 0.001)),
                     momentum=float(config.get("momentum", 0.9)),
                     batch_size=int(config.get("batch_size", 32)), dev=self.dev,
                     mu=float(config.get("proximal_mu", 0.0)),
                     seed=int(config.get("server_round", 0)))
        return self.get_parameters(config), len(self.x), {"train_loss": loss}

    def evaluate(self, parameters, config):
        self.set_parameters(parameters)
        loss, acc = test(self.net, self.xt, self.yt, int(config.get("batch_size", 32)), self.dev)
        return loss, len(self.xt), {"accuracy": acc}


def make(partition_id, num_partitions):
    return TorchLearner(partition_id, num_partitions)
