"""Federated learning from scratch (chapter 01).

* :mod:`~labsupport.fl.fedavg` -- FedAvg's parts: selection, local update, validation, averaging.
* :mod:`~labsupport.fl.simulation` -- the in-process server loop with history and checkpoint/resume.
* :mod:`~labsupport.fl.serialize` -- payloads as bytes on the wire.
* :mod:`~labsupport.fl.compression` -- top-k with error feedback, stochastic quantization.
* :mod:`~labsupport.fl.vectorized` -- many small-model clients in one ``torch.func.vmap`` step.
* :mod:`~labsupport.fl.decentralized` -- gossip over a graph, no server (D-PSGD).
* :mod:`~labsupport.fl.flower` -- the Flower app (``flower_app/``) in Flower's Ray simulation.
* :mod:`~labsupport.fl.deployment` -- a SuperLink and SuperNodes as real processes on loopback.

The last two import Flower, so they are imported from their modules, not re-exported here.
"""

from .fedavg import (
    StateDict,
    UpdateRejected,
    aggregate,
    client_seed,
    clone_state,
    local_update,
    mix_states,
    num_selected,
    select_clients,
    validate_update,
)
from .serialize import deserialize, payload_nbytes, serialize
from .simulation import (
    Client,
    DataClient,
    FedAvgConfig,
    FedAvgSimulation,
    History,
    RoundRecord,
    fedavg_aggregator,
)

__all__ = [
    "Client",
    "DataClient",
    "FedAvgConfig",
    "FedAvgSimulation",
    "History",
    "RoundRecord",
    "StateDict",
    "UpdateRejected",
    "aggregate",
    "client_seed",
    "clone_state",
    "deserialize",
    "fedavg_aggregator",
    "local_update",
    "mix_states",
    "num_selected",
    "payload_nbytes",
    "select_clients",
    "serialize",
    "validate_update",
]
