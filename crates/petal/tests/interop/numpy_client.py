"""A Flower NumPyClient (legacy API) that logs what it receives and returns.

Usage: numpy_client.py SERVER CLIENT_ID LOG_PATH [ROOT_CERTIFICATES]
With ROOT_CERTIFICATES (a CA's PEM file), the client connects with TLS.
"""
import json
import sys
from pathlib import Path

import flwr as fl
import numpy as np

server, cid, log_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(cid)
log = []


def dump():
    with open(log_path, "w") as f:
        json.dump(log, f)


class Client(fl.client.NumPyClient):
    def get_parameters(self, config):
        return [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, dtype=np.float32)]

    def fit(self, parameters, config):
        out = [p + rng.normal(size=p.shape).astype(np.float32) for p in parameters]
        n = 10 * (cid + 1) + int(config.get("server_round", 0))
        log.append({
            "round": int(config["server_round"]),
            "received": [p.tolist() for p in parameters],
            "returned": [p.tolist() for p in out],
            "num_examples": n,
            "dtypes": [str(p.dtype) for p in parameters],
        })
        dump()
        return out, n, {}

    def evaluate(self, parameters, config):
        loss = float(sum(np.abs(p).mean() for p in parameters))
        return loss, 5 + cid, {"accuracy": 0.25 * (cid + 1)}


root = Path(sys.argv[4]).read_bytes() if len(sys.argv) > 4 else None
fl.client.start_numpy_client(server_address=server, client=Client(), root_certificates=root)
dump()
