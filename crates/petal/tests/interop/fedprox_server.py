"""Flower's legacy gRPC server with its FedProx strategy; one round; writes
how far the aggregate moved from the initial model (L2 norm).

Usage: fedprox_server.py ADDRESS PROXIMAL_MU OUT_JSON
"""
import json
import sys

import flwr as fl
import numpy as np
from flwr.common import parameters_to_ndarrays

address, mu, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
moved = {}


class Recording(fl.server.strategy.FedProx):
    def configure_fit(self, server_round, parameters, client_manager):
        moved["initial"] = [a.copy() for a in parameters_to_ndarrays(parameters)]
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        moved["failures"] = len(failures)
        params, metrics = super().aggregate_fit(server_round, results, failures)
        new = parameters_to_ndarrays(params)
        moved["distance"] = float(np.sqrt(sum(((a - b) ** 2).sum()
                                              for a, b in zip(new, moved["initial"]))))
        return params, metrics


strategy = Recording(
    proximal_mu=mu,
    min_fit_clients=2,
    min_available_clients=2,
    fraction_evaluate=0.0,
    on_fit_config_fn=lambda r: {"local_epochs": 3, "lr": 0.05, "server_round": r},
)
fl.server.start_server(
    server_address=address,
    config=fl.server.ServerConfig(num_rounds=1, round_timeout=300),
    strategy=strategy,
)
with open(out, "w") as f:
    json.dump({"distance": moved.get("distance"), "failures": moved.get("failures")}, f)
