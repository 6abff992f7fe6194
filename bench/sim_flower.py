"""Flower 1.41's simulation engine (Ray, PyTorch clients) on pfl-research's
cifar10_iid workload, scaled to this machine: the counterpart of
`petal simulate` in bench/sim_vs_flower.sh.

    python bench/sim_flower.py DATA_DIR ROUNDS [--clients 1000] [--per-client 50]
        [--fit 50] [--actors 2] [--eval-every 10]

1,000 clients of 50 CIFAR-10 images each (drawn without repeats from the
4,000 of DATA_DIR/cifar-10-batches-bin), 50 sampled per round, 1 local
epoch, batch 10, SGD lr 0.001 momentum 0.9 (a fresh optimizer per client),
the example's CNN, FedAvg, server-side evaluation on the 1,000 test images
at round 0, every 10 rounds and after the last; no federated evaluation.
Two Ray actors of one CPU each (one PyTorch thread each).

Prints one JSON line: seconds per round (from the end of round 1 to the
end of the last, so start-up is left out), wall seconds, final accuracy.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation

# The example's CNN, from the same network file Petal trains
# (examples/models/seed-cnn.toml); Ray's workers import it too.
TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools")
SEED_CNN = os.path.join(TOOLS, "..", "examples", "models", "seed-cnn.toml")
sys.path.insert(0, TOOLS)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [TOOLS, os.environ.get("PYTHONPATH")]))
from torch_from_spec import build  # noqa: E402


def Net():
    return build(SEED_CNN, (3, 32, 32), 10)


def read_bin(paths):
    raw = np.concatenate([np.fromfile(p, dtype=np.uint8).reshape(-1, 3073) for p in paths])
    labels = raw[:, 0].astype(np.int64)
    # ToTensor then Normalize((0.5,)*3, (0.5,)*3), as the seed example.
    x = raw[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0 * 2.0 - 1.0
    return torch.from_numpy(x), torch.from_numpy(labels)


def load(data_dir):
    d = os.path.join(data_dir, "cifar-10-batches-bin")
    train = read_bin([os.path.join(d, f"data_batch_{i}.bin") for i in range(1, 6)])
    test = read_bin([os.path.join(d, "test_batch.bin")])
    return train, test


def get_weights(net):
    return [v.cpu().numpy() for v in net.state_dict().values()]


def set_weights(net, weights):
    state = {k: torch.tensor(w) for k, w in zip(net.state_dict().keys(), weights)}
    net.load_state_dict(state, strict=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data_dir")
    ap.add_argument("rounds", type=int)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--per-client", type=int, default=50)
    ap.add_argument("--fit", type=int, default=50)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.001)
    a = ap.parse_args()
    start = time.time()
    (train_x, train_y), (test_x, test_y) = load(a.data_dir)

    def shares(pid):
        rng = np.random.default_rng(1_000_003 * (pid + 1))
        return rng.choice(len(train_y), size=a.per_client, replace=False)

    class Client(NumPyClient):
        def __init__(self, pid):
            self.idx = torch.from_numpy(shares(pid))

        def fit(self, parameters, config):
            torch.set_num_threads(1)
            net = Net()
            set_weights(net, parameters)
            opt = torch.optim.SGD(net.parameters(), lr=a.lr, momentum=0.9)
            x, y = train_x[self.idx], train_y[self.idx]
            order = torch.randperm(len(y))
            net.train()
            for s in range(0, len(y), a.batch_size):
                b = order[s : s + a.batch_size]
                opt.zero_grad()
                F.cross_entropy(net(x[b]), y[b]).backward()
                opt.step()
            return get_weights(net), len(y), {}

    def client_fn(context: Context):
        return Client(int(context.node_config["partition-id"])).to_client()

    ends = []

    def evaluate(rnd, parameters, config):
        if not (rnd == 0 or rnd % a.eval_every == 0 or rnd == a.rounds):
            return None
        net = Net()
        set_weights(net, parameters)
        net.eval()
        with torch.no_grad():
            logits = torch.cat([net(test_x[i : i + 500]) for i in range(0, len(test_y), 500)])
        loss = F.cross_entropy(logits, test_y).item()
        acc = (logits.argmax(1) == test_y).float().mean().item()
        return loss, {"accuracy": acc}

    class Timed(FedAvg):
        def aggregate_fit(self, rnd, results, failures):
            out = super().aggregate_fit(rnd, results, failures)
            ends.append(time.time())
            return out

    history = {}

    def server_fn(context: Context):
        strategy = Timed(
            fraction_fit=a.fit / a.clients,
            min_fit_clients=a.fit,
            fraction_evaluate=0.0,
            min_evaluate_clients=0,
            min_available_clients=a.clients,
            initial_parameters=ndarrays_to_parameters(get_weights(Net())),
            evaluate_fn=lambda rnd, p, c: record(rnd, evaluate(rnd, p, c)),
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=a.rounds))

    def record(rnd, result):
        if result is not None:
            history[rnd] = result
        return result

    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=a.clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": a.actors, "include_dashboard": False},
        },
    )
    wall = time.time() - start
    per_round = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else float("nan")
    last = history.get(max(history)) if history else (float("nan"), {"accuracy": float("nan")})
    print(
        json.dumps(
            {
                "rounds": len(ends),
                "seconds_per_round": per_round,
                "wall_seconds": wall,
                "accuracy": last[1]["accuracy"],
                "loss": last[0],
            }
        )
    )


if __name__ == "__main__":
    main()
