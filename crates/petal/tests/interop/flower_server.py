"""Flower's legacy gRPC server with FedAvg; writes its History as JSON.

Usage: flower_server.py ADDRESS ROUNDS HISTORY_PATH [CERT_DIR]
With CERT_DIR (examples/tls/make-certs.sh), the server uses TLS:
certificates=(ca.crt, server.pem, server.key).
"""
import json
import sys
from pathlib import Path

import flwr as fl

address, rounds, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
certificates = None
if len(sys.argv) > 4:
    certs = Path(sys.argv[4])
    certificates = tuple(
        (certs / name).read_bytes() for name in ("ca.crt", "server.pem", "server.key")
    )


def weighted(metrics):
    total = sum(n for n, _ in metrics)
    return {"accuracy": sum(n * m["accuracy"] for n, m in metrics) / total}


strategy = fl.server.strategy.FedAvg(
    min_fit_clients=2,
    min_evaluate_clients=2,
    min_available_clients=2,
    evaluate_metrics_aggregation_fn=weighted,
    on_fit_config_fn=lambda r: {"epochs": 1, "lr": 0.05, "server_round": r},
)
history = fl.server.start_server(
    server_address=address,
    config=fl.server.ServerConfig(num_rounds=rounds, round_timeout=300),
    strategy=strategy,
    certificates=certificates,
)
with open(out, "w") as f:
    json.dump({
        "losses_distributed": history.losses_distributed,
        "metrics_distributed": {k: v for k, v in history.metrics_distributed.items()},
    }, f)
