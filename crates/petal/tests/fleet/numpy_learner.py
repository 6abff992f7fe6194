"""A Flower user's NumPyClient, unchanged, for a Petal node under a real
SuperLink: the CNN's arrays (by state_dict name), "trained" by moving
them towards a per-partition target."""
from collections import OrderedDict

import flwr
import numpy as np

from petal_fleet_app.task import SHAPES, initial_model


class Client(flwr.client.NumPyClient):
    def __init__(self, partition_id):
        self.partition_id = partition_id

    def get_parameters(self, config):
        return initial_model()

    def fit(self, parameters, config):
        assert len(parameters) == len(SHAPES)
        for p, shape in zip(parameters, SHAPES.values()):
            assert p.shape == shape and p.dtype == np.float32, (p.shape, p.dtype)
        lr = float(config.get("lr", 0.1))
        target = float(self.partition_id + 1)
        out = OrderedDict((name, (p + lr * (target - p)).astype(np.float32))
                          for name, p in zip(SHAPES, parameters))
        return out, 10 * (self.partition_id + 1), {"train_loss": 1.0 / target}

    def evaluate(self, parameters, config):
        loss = float(np.mean([np.abs(p).mean() for p in parameters]))
        return loss, 5, {"accuracy": 0.5}


def make(partition_id, num_partitions):
    return Client(partition_id)
