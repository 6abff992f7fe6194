"""The soak benchmark's learner: a fit that takes FIT_SECONDS (default 5)
of wall time and returns the model moved a little, on a model of
SOAK_VALUES float32 values (default 1,000,000: 4 MB on the wire)."""
import os
import time

import numpy as np

FIT_SECONDS = float(os.environ.get("FIT_SECONDS", "5"))
VALUES = int(os.environ.get("SOAK_VALUES", "1000000"))


class Sleeper:
    def __init__(self, partition_id):
        self.partition_id = partition_id

    def get_parameters(self, config):
        return [np.zeros(VALUES, dtype=np.float32)]

    def fit(self, parameters, config):
        time.sleep(FIT_SECONDS)
        return [p + np.float32(0.001) for p in parameters], 10, {}

    def evaluate(self, parameters, config):
        return float(np.abs(parameters[0]).mean()), 10, {"accuracy": 0.5}


def make(partition_id, num_partitions):
    return Sleeper(partition_id)
