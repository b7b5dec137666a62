"""The task: run configuration, MNIST-1D partitions, the model, train and test -- all from labsupport.

Flower's examples keep "what is learned" in ``task.py`` and "how it is federated" in
``client_app.py`` / ``server_app.py``. Here nothing is re-implemented: the data is
:func:`labsupport.data.load_dataset`, the client partitions :func:`labsupport.partitions.partition`,
the model :func:`labsupport.models.build_model`, the local update
:func:`labsupport.fl.clients.local_update` with the batch-order seed
:func:`labsupport.fl.selection.client_seed` -- so a Flower client trains exactly as a client of
:class:`labsupport.fl.server.FedAvgSimulation` does, batch for batch. The server's aggregation rule is
the ``aggregator`` knob, a name of :func:`labsupport.flower.bridge.make_aggregator`
(``"weighted-mean"`` = FedAvg, ``"median"``, ``"trimmed-mean:0.1"``, ``"krum:1"``, ...).

:class:`AppConfig` is the one place the run configuration's defaults live. ``flwr run`` reads
``[tool.flwr.app.config]`` from ``pyproject.toml`` into ``context.run_config``;
``flwr.simulation.run_simulation`` reads no pyproject and leaves ``context.run_config`` empty, so the
apps always start from ``AppConfig()`` and overlay whatever they are given. A test checks that the
pyproject's table equals :meth:`AppConfig.to_run_config`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

from labsupport.data import Dataset, load_dataset
from labsupport.fl.clients import TrainConfig, local_update
from labsupport.fl.selection import client_seed, num_selected
from labsupport.fl.state import StateDict
from labsupport.flower.bridge import parse_aggregator
from labsupport.models import build_model
from labsupport.partitions import SCHEMES, client_data, partition
from labsupport.train import TrainResult, evaluate

__all__ = [
    "CLIENT_KEYS",
    "DP_WEIGHT_KEY",
    "AppConfig",
    "check_partition_id",
    "client_partitions",
    "load_data",
    "load_partition",
    "make_model",
    "partition_indices",
    "test",
    "train",
]

DATASET = "mnist1d"


@dataclass(frozen=True)
class AppConfig:
    """The knobs of the run, named as in ``[tool.flwr.app.config]`` with ``_`` for ``-``.

    ``batch_size = 0`` means the whole local dataset (B = inf, FedSGD); TOML has no ``None``.
    ``results_file`` is where the ServerApp writes its JSON history (and the final model next to it
    as ``.pt``); empty means "write nothing". Relative paths resolve against the ServerApp process's
    working directory, so give an absolute path to ``flwr run``. ``dp_noise_multiplier`` (σ) and
    ``dp_clipping_norm`` (S), both > 0, turn on user-level DP (DP-FedAvg, McMahan et al. 2018) with
    Flower's ``DifferentialPrivacyServerSideFixedClipping``; both 0 (the default) is plain FedAvg.
    """

    num_server_rounds: int = 5
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    local_epochs: int = 1
    batch_size: int = 10
    lr: float = 0.05
    model: str = "mlp"
    partition_scheme: str = "iid"
    aggregator: str = "weighted-mean"
    seed: int = 0
    num_partitions: int = 10
    results_file: str = ""
    dp_noise_multiplier: float = 0.0
    dp_clipping_norm: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = {"int": int, "float": float, "str": str}[f.type]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))  # TOML's `lr = 1` is an int
            elif not isinstance(value, kind) or isinstance(value, bool):
                raise TypeError(
                    f"run config {_key(f.name)!r} = {value!r} is a {type(value).__name__}; "
                    f"expected {kind.__name__}"
                )
        if self.num_server_rounds < 0:
            raise ValueError(f"num-server-rounds must be >= 0, got {self.num_server_rounds}")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ValueError(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ValueError(f"fraction-evaluate must be in [0, 1], got {self.fraction_evaluate}")
        if self.local_epochs < 1:
            raise ValueError(f"local-epochs must be >= 1, got {self.local_epochs}")
        if self.batch_size < 0:
            raise ValueError(f"batch-size must be >= 1, or 0 for full batch; got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.num_partitions < 1:
            raise ValueError(f"num-partitions must be >= 1, got {self.num_partitions}")
        if self.partition_scheme not in SCHEMES:
            raise ValueError(
                f"partition-scheme {self.partition_scheme!r} is not one of {sorted(SCHEMES)}"
            )
        parse_aggregator(self.aggregator)  # the name and its arguments; built by the ServerApp
        if self.dp_noise_multiplier < 0 or self.dp_clipping_norm < 0:
            raise ValueError(
                "dp-noise-multiplier and dp-clipping-norm must be >= 0 (0 and 0: DP off); got "
                f"{self.dp_noise_multiplier} and {self.dp_clipping_norm}"
            )
        if (self.dp_noise_multiplier > 0) != (self.dp_clipping_norm > 0):
            raise ValueError(
                "user-level DP needs both dp-noise-multiplier > 0 and dp-clipping-norm > 0 "
                f"(or both 0: DP off); got {self.dp_noise_multiplier} and {self.dp_clipping_norm}"
            )
        if self.dp and self.aggregator != "weighted-mean":
            raise ValueError(
                f"aggregator {self.aggregator!r} with user-level DP: DP-FedAvg averages the clipped "
                "updates with equal weights (Flower's FedAvg); keep aggregator = 'weighted-mean'"
            )

    @property
    def dp(self) -> bool:
        """User-level DP is on: Flower's ``DifferentialPrivacyServerSideFixedClipping``."""
        return self.dp_clipping_norm > 0

    @classmethod
    def from_run_config(
        cls, config: Mapping[str, Any], *, ignore_unknown: bool = False
    ) -> AppConfig:
        """``AppConfig()`` overlaid with ``config`` (kebab-case keys, as in a run config).

        Unknown keys raise ``ValueError`` (a typo must not silently fall back to a default) unless
        ``ignore_unknown`` -- a message's ConfigRecord also carries Flower's ``server-round``.
        """
        names = {_key(f.name): f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if k not in names)
        if unknown and not ignore_unknown:
            raise ValueError(
                f"unknown run config key(s) {unknown}; expected some of {sorted(names)}"
            )
        return cls(**{names[k]: v for k, v in config.items() if k in names})

    def to_run_config(self) -> dict[str, int | float | str]:
        """All knobs with kebab-case keys: what ``[tool.flwr.app.config]`` holds."""
        return {_key(k): v for k, v in dataclasses.asdict(self).items()}

    def client_config(self) -> dict[str, int | float | str]:
        """The knobs a ClientApp needs, sent in each message's ConfigRecord (see :data:`CLIENT_KEYS`);
        with DP on, also the two DP knobs (the client then reports its equal DP weight)."""
        full = self.to_run_config()
        keys = (*CLIENT_KEYS, *DP_KEYS) if self.dp else CLIENT_KEYS
        return {k: full[k] for k in keys}

    @property
    def min_train_nodes(self) -> int:
        """Clients per round, ``max(C * K, 1)`` as :func:`labsupport.fl.selection.select_clients` counts."""
        return num_selected(self.num_partitions, self.fraction_train)


#: The metric a client reports under DP (value 1): the server's DP-FedAvg weighs by it, not by
#: ``num-examples``, because the noise σS/m assumes every client's weight is 1/m.
DP_WEIGHT_KEY = "dp-weight"
#: The DP knobs, sent to the clients only when DP is on.
DP_KEYS = ("dp-noise-multiplier", "dp-clipping-norm")

#: What the ServerApp sends to the clients in every train/evaluate message.
CLIENT_KEYS = (
    "local-epochs",
    "batch-size",
    "lr",
    "model",
    "partition-scheme",
    "seed",
    "num-partitions",
)


def _key(name: str) -> str:
    return name.replace("_", "-")


# --------------------------------------------------------------------------------------- data


@lru_cache(maxsize=1)
def load_data() -> Dataset:
    """MNIST-1D's 4,000/1,000 split, generated offline and cached (once per process)."""
    return load_dataset(DATASET)


@lru_cache(maxsize=8)
def _indices(split: str, num_partitions: int, scheme: str, seed: int) -> tuple[np.ndarray, ...]:
    ds = load_data()
    y = ds.y_train if split == "train" else ds.y_test
    return tuple(partition(y.numpy(), num_partitions, scheme, seed=seed))


def partition_indices(
    num_partitions: int, scheme: str = "iid", seed: int = 0, *, split: str = "train"
) -> list[np.ndarray]:
    """Every client's sorted sample indices: ``labsupport.partitions.partition`` of the split's labels."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return [idx.copy() for idx in _indices(split, int(num_partitions), scheme, int(seed))]


def client_partitions(
    num_partitions: int, scheme: str = "iid", seed: int = 0, *, split: str = "train"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every client's ``(x, y)`` for :func:`partition_indices`.

    The same call builds the clients of :class:`labsupport.fl.server.FedAvgSimulation` in the benchmark and
    the tests, so client ``i`` there is partition ``i`` here.
    """
    return _rows(partition_indices(num_partitions, scheme, seed, split=split), split)


def load_partition(
    partition_id: int,
    num_partitions: int,
    scheme: str = "iid",
    seed: int = 0,
    *,
    split: str = "train",
    indices: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``partition_id``'s ``(x, y)`` out of ``num_partitions`` (or the rows ``indices``)."""
    check_partition_id(partition_id, num_partitions)
    if indices is None:
        indices = partition_indices(num_partitions, scheme, seed, split=split)[int(partition_id)]
    return _rows([indices], split)[0]


def check_partition_id(partition_id: int, num_partitions: int) -> None:
    """Raise ``ValueError`` unless ``0 <= partition_id < num_partitions``."""
    if not 0 <= int(partition_id) < int(num_partitions):
        raise ValueError(
            f"partition-id {partition_id} is outside 0..{int(num_partitions) - 1} "
            f"(num-partitions={num_partitions}); check the SuperNode's --node-config"
        )


def _rows(parts: list[np.ndarray], split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ds = load_data()
    x, y = (ds.x_train, ds.y_train) if split == "train" else (ds.x_test, ds.y_test)
    return client_data(x, y, parts)


# -------------------------------------------------------------------------------- model, train, test


def make_model(name: str = "mlp", seed: int | None = None) -> nn.Module:
    """``build_model(name)`` for MNIST-1D's input shape; ``seed`` fixes the initial weights."""
    ds = load_data()
    return build_model(name, ds.input_shape, ds.num_classes, seed=seed)


def train(
    model: nn.Module,
    global_state: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    config: AppConfig,
    server_round: int,
    partition_id: int,
) -> tuple[StateDict, TrainResult]:
    """FedAvg's ClientUpdate with our simulator's batch order: seed ``client_seed(seed, round, id)``."""
    return local_update(
        model,
        global_state,
        x,
        y,
        TrainConfig(
            local_epochs=config.local_epochs, batch_size=config.batch_size or None, lr=config.lr
        ),
        seed=client_seed(config.seed, server_round, partition_id),
    )


def test(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Mean cross-entropy ``loss`` and ``accuracy`` (fraction) of ``model`` on ``(x, y)``."""
    return evaluate(model, x, y)
