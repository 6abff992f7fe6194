"""Loads a Petal checkpoint of examples/pytorch/bn_cnn.py into PyTorch with
load_state_dict(strict=True) and checks the accuracy Petal reported.

    python load_checkpoint.py CHECKPOINT ACCURACY   (run in examples/pytorch)

The safetensors file is read with json and NumPy (no safetensors package).
"""
import json
import struct
import sys

import numpy as np
import torch

import bn_cnn
import cnn

DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64,
          "I32": np.int32, "U8": np.uint8, "BOOL": np.bool_}

path, reported = sys.argv[1], float(sys.argv[2])
raw = open(path, "rb").read()
(n,) = struct.unpack("<Q", raw[:8])
header = json.loads(raw[8:8 + n])
data = raw[8 + n:]
state = {}
for name, meta in header.items():
    if name == "__metadata__":
        continue
    a, b = meta["data_offsets"]
    arr = np.frombuffer(data[a:b], dtype=DTYPES[meta["dtype"]]).reshape(meta["shape"])
    state[name] = torch.from_numpy(arr.copy())
net = bn_cnn.BnNet()
net.load_state_dict(state, strict=True)
assert state["bn1.num_batches_tracked"].dtype == torch.int64
# Each client evaluates its half of the test set; together, the whole set.
loss, acc = cnn.test(net, cnn.XT, cnn.YT, 32, torch.device("cpu"))
assert abs(acc - reported) < 0.002, (acc, reported)
print(f"strict load ok, accuracy {acc:.4f} (Petal reported {reported:.4f})")
