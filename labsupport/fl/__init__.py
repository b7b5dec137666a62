"""Federated learning from scratch (chapter 01).

* :mod:`~labsupport.fl.fedavg` -- FedAvg's parts: selection, local update, validation, averaging.
* :mod:`~labsupport.fl.simulation` -- the in-process server loop with history and checkpoint/resume.
* :mod:`~labsupport.fl.serialize` -- payloads as bytes on the wire.
"""

from .fedavg import (
    StateDict,
    UpdateRejected,
    aggregate,
    client_seed,
    clone_state,
    local_update,
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
    "payload_nbytes",
    "select_clients",
    "serialize",
    "validate_update",
]
