"""Toy learners for petal-python's tests: NumPy only (and flwr for the
NumPyClient one). `make` behaves as its `partition_id` and the config ask."""
import os
import signal
import sys
import time

import numpy as np


class Toy:
    def __init__(self, partition_id, num_partitions):
        self.partition_id = partition_id
        self.calls = 0
        self.w = np.zeros(3, dtype=np.float32) + partition_id
        self.step = np.int64(0)
        self.h = np.array([0.5, -1.0], dtype=np.float16)

    def get_parameters(self, config):
        return {"w": self.w, "bn.num_batches_tracked": np.array(self.step), "h": self.h}

    def _act(self, config):
        act = config.get("act", "")
        if act == "raise":
            raise ValueError("the learner refuses this step")
        if act == "exit":
            os._exit(3)
        if act == "segfault":
            os.kill(os.getpid(), signal.SIGSEGV)
        if act == "hang":
            time.sleep(3600)
        if act == "print":
            for i in range(2000):
                print(f"noise {i} " + "x" * 100)
            sys.stdout.flush()
            os.write(1, b"raw bytes on fd 1\n")

    def fit(self, parameters, config):
        self._act(config)
        self.calls += 1
        w, step, h = parameters
        assert w.dtype == np.float32 and step.dtype == np.int64 and step.shape == ()
        assert h.dtype == np.float16
        w = w + 1
        out = {"w": w, "bn.num_batches_tracked": np.array(step + 1), "h": h * 2}
        metrics = {"pid": os.getpid(), "parent": os.getppid(), "calls": self.calls,
                   "lr": float(config.get("lr", -1.0)), "tag": config.get("tag", "")}
        return out, 10 + self.partition_id, metrics

    def evaluate(self, parameters, config):
        self._act(config)
        w = parameters[0]
        return float(w.sum()), 5, {"accuracy": 0.25}


def make(partition_id, num_partitions):
    return Toy(partition_id, num_partitions)


def list_params(partition_id, num_partitions):
    """Returns parameters as a list (no names)."""

    class Plain(Toy):
        def get_parameters(self, config):
            return [self.w, np.array(self.step), self.h]

    return Plain(partition_id, num_partitions)


def broken(partition_id, num_partitions):
    raise RuntimeError("cannot build this learner")


def flower(partition_id, num_partitions):
    """A real flwr NumPyClient subclass, unchanged."""
    import flwr

    class C(flwr.client.NumPyClient):
        def get_parameters(self, config):
            return [np.ones(2, dtype=np.float32)]

        def fit(self, parameters, config):
            return [p * 3 for p in parameters], 4, {"flower": True}

        def evaluate(self, parameters, config):
            return 0.5, 4, {"accuracy": 1.0}

    return C()
