"""FedAvg (Flower's Message API) over whatever nodes join: Python
SuperNodes and Petal nodes alike. After each training round it checks the
aggregate against NumPy's example-weighted mean of the replies and prints
`PETAL-CHECK round R: N replies, max |aggregate - numpy| = D`, after each
round `PETAL-ROUND R S` (its wall time in seconds, for bench/fleet_vs_flower.py);
at the end `PETAL-DONE` and the history of losses."""
import time
from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from .task import initial_model

app = ServerApp()


class CheckedFedAvg(FedAvg):
    def configure_train(self, server_round, arrays, config, grid):
        self.round_started = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        metrics = super().aggregate_evaluate(server_round, replies)
        took = time.perf_counter() - self.round_started
        print(f"PETAL-ROUND {server_round} {took:.3f}", flush=True)
        return metrics

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        ok = [r for r in replies if not r.has_error()]
        weights = np.array([r.content["metrics"]["num-examples"] for r in ok], dtype=np.float64)
        worst = 0.0
        for name, agg in arrays.items():
            stack = np.stack([r.content["arrays"][name].numpy().astype(np.float64) for r in ok])
            want = np.tensordot(weights / weights.sum(), stack, axes=1)
            worst = max(worst, float(np.max(np.abs(agg.numpy() - want))))
        errors = [r.error.reason for r in replies if r.has_error()]
        print(f"PETAL-CHECK round {server_round}: {len(ok)} replies, "
              f"{len(errors)} errors, max |aggregate - numpy| = {worst:.3e} {errors}", flush=True)
        return arrays, metrics


@app.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config["num-server-rounds"])
    n = int(context.run_config["min-nodes"])
    strategy = CheckedFedAvg(min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n)
    initial = ArrayRecord(OrderedDict((k, Array(v)) for k, v in initial_model().items()))
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=rounds,
        timeout=600,
        train_config=ConfigRecord({"lr": 0.01}),
    )
    print(f"PETAL-DONE {result.evaluate_metrics_clientapp}", flush=True)
