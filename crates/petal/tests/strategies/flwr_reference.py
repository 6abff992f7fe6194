"""Runs flwr 1.41's own strategies on seeded inputs and writes what they
produce, for crates/petal/tests/strategies.rs to compare Petal's with.

    python flwr_reference.py OUT.json

Strategies come from flwr/serverapp/strategy (Flower's current API, with
its defaults); the differential-privacy wrappers from flwr/server/strategy
around its FedAvg (noise_multiplier 0, so the clipping and the adaptive
norm are exact). Each case runs 3 rounds; every round's clients send
`current + noise + offset` with random example counts and metrics, and the
next round starts from flwr's output.
"""
import json
import sys

import numpy as np
from flwr.supercore.task_identity import TaskIdentity

TaskIdentity.run_id = 1
TaskIdentity.task_id = 1
TaskIdentity.node_id = 0

from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.common import (Code, FitRes, Status, ndarrays_to_parameters,  # noqa: E402
                         parameters_to_ndarrays)
from flwr.server.strategy import FedAvg as LegacyFedAvg  # noqa: E402
from flwr.server.strategy import (  # noqa: E402
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from flwr.serverapp import strategy as S  # noqa: E402
from flwr.supercore.differential_privacy import compute_clip_model_update  # noqa: E402

SHAPES = {"conv.weight": (4, 3), "conv.bias": (3,), "fc.weight": (2, 2, 2)}
ROUNDS = 3


def arrays(rng, scale=1.0):
    return {k: (rng.normal(size=s) * scale).astype(np.float32) for k, s in SHAPES.items()}


def client_results(rng, current, n, spread):
    out = []
    for i in range(n):
        off = rng.normal() * spread
        a = {k: (v + rng.normal(size=v.shape) * 0.1 + off).astype(np.float32)
             for k, v in current.items()}
        out.append({
            "arrays": a,
            "num_examples": int(rng.integers(10, 100)),
            "metrics": {"train_loss": float(rng.uniform(0.1, 2.0)),
                        "accuracy": float(rng.uniform(0, 1))},
        })
    return out


def message(r, extra_metrics=None):
    metrics = {"num-examples": r["num_examples"], **r["metrics"], **(extra_metrics or {})}
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in r["arrays"].items()}),
        "metrics": MetricRecord(metrics),
    })
    return Message(content, dst_node_id=1, message_type="train")


def tolist(d):
    return {k: np.asarray(v, dtype=np.float64).tolist() for k, v in d.items()}


def serverapp_case(name, make, params, n, seed, spread=0.5):
    rng = np.random.default_rng(seed)
    s = make()
    current = arrays(rng)
    case = {"name": name, "params": params, "kind": "serverapp", "initial": tolist(current),
            "rounds": []}
    for rnd in range(1, ROUNDS + 1):
        results = client_results(rng, current, n, spread)
        # What configure_train would record.
        if hasattr(s, "current_arrays"):
            if isinstance(s, (S.FedAvgM, S.QFedAvg)):
                s.current_arrays = ArrayRecord({k: Array(v) for k, v in current.items()})
            else:
                s.current_arrays = {k: v for k, v in current.items()}
        out, metrics = s.aggregate_train(rnd, [message(r) for r in results])
        out_np = {k: out[k].numpy() for k in SHAPES} if out is not None else None
        case["rounds"].append({
            "current": tolist(current),
            "results": [{**r, "arrays": tolist(r["arrays"])} for r in results],
            "expected": tolist(out_np) if out_np is not None else None,
            "metrics": dict(metrics) if metrics is not None else None,
        })
        if out_np is not None:
            current = {k: v.astype(np.float32) for k, v in out_np.items()}
    return case


def legacy_fit_res(r, norm_bit=None):
    ndarrays = [r["arrays"][k] for k in SHAPES]
    metrics = dict(r["metrics"])
    if norm_bit is not None:
        metrics["norm_bit"] = norm_bit
    return (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(ndarrays),
                         r["num_examples"], metrics))


def dp_case(name, wrapper, params, n, seed):
    rng = np.random.default_rng(seed)
    w = wrapper(LegacyFedAvg())
    current = arrays(rng)
    case = {"name": name, "params": params, "kind": "dp", "initial": tolist(current), "rounds": []}
    for rnd in range(1, ROUNDS + 1):
        results = client_results(rng, current, n, spread=2.0)
        bits = [bool(rng.integers(0, 2)) for _ in results]
        if hasattr(w, "current_round_params"):
            w.current_round_params = [current[k] for k in SHAPES]
        norm_before = float(w.clipping_norm)
        client_side = "ClientSide" in type(w).__name__
        fit = [legacy_fit_res(r, b if "Adaptive" in type(w).__name__ and client_side else None)
               for r, b in zip(results, bits)]
        params_out, _ = w.aggregate_fit(rnd, fit, [])
        out = parameters_to_ndarrays(params_out)
        case["rounds"].append({
            "current": tolist(current),
            "results": [{**r, "arrays": tolist(r["arrays"]),
                         "norm_bit": b} for r, b in zip(results, bits)],
            "expected": tolist(dict(zip(SHAPES, out))),
            "clipping_norm_before": norm_before,
            "clipping_norm_after": float(w.clipping_norm),
        })
        current = {k: v.astype(np.float32) for k, v in zip(SHAPES, out)}
    return case


def client_clip_cases(seed):
    """Flower's fixedclipping_mod arithmetic on its own."""
    rng = np.random.default_rng(seed)
    cases = []
    for norm in [0.05, 0.5, 50.0]:
        base = arrays(rng)
        new = {k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in base.items()}
        p1 = [new[k].copy() for k in SHAPES]
        compute_clip_model_update(p1, [base[k] for k in SHAPES], norm)
        cases.append({"clipping_norm": norm, "base": tolist(base), "new": tolist(new),
                      "expected": tolist(dict(zip(SHAPES, p1)))})
    return cases


def main():
    cases = [
        serverapp_case("fedavg", S.FedAvg, {}, 5, 1),
        serverapp_case("fedprox", lambda: S.FedProx(proximal_mu=0.1), {"proximal_mu": 0.1}, 5, 2),
        serverapp_case("fedavgm", S.FedAvgM, {}, 5, 3),
        serverapp_case("fedavgm", lambda: S.FedAvgM(server_learning_rate=0.5, server_momentum=0.9),
                       {"server_learning_rate": 0.5, "server_momentum": 0.9}, 5, 4),
        serverapp_case("fedadagrad", S.FedAdagrad, {}, 5, 5),
        serverapp_case("fedadam", S.FedAdam, {}, 5, 6),
        serverapp_case("fedyogi", S.FedYogi, {}, 5, 7),
        serverapp_case("fedmedian", S.FedMedian, {}, 6, 8),
        serverapp_case("fedtrimmedavg", S.FedTrimmedAvg, {}, 6, 9),
        serverapp_case("krum", lambda: S.Krum(num_malicious_nodes=1), {"num_malicious_nodes": 1},
                       6, 10),
        serverapp_case("multikrum", lambda: S.MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3),
                       {"num_malicious_nodes": 1, "num_nodes_to_select": 3}, 6, 11),
        serverapp_case("bulyan", lambda: S.Bulyan(num_malicious_nodes=1), {"num_malicious_nodes": 1},
                       7, 12),
        serverapp_case("qfedavg", lambda: S.QFedAvg(client_learning_rate=0.1),
                       {"client_learning_rate": 0.1}, 5, 13),
        dp_case("server-fixed", lambda s: DifferentialPrivacyServerSideFixedClipping(
            s, noise_multiplier=0.0, clipping_norm=1.5, num_sampled_clients=5),
            {"clipping_norm": 1.5}, 5, 14),
        dp_case("client-fixed", lambda s: DifferentialPrivacyClientSideFixedClipping(
            s, noise_multiplier=0.0, clipping_norm=1.5, num_sampled_clients=5),
            {"clipping_norm": 1.5}, 5, 15),
        dp_case("server-adaptive", lambda s: DifferentialPrivacyServerSideAdaptiveClipping(
            s, noise_multiplier=0.0, num_sampled_clients=5), {}, 5, 16),
        dp_case("client-adaptive", lambda s: DifferentialPrivacyClientSideAdaptiveClipping(
            s, noise_multiplier=0.0, num_sampled_clients=5), {}, 5, 17),
    ]
    out = {"shapes": {k: list(v) for k, v in SHAPES.items()}, "cases": cases,
           "client_clip": client_clip_cases(18)}
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
