"""The seed's Python system, for comparison with Petal: Flower 1.41's
legacy gRPC server with FedAvg, and Flower NumPyClients that run every
train and test step in a spawned process (a fresh interpreter importing
torch and loading the data, so the step's GPU memory is returned when it
ends), with the seed's PyTorch code (examples/pytorch/cnn.py's Net, train
and test, unchanged).

    python seed_system.py server ADDRESS NBMINCLIENTS NBFITCLIENTS NBROUNDS
    python seed_system.py client ADDRESS PARTITION NBCLIENTS

Each step prints `SEED-STEP fit|evaluate call_ms=… learner_ms=…`: the
client's time for the call and the spawned process's time in the seed's
train()/test() (what is left is the spawn, imports, data and transfer).
"""
import multiprocessing as mp
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "../../examples/pytorch"))


def step(kind, partition, num_partitions, parameters, config, out):
    """One train or test step in a fresh process (the seed's design)."""
    import numpy as np
    import torch

    import cnn

    learner = cnn.make(partition, num_partitions)
    start = time.perf_counter()
    if kind == "fit":
        params, n, metrics = learner.fit(parameters, config)
        result = ([np.asarray(v) for v in params.values()], n, metrics)
    else:
        result = learner.evaluate(parameters, config)
    out.put((result, time.perf_counter() - start))


def run_step(kind, partition, num_partitions, parameters, config):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start = time.perf_counter()
    p = ctx.Process(target=step, args=(kind, partition, num_partitions, parameters, config, q))
    p.start()
    result, learner_s = q.get()
    p.join()
    call_s = time.perf_counter() - start
    print(f"SEED-STEP {kind} call_ms={call_s * 1000:.1f} learner_ms={learner_s * 1000:.1f}",
          flush=True)
    return result


def client(address, partition, num_partitions):
    import flwr as fl

    class SeedClient(fl.client.NumPyClient):
        def get_parameters(self, config):
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            p = ctx.Process(target=initial, args=(q,))
            p.start()
            params = q.get()
            p.join()
            return params

        def fit(self, parameters, config):
            return run_step("fit", partition, num_partitions, parameters, config)

        def evaluate(self, parameters, config):
            return run_step("evaluate", partition, num_partitions, parameters, config)

    fl.client.start_client(server_address=address, client=SeedClient().to_client())


def initial(q):
    import numpy as np
    import torch

    import cnn

    torch.manual_seed(0)
    c, h, w = cnn.X.shape[1:]
    q.put([v.cpu().numpy() for v in cnn.Net(c, h, w).state_dict().values()])


def server(address, min_clients, fit_clients, rounds):
    import flwr as fl

    def weighted(metrics):
        total = sum(n for n, _ in metrics)
        return {"accuracy": sum(n * m["accuracy"] for n, m in metrics) / total}

    strategy = fl.server.strategy.FedAvg(
        fraction_fit=0.0,
        min_fit_clients=fit_clients,
        fraction_evaluate=1.0,
        min_evaluate_clients=min_clients,
        min_available_clients=min_clients,
        evaluate_metrics_aggregation_fn=weighted,
        on_fit_config_fn=lambda r: {"server_round": r, "epochs": 1, "lr": 0.001,
                                    "batch_size": 32},
    )
    h = fl.server.start_server(
        server_address=address,
        config=fl.server.ServerConfig(num_rounds=rounds),
        strategy=strategy,
    )
    acc = h.metrics_distributed.get("accuracy", [])
    print(f"SEED-RESULT accuracy={acc[-1][1] if acc else float('nan'):.4f}", flush=True)


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "server":
        server(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
