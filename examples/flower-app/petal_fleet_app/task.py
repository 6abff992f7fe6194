"""The seed CNN's parameters, by PyTorch name (as a state_dict would give them)."""
from collections import OrderedDict

import numpy as np

SHAPES = OrderedDict([
    ("conv1.weight", (6, 3, 5, 5)), ("conv1.bias", (6,)),
    ("conv2.weight", (16, 6, 5, 5)), ("conv2.bias", (16,)),
    ("fc1.weight", (120, 400)), ("fc1.bias", (120,)),
    ("fc2.weight", (84, 120)), ("fc2.bias", (84,)),
    ("fc3.weight", (10, 84)), ("fc3.bias", (10,)),
])


def initial_model() -> "OrderedDict[str, np.ndarray]":
    """PyTorch's default initialisation: uniform in +-1/sqrt(fan_in)."""
    rng = np.random.default_rng(0)
    out = OrderedDict()
    fan_in = 1
    for name, shape in SHAPES.items():
        if name.endswith(".weight"):
            fan_in = int(np.prod(shape[1:]))
        bound = 1.0 / np.sqrt(fan_in)
        out[name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
    return out
