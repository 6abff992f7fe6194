"""Flower's side of bench/scale_vs_flower.sh: a legacy gRPC server with
FedAvg and no-op NumPy clients (they return the model they receive), the
seed CNN's shapes, every client training and evaluating every round.

    flower_noop.py server ADDRESS CLIENTS ROUNDS OUT.json
    flower_noop.py client ADDRESS

The server writes {"round_starts": [...], "end": t} (time.time() at each
round's configure_fit, and after the last round).
"""
import json
import sys
import time

import flwr as fl
import numpy as np

SHAPES = [(6, 3, 5, 5), (6,), (16, 6, 5, 5), (16,), (120, 400), (120,), (84, 120), (84,), (10, 84), (10,)]


class NoopClient(fl.client.NumPyClient):
    def get_parameters(self, config):
        return [np.zeros(s, dtype=np.float32) for s in SHAPES]

    def fit(self, parameters, config):
        return parameters, 500, {}

    def evaluate(self, parameters, config):
        return 0.0, 100, {"accuracy": 0.0}


class Timed(fl.server.strategy.FedAvg):
    starts: list = []

    def configure_fit(self, server_round, parameters, client_manager):
        self.starts.append(time.time())
        return super().configure_fit(server_round, parameters, client_manager)


def main() -> None:
    if sys.argv[1] == "client":
        fl.client.start_client(server_address=sys.argv[2], client=NoopClient().to_client())
        return
    address, n, rounds, out = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    strategy = Timed(
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=n,
        min_evaluate_clients=n,
        min_available_clients=n,
    )
    fl.server.start_server(
        server_address=address,
        config=fl.server.ServerConfig(num_rounds=rounds, round_timeout=600),
        strategy=strategy,
    )
    with open(out, "w") as f:
        json.dump({"round_starts": Timed.starts, "end": time.time()}, f)


if __name__ == "__main__":
    main()
