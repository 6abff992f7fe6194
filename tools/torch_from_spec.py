"""PyTorch's twin of a Petal network file (`--model FILE`, examples/models):

    from torch_from_spec import build
    net = build("examples/models/seed-cnn.toml", input_shape=(3, 32, 32), classes=10)
    net.load_state_dict(petal_checkpoint_state_dict, strict=True)

`build` returns a `torch.nn.Module` whose parameters have the names and
layouts Petal gives them (`fc1.weight` is [out, in], as PyTorch's), so a
Petal checkpoint loads with `strict=True` and gives the same logits.
`load_checkpoint(path)` reads a Petal `checkpoint.safetensors` into a
state dict without the `safetensors` package.
"""
import json
import struct
import tomllib

import torch
import torch.nn as nn
import torch.nn.functional as F


class SpecNet(nn.Module):
    """The layers of a network file, applied in order."""

    def __init__(self, layers, input_shape, classes):
        super().__init__()
        c, h, w = input_shape
        self.steps = []
        for layer in layers:
            kind = layer["type"]
            out = layer.get("out")
            if out == "classes":
                out = classes
            name = layer.get("name")
            if kind == "conv2d":
                k, pad, stride = layer["kernel"], layer.get("padding", 0), layer.get("stride", 1)
                setattr(self, name, nn.Conv2d(c, out, k, stride=stride, padding=pad))
                c, h, w = out, (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
            elif kind == "linear":
                setattr(self, name, nn.Linear(c * h * w, out))
                c, h, w = out, 1, 1
            elif kind in ("max_pool2d", "avg_pool2d"):
                h, w = h // 2, w // 2
            elif kind == "adaptive_avg_pool2d":
                h, w = 1, 1
            elif kind not in ("relu", "flatten"):
                raise ValueError(f"layer type {kind!r} is not supported")
            self.steps.append((kind, name))

    def forward(self, x):
        for kind, name in self.steps:
            if kind in ("conv2d",):
                x = getattr(self, name)(x)
            elif kind == "linear":
                x = getattr(self, name)(torch.flatten(x, 1))
            elif kind == "relu":
                x = F.relu(x)
            elif kind == "max_pool2d":
                x = F.max_pool2d(x, 2, 2)
            elif kind == "avg_pool2d":
                x = F.avg_pool2d(x, 2, 2)
            elif kind == "adaptive_avg_pool2d":
                x = F.adaptive_avg_pool2d(x, 1)
            elif kind == "flatten":
                x = torch.flatten(x, 1)
        return x


def build(spec_path, input_shape, classes):
    """The torch.nn.Module of the network file at `spec_path`."""
    with open(spec_path, "rb") as f:
        spec = tomllib.load(f)
    return SpecNet(spec["layer"], tuple(input_shape), classes)


def load_checkpoint(path):
    """The model tensors of a Petal checkpoint.safetensors, by name."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    dtypes = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "I64": torch.int64}
    state = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        t = torch.frombuffer(bytearray(body[a:b]), dtype=dtypes[meta["dtype"]])
        state[name] = t.reshape(meta["shape"]).clone()
    return state
