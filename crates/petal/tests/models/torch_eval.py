"""Evaluates a Petal checkpoint with PyTorch (tools/torch_from_spec.py) on
the test split of a data set, normalised as Petal normalises it; prints
{"accuracy": ..., "loss": ...} (mean cross-entropy).

    python torch_eval.py TOOLS_DIR SPEC CHECKPOINT KIND DATA_DIR [LABEL_COLUMN]

KIND: npz (uint8 scaled to [0, 1], or float32 as is), csv (standardised
with train.csv's statistics), cifar10 (Normalize(0.5, 0.5)).
"""
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

tools, spec, checkpoint, kind, data = sys.argv[1:6]
sys.path.insert(0, tools)
from torch_from_spec import build, load_checkpoint  # noqa: E402

if kind == "npz":
    t = np.load(os.path.join(data, "test.npz"))
    x, y = t["x"], t["y"]
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if x.ndim == 2:
        x = x.reshape(len(x), -1, 1, 1)
    classes = int(max(y.max(), np.load(os.path.join(data, "train.npz"))["y"].max())) + 1
elif kind == "csv":
    label = sys.argv[6]

    def read(name):
        rows = np.genfromtxt(os.path.join(data, name), delimiter=",", names=True)
        cols = [c for c in rows.dtype.names if c != label]
        return np.stack([rows[c] for c in cols], 1).astype(np.float32), rows[label].astype(np.int64)

    tr, tr_y = read("train.csv")
    x, y = read("test.csv")
    mean = tr.astype(np.float64).mean(0)
    std = tr.astype(np.float64).std(0)
    std[std == 0] = 1.0
    x = ((x / std.astype(np.float32)) - (mean / std).astype(np.float32)).reshape(len(x), -1, 1, 1)
    classes = int(max(y.max(), tr_y.max())) + 1
else:
    raw = np.fromfile(os.path.join(data, "cifar-10-batches-bin", "test_batch.bin"), np.uint8)
    raw = raw.reshape(-1, 3073)
    y = raw[:, 0].astype(np.int64)
    x = raw[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 127.5 - 1.0
    classes = 10

net = build(spec, x.shape[1:], classes)
net.load_state_dict(load_checkpoint(checkpoint), strict=True)
net.eval()
with torch.no_grad():
    logits = net(torch.from_numpy(np.ascontiguousarray(x)))
    loss = F.cross_entropy(logits, torch.from_numpy(y)).item()
acc = (logits.argmax(1).numpy() == y).mean()
print(json.dumps({"accuracy": float(acc), "loss": loss}))
