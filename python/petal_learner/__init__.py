"""Petal's Python learners: bring your own model (PyTorch or anything
else) to a Petal client, unchanged.

A learner is any object with the three methods of Flower's ``NumPyClient``
(a ``flwr.client.NumPyClient`` subclass works as it is; ``flwr`` is never
required). Petal builds one per partition::

    petal client --learner python:my_learner.py:make --python .venv/bin/python

where ``my_learner.py`` defines ``make(partition_id, num_partitions)``.
:class:`Learner` is a typed base class with the contract in its
docstrings. The worker that runs learners inside Petal's client processes
is :mod:`petal_learner.worker`.
"""

from typing import Dict, List, Mapping, Sequence, Tuple, Union

import numpy as np

__all__ = ["Learner", "Parameters", "Scalar", "Config", "Metrics"]

#: A config or metric value, as Flower's ``Scalar``.
Scalar = Union[bool, int, float, str, bytes]
#: What the server sends with each instruction (``server_round``,
#: ``local_epochs``, ``lr``, ``batch_size``, ``proximal_mu``, ...).
Config = Dict[str, Scalar]
#: What a learner reports (``accuracy``, ``train_loss``, ...).
Metrics = Dict[str, Scalar]
#: Model parameters: arrays in ``state_dict`` order, or ``name -> array``.
#: Arrays may be NumPy arrays or PyTorch tensors, of any dtype.
Parameters = Union[Sequence[np.ndarray], Mapping[str, np.ndarray]]


class Learner:
    """What Petal asks of a learner (Flower's ``NumPyClient`` contract).

    Petal calls your factory as ``factory(partition_id=P,
    num_partitions=N)`` and then these methods. With ``--isolation
    subprocess`` (the default) each call runs in a fresh process forked
    from a parent that has imported your module: build the model and load
    the data in the factory or the methods, not at import time on a GPU
    (the parent must never touch the device). Data loaded into host memory
    at import time is shared by every step for free.
    """

    def get_parameters(self, config: Config) -> Parameters:
        """The current model, as a list of arrays (``state_dict`` order) or
        a dict ``name -> array`` (the names then reach checkpoints, Fleet
        ``ArrayRecord``s and logs)."""
        raise NotImplementedError

    def fit(self, parameters: List[np.ndarray], config: Config) -> Tuple[Parameters, int, Metrics]:
        """Trains from ``parameters`` (a list, in the order of
        :meth:`get_parameters`) on local data; returns the new parameters,
        the number of training examples (the weight in FedAvg) and metrics.
        ``config`` holds the server's keys by Flower's names, e.g.
        ``server_round``, ``local_epochs``, ``lr``, ``batch_size`` and
        ``proximal_mu`` (FedProx: add ``mu / 2 * ||w - w_global||^2`` to the
        loss)."""
        raise NotImplementedError

    def evaluate(self, parameters: List[np.ndarray], config: Config) -> Tuple[float, int, Metrics]:
        """Evaluates ``parameters`` on local test data; returns the loss, the
        number of examples and metrics (e.g. ``{"accuracy": 0.9}``)."""
        raise NotImplementedError
