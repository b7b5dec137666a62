"""An in-process FedAvg simulator with a history, byte counts and checkpoint/resume.

The server loop of McMahan et al. (2017), Algorithm 1, over the parts in :mod:`labsupport.fl.fedavg`:
each round select clients, send them the global model, let each run its local update, validate what
comes back, average it, evaluate. It is built to cost little more than the local training it runs
(``python -m labsupport.bench sim_overhead`` measures the ratio): clients are plain tensors, one
scratch model is reused, and the batch order of every client in every round is derived from
``(seed, round, client)`` -- so a run killed at round k and resumed from its checkpoint ends with
exactly the model of an uninterrupted run.

A bad client never takes the run down: an update that fails validation, or a client that raises, is
rejected and logged, and the round goes on with the rest. A round with no valid update keeps the
global model.

Plug-ins used by later sections and chapters:

* ``aggregator(global_state, states, weights) -> state`` -- robust aggregation (chapter 03).
* ``compressor`` -- update compression with ``compress/decompress`` (chapter 01,
  :mod:`labsupport.fl.compression`); updates are then sent as deltas from the global model and
  counted as serialized.
* clients with their own ``fit`` -- FedProx, attackers (chapter 03).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from tqdm.auto import tqdm

from labsupport.train import evaluate

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

__all__ = [
    "Client",
    "DataClient",
    "FedAvgConfig",
    "FedAvgSimulation",
    "History",
    "RoundRecord",
    "fedavg_aggregator",
    "fit_or_reject",
]

logger = logging.getLogger("labsupport.fl")

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass(frozen=True)
class FedAvgConfig:
    """The knobs of Algorithm 1, named as in the paper where it names them."""

    num_rounds: int = 20
    fraction_train: float = 0.1  # C: fraction of clients selected per round
    min_train_clients: int = 1
    local_epochs: int = 1  # E
    batch_size: int | None = 10  # B; None = the whole local dataset (B = inf, FedSGD)
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.0
    seed: int = 0
    eval_every: int = 1  # evaluate the global model every this many rounds (and at the last)
    vectorized: bool = False  # train plain DataClients together with torch.func.vmap

    def __post_init__(self) -> None:
        if self.num_rounds < 0:
            raise ValueError(f"num_rounds must be >= 0, got {self.num_rounds}")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ValueError(f"fraction_train must be in (0, 1], got {self.fraction_train}")
        if self.local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {self.local_epochs}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None (full batch), got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")
        if self.vectorized and (self.optimizer != "sgd" or self.momentum != 0.0):
            raise ValueError(
                f"vectorized=True trains with plain SGD; got optimizer={self.optimizer!r}, "
                f"momentum={self.momentum}. Use optimizer='sgd', momentum=0 or vectorized=False"
            )


@runtime_checkable
class Client(Protocol):
    """What the server needs of a client: its sample count and a ``fit``."""

    num_samples: int

    def fit(
        self, model: nn.Module, global_state: StateDict, config: FedAvgConfig, seed: int
    ) -> tuple[StateDict, float, dict]:
        """Return ``(new_state, weight, metrics)``; ``model`` is a scratch module to train in."""
        ...


@dataclass
class DataClient:
    """An honest client holding ``(x, y)``: runs :func:`~labsupport.fl.fedavg.local_update`."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"client data has {len(self.x)} inputs but {len(self.y)} labels")
        if len(self.x) == 0:
            raise ValueError("a client needs at least one sample")

    @property
    def num_samples(self) -> int:
        return len(self.y)

    def fit(
        self, model: nn.Module, global_state: StateDict, config: FedAvgConfig, seed: int
    ) -> tuple[StateDict, float, dict]:
        state, result = local_update(
            model,
            global_state,
            self.x,
            self.y,
            epochs=config.local_epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            seed=seed,
            optimizer=config.optimizer,
            momentum=config.momentum,
        )
        return state, self.num_samples, {"loss": result.loss, "steps": result.steps}


def fedavg_aggregator(
    global_state: StateDict, states: Sequence[StateDict], weights: Sequence[float]
) -> StateDict:
    """FedAvg's server step: the sample-weighted average (``global_state`` is unused)."""
    return aggregate(states, weights)


def _num_steps(num_samples: int, config: FedAvgConfig) -> int:
    per_epoch = 1 if config.batch_size is None else -(-num_samples // config.batch_size)
    return per_epoch * config.local_epochs


def fit_or_reject(
    client: Client,
    cid: int,
    scratch: nn.Module,
    state: StateDict,
    config: FedAvgConfig,
    server_round: int,
) -> tuple[StateDict, float, dict] | str:
    """Run client ``cid``'s ``fit`` from ``state`` and validate the reply against it.

    Returns ``(new_state, weight, metrics)``, or -- when the client raised or its update failed
    :func:`~labsupport.fl.fedavg.validate_update` -- the reason, which is also logged. A bad client is
    rejected, never fatal to the run (the FedAvg server and the gossip clients both rely on this).
    """
    try:
        reply = client.fit(scratch, state, config, client_seed(config.seed, server_round, cid))
        if not isinstance(reply, tuple) or len(reply) != 3:
            raise UpdateRejected(
                f"fit returned {type(reply).__name__}; expected (state, weight, metrics)", cid
            )
        validate_update(state, reply[0], reply[1], client=cid)
    except Exception as exc:
        reason = str(exc) if isinstance(exc, UpdateRejected) else f"client {cid} raised {exc!r}"
        logger.warning("round %d: rejected an update: %s", server_round, reason)
        return reason
    return reply


@dataclass
class RoundRecord:
    """What happened in one round. ``accuracy``/``loss`` are None in rounds without evaluation."""

    round: int
    clients: list[int]
    rejected: dict[int, str]
    train_loss: float | None  # sample-weighted mean of the accepted clients' training losses
    accuracy: float | None
    loss: float | None
    bytes_up: int
    bytes_down: int
    seconds: float
    eval_seconds: float


@dataclass
class History:
    """Per-round records of a run, with the usual questions about them."""

    rounds: list[RoundRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rounds)

    def column(self, name: str) -> list:
        return [getattr(r, name) for r in self.rounds]

    def evaluated(self) -> tuple[list[int], list[float]]:
        """Rounds with an evaluation and their accuracies."""
        pairs = [(r.round, r.accuracy) for r in self.rounds if r.accuracy is not None]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def rounds_to(self, accuracy: float) -> int | None:
        """The first evaluated round whose accuracy reached ``accuracy`` (None if never)."""
        for r in self.rounds:
            if r.accuracy is not None and r.accuracy >= accuracy:
                return r.round
        return None

    def cumulative(self, name: str) -> list:
        """Running total of a per-round column, e.g. ``cumulative("bytes_up")``."""
        total, out = 0, []
        for value in self.column(name):
            total += value
            out.append(total)
        return out

    def cumulative_bytes_up(self) -> list[int]:
        return self.cumulative("bytes_up")

    @property
    def final_accuracy(self) -> float | None:
        _, acc = self.evaluated()
        return acc[-1] if acc else None

    def to_dicts(self) -> list[dict]:
        return [dataclasses.asdict(r) for r in self.rounds]

    @classmethod
    def from_dicts(cls, rows: Sequence[Mapping]) -> History:
        return cls(
            [
                RoundRecord(**{**r, "rejected": {int(k): v for k, v in r["rejected"].items()}})
                for r in rows
            ]
        )


class FedAvgSimulation:
    """The FedAvg server, simulated in one process. State: the global model, the round, the history.

    ``clients`` are :class:`DataClient` objects (or anything with ``num_samples`` and ``fit``);
    ``test`` is ``(x, y)`` for the global model's evaluation. With ``checkpoint_dir`` the global model,
    history and compressor state are saved after every round, and a new simulation with the same
    arguments resumes from there (``resume=True``, the default).
    """

    def __init__(
        self,
        model: nn.Module,
        clients: Sequence[Client],
        test: tuple[torch.Tensor, torch.Tensor] | None,
        config: FedAvgConfig | None = None,
        *,
        aggregator: Callable[
            [StateDict, Sequence[StateDict], Sequence[float]], StateDict
        ] = fedavg_aggregator,
        compressor: object | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = True,
    ) -> None:
        if len(clients) == 0:
            raise ValueError("a federation needs at least one client; got an empty list")
        for i, c in enumerate(clients):
            if not isinstance(c, Client):
                raise TypeError(
                    f"client {i} is a {type(c).__name__}; expected an object with num_samples and fit()"
                )
        self.config = config or FedAvgConfig()
        if self.config.min_train_clients > len(clients):
            raise ValueError(
                f"min_train_clients={self.config.min_train_clients} but only {len(clients)} clients exist"
            )
        self.model = model
        self.scratch = copy.deepcopy(model)  # clients train in this one, never in the global model
        self.clients = list(clients)
        self.test = test
        self.aggregator = aggregator
        self.compressor = compressor
        self.global_state: StateDict = clone_state(model.state_dict())
        self.round = 0
        self.history = History()
        self.checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
        self._state_nbytes = payload_nbytes(self.global_state)
        if self.checkpoint_path is not None and resume and self.checkpoint_path.exists():
            self.load_checkpoint(self.checkpoint_path)

    # ------------------------------------------------------------------------------- the round
    def _collect(
        self, selected: list[int]
    ) -> tuple[list[StateDict], list[float], dict[int, str], float | None, int]:
        """Run the selected clients: accepted states, weights, rejections, mean train loss, bytes up."""
        states, weights, losses, loss_weights = [], [], [], []
        rejected: dict[int, str] = {}
        bytes_up = 0
        trained = None
        if self.config.vectorized:
            try:
                trained = self._train_vectorized(selected)
            except Exception as exc:  # e.g. one client's data has another shape: train one by one
                logger.warning(
                    "round %d: vectorized training failed (%r); training the clients one by one",
                    self.round + 1,
                    exc,
                )
        for cid in selected:
            if trained is not None and cid in trained:
                state, weight, metrics = trained[cid]
            else:
                reply = fit_or_reject(
                    self.clients[cid],
                    cid,
                    self.scratch,
                    self.global_state,
                    self.config,
                    self.round + 1,
                )
                if isinstance(reply, str):
                    rejected[cid] = reply
                    continue
                state, weight, metrics = reply
            if self.compressor is not None:  # our own code: an error here is a bug, and raises
                state, nbytes = self._through_compressor(cid, state)
            else:
                nbytes = self._state_nbytes  # same shapes every time: serialized size is fixed
            states.append(state)
            weights.append(float(weight))
            bytes_up += nbytes
            if isinstance(metrics, Mapping) and "loss" in metrics:
                losses.append(float(metrics["loss"]) * float(weight))
                loss_weights.append(float(weight))
        train_loss = sum(losses) / sum(loss_weights) if loss_weights else None
        return states, weights, rejected, train_loss, bytes_up

    def _through_compressor(self, cid: int, state: StateDict) -> tuple[StateDict, int]:
        """Send ``state - global`` through the compressor as serialized bytes; rebuild on the server.

        Floating entries travel as deltas; integer and boolean buffers (no meaningful difference)
        travel as their values.
        """
        g = self.global_state
        delta = {k: v - g[k] if v.is_floating_point() else v for k, v in state.items()}
        wire = serialize(self.compressor.compress(delta, cid))
        decoded = self.compressor.decompress(deserialize(wire), g)
        rebuilt = {
            k: (g[k] + d).to(g[k].dtype) if g[k].is_floating_point() else d
            for k, d in decoded.items()
        }
        validate_update(g, rebuilt, 1, client=cid)
        return rebuilt, len(wire)

    def _train_vectorized(self, selected: list[int]) -> dict[int, tuple[StateDict, float, dict]]:
        """Train the selected plain DataClients together. An update that fails validation (e.g. it
        diverged to NaN) is left out, so that client is trained -- and rejected -- one by one."""
        from .vectorized import vectorized_local_updates

        plain = [cid for cid in selected if type(self.clients[cid]) is DataClient]
        if not plain:
            return {}
        cfg = self.config
        seeds = [client_seed(cfg.seed, self.round + 1, cid) for cid in plain]
        data = [(self.clients[cid].x, self.clients[cid].y) for cid in plain]
        states, losses = vectorized_local_updates(
            self.scratch,
            self.global_state,
            data,
            epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            seeds=seeds,
        )
        out = {}
        for cid, state, loss in zip(plain, states, losses, strict=True):
            n = self.clients[cid].num_samples
            try:
                validate_update(self.global_state, state, n, client=cid)
            except UpdateRejected:
                continue
            out[cid] = (state, n, {"loss": loss, "steps": _num_steps(n, cfg)})
        return out

    def run_round(self, *, evaluate_now: bool | None = None) -> RoundRecord:
        """One round of Algorithm 1; returns (and records) what happened.

        The global model is evaluated every ``eval_every`` rounds and at the config's last round, or
        as ``evaluate_now`` says.
        """
        start = time.perf_counter()
        server_round = self.round + 1
        cfg = self.config
        selected = select_clients(
            len(self.clients),
            cfg.fraction_train,
            min_clients=cfg.min_train_clients,
            seed=cfg.seed,
            server_round=server_round,
        )
        states, weights, rejected, train_loss, bytes_up = self._collect(selected)
        if states:
            self.global_state = clone_state(self.aggregator(self.global_state, states, weights))
        else:
            logger.warning("round %d: no valid update; the global model is kept", server_round)
        self.round = server_round
        eval_start = time.perf_counter()
        acc = loss = None
        if evaluate_now is None:
            evaluate_now = server_round % cfg.eval_every == 0 or server_round == cfg.num_rounds
        if self.test is not None and evaluate_now:
            metrics = self.evaluate()
            acc, loss = metrics["accuracy"], metrics["loss"]
        end = time.perf_counter()
        record = RoundRecord(
            round=server_round,
            clients=selected,
            rejected=rejected,
            train_loss=train_loss,
            accuracy=acc,
            loss=loss,
            bytes_up=bytes_up,
            bytes_down=self._state_nbytes * len(selected),
            seconds=end - start,
            eval_seconds=end - eval_start,
        )
        self.history.rounds.append(record)
        if self.checkpoint_path is not None:
            self.save_checkpoint(self.checkpoint_path)
        return record

    def run(
        self, num_rounds: int | None = None, *, progress: bool = True, desc: str = "FedAvg"
    ) -> History:
        """Run until round ``num_rounds`` (default: the config's), resuming where the state is.

        The last round run is always evaluated.
        """
        target = self.config.num_rounds if num_rounds is None else num_rounds
        bar = tqdm(total=target, initial=min(self.round, target), desc=desc, disable=not progress)
        while self.round < target:
            record = self.run_round(evaluate_now=True if self.round + 1 == target else None)
            bar.update(1)
            if record.accuracy is not None:
                bar.set_postfix(acc=f"{record.accuracy:.3f}")
        bar.close()
        return self.history

    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy of the global model on the test set."""
        if self.test is None:
            raise ValueError("this simulation has no test set")
        self.model.load_state_dict(self.global_state)
        return evaluate(self.model, *self.test)

    def global_model(self) -> nn.Module:
        """The model holding the current global weights."""
        self.model.load_state_dict(self.global_state)
        return self.model

    # ----------------------------------------------------------------------- checkpoint/resume
    def _fingerprint(self) -> dict:
        return {
            "config": dataclasses.asdict(self.config),
            "num_clients": len(self.clients),
            "compressor": None if self.compressor is None else repr(self.compressor),
        }

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write round, global model, history and compressor state atomically to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "round": self.round,
            "global_state": self.global_state,
            "history": self.history.to_dicts(),
            "fingerprint": self._fingerprint(),
            "compressor": self.compressor.state_dict()
            if self.compressor is not None and hasattr(self.compressor, "state_dict")
            else None,
        }
        tmp = path.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)  # a run killed mid-write leaves the previous checkpoint intact

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Resume from a checkpoint written by a simulation with the same config and clients."""
        payload = torch.load(Path(path), weights_only=False)
        saved, mine = payload["fingerprint"], self._fingerprint()
        if saved != mine:
            diff = {
                k: (saved["config"].get(k), v)
                for k, v in mine["config"].items()
                if saved["config"].get(k) != v
            }
            for key in ("num_clients", "compressor"):
                if saved.get(key) != mine[key]:
                    diff[key] = (saved.get(key), mine[key])
            raise ValueError(
                f"checkpoint {path} was written by a different run (saved, now): {diff}; "
                "use another checkpoint_dir or pass resume=False"
            )
        validate_update(self.global_state, payload["global_state"], 1, client="checkpoint")
        self.global_state = payload["global_state"]
        self.round = int(payload["round"])
        self.history = History.from_dicts(payload["history"])
        if payload.get("compressor") is not None and self.compressor is not None:
            self.compressor.load_state_dict(payload["compressor"])
        self.model.load_state_dict(self.global_state)
