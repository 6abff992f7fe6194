"""A learner whose get_parameters always raises (tests/edges.rs)."""


class NoModel:
    def get_parameters(self, config):
        raise RuntimeError("this learner has no model")

    def fit(self, parameters, config):
        return parameters, 1, {}

    def evaluate(self, parameters, config):
        return 0.0, 1, {}


def make(partition_id, num_partitions):
    return NoModel()
