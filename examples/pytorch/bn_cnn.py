"""The seed's CNN with BatchNorm after each convolution, as a Petal Python
learner: its state_dict holds running statistics and int64
`num_batches_tracked` buffers, which Petal keeps in their dtypes,
aggregates and checkpoints under these names (a Petal checkpoint loads
with `load_state_dict(strict=True)`).

    petal run --learner python:examples/pytorch/bn_cnn.py:make --python .venv/bin/python
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import cnn


class BnNet(nn.Module):
    def __init__(self, c=1, h=28, w=28, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(c, 6, 5)
        self.bn1 = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.bn2 = nn.BatchNorm2d(16)
        fh, fw = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(16 * fh * fw, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, classes)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class BnLearner(cnn.TorchLearner):
    model = BnNet


def make(partition_id, num_partitions):
    return BnLearner(partition_id, num_partitions)
