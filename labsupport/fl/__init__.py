"""Federated learning from scratch: one vocabulary for every chapter's runs.

* :mod:`~labsupport.fl.state` -- state dicts: copy, validate, the weighted average (FedAvg's step).
* :mod:`~labsupport.fl.selection` -- client selection and derived seeds.
* :mod:`~labsupport.fl.clients` -- ``TrainConfig``, ``RoundContext``, ``FitReply``/``Rejection``,
  the ``Client`` protocol and the honest ``DataClient``.
* :mod:`~labsupport.fl.transforms` -- the update pipeline (compression, DP clipping/noise, masking).
* :mod:`~labsupport.fl.aggregators` -- stateful aggregators and the sample-count policy.
* :mod:`~labsupport.fl.history` -- one ``History`` for server, gossip and Flower runs.
* :mod:`~labsupport.fl.server` -- the in-process FedAvg server with checkpoint/resume.
* :mod:`~labsupport.fl.serialize`, :mod:`~labsupport.fl.checkpoint` -- bytes on the wire and on disk
  (safetensors, no pickle).
* :mod:`~labsupport.fl.compression` -- top-k with error feedback, stochastic quantization.
* :mod:`~labsupport.fl.vectorized` -- many small-model clients in one ``torch.func.vmap`` step.
* :mod:`~labsupport.fl.graphs`, :mod:`~labsupport.fl.gossip` -- decentralized FL over a graph.

Flower (the Ray simulation, the Deployment Engine, the strategy bridge) is :mod:`labsupport.flower`.
"""

from .aggregators import Aggregator, CountPolicy, WeightedMean
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .clients import (
    Client,
    DataClient,
    FitReply,
    Rejection,
    RoundContext,
    TrainConfig,
    fit_or_reject,
    local_update,
)
from .compression import NoCompression, StochasticQuantizer, TopK, TopKQuantized, make_compressor
from .gossip import GossipSimulation, consensus_distance, gossip_average
from .history import History, RoundRecord
from .selection import client_seed, num_selected, select_clients
from .serialize import PayloadError, deserialize, payload_nbytes, serialize
from .server import FedAvgConfig, FedAvgSimulation
from .state import (
    StateDict,
    UpdateRejected,
    aggregate,
    apply_delta,
    clone_state,
    mix_states,
    state_delta,
    validate_update,
)
from .transforms import Pipeline, UpdateTransform

__all__ = [
    "Aggregator",
    "CheckpointError",
    "Client",
    "CountPolicy",
    "DataClient",
    "FedAvgConfig",
    "FedAvgSimulation",
    "FitReply",
    "GossipSimulation",
    "History",
    "NoCompression",
    "PayloadError",
    "Pipeline",
    "Rejection",
    "RoundContext",
    "RoundRecord",
    "StateDict",
    "StochasticQuantizer",
    "TopK",
    "TopKQuantized",
    "TrainConfig",
    "UpdateRejected",
    "UpdateTransform",
    "WeightedMean",
    "aggregate",
    "apply_delta",
    "client_seed",
    "clone_state",
    "consensus_distance",
    "deserialize",
    "fit_or_reject",
    "gossip_average",
    "load_checkpoint",
    "local_update",
    "make_compressor",
    "mix_states",
    "num_selected",
    "payload_nbytes",
    "save_checkpoint",
    "select_clients",
    "serialize",
    "state_delta",
    "validate_update",
]
