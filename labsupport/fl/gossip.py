"""Decentralized (peer-to-peer) federated learning: local SGD, then gossip with the neighbours.

There is no server. Each client keeps its own model ``x_i`` and only talks to its neighbours on a
communication graph, mixing with a symmetric doubly stochastic matrix ``W``
(:mod:`labsupport.fl.graphs`) -- one *gossip step*:

    x_i  <-  sum_j W_ij x_j                       (X <- W X, rows of X are the clients' models)

Papers and equations:

* Lian et al., "Can Decentralized Algorithms Outperform Centralized Algorithms? A Case Study for
  Decentralized Parallel Stochastic Gradient Descent" (NeurIPS 2017), Algorithm 1 (D-PSGD):
  ``x_{t+1} = W x_t - lr * grad F(x_t)`` -- one gradient step per exchange.
* Koloskova et al., "A Unified Theory of Decentralized SGD with Changing Topology and Local Updates"
  (ICML 2020), Algorithm 1: ``x_i^{t+1/2} = x_i^t - lr * grad F_i(x_i^t)``, then
  ``x_i^{t+1} = sum_j W_ij^t x_j^{t+1/2}``, with ``W^t = I`` in steps without communication.

:class:`GossipSimulation` runs *local SGD with gossip*: in a round every client runs its local update
(``local_epochs`` epochs of mini-batch SGD, through the same
:func:`~labsupport.fl.clients.fit_or_reject` as the FedAvg server, so a bad client is rejected and
keeps its model) from its own current model, and then the clients take one gossip step with ``W``.
That is Koloskova et al.'s Algorithm 1 with ``tau`` local steps between gossip steps -- not D-PSGD,
which exchanges after every single step. With the uniform ``W = (1/n) 1 1^T`` one gossip step is an
exact average and a round is one round of FedAvg with every client selected and equal client sizes.
Gossip averages clients uniformly: unequal client sizes are *not* weighted as FedAvg weights them.
With a constant learning rate the consensus distance (:func:`consensus_distance`) does not go to
zero: it levels off at a height set by the learning rate, the clients' heterogeneity and the
spectral gap.

Records go into the common :class:`~labsupport.fl.history.History`; gossip's own figures are in each
record's ``extra``: ``consensus_distance_before_gossip``, ``consensus_distance``, and with
``eval_clients=True`` ``client_accuracy_mean`` / ``client_accuracy_min``. ``bytes_up`` is one model
per directed edge of the graph.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from labsupport.train import evaluate

from .clients import Client, Rejection, RoundContext, TrainConfig, fit_or_reject
from .graphs import check_mixing_matrix, num_directed_edges, spectral_gap
from .history import History, RoundRecord
from .selection import client_seed
from .serialize import payload_nbytes
from .state import StateDict, aggregate, clone_state, mix_states

__all__ = ["GossipSimulation", "consensus_distance", "gossip_average"]


# ------------------------------------------------------------------------------ gossip on states
def _check_states(states: Sequence[Mapping[str, torch.Tensor]]) -> None:
    if len(states) == 0:
        raise ValueError("got no states; expected one state dict per client")
    ref = states[0]
    for i, s in enumerate(states[1:], start=1):
        if s.keys() != ref.keys():
            missing = [k for k in ref if k not in s]
            extra = [k for k in s if k not in ref]
            raise ValueError(
                f"client {i} state keys differ from client 0's: missing {missing}, unexpected {extra}"
            )
        for key, r in ref.items():
            if s[key].shape != r.shape:
                raise ValueError(
                    f"client {i} has shape {tuple(s[key].shape)} for {key!r}; client 0 has {tuple(r.shape)}"
                )


def gossip_average(
    states: Sequence[Mapping[str, torch.Tensor]], W: np.ndarray | torch.Tensor
) -> list[StateDict]:
    """One gossip step ``x_i <- sum_j W_ij x_j`` on every entry of the clients' state dicts.

    Computed in float64 and cast back to each entry's dtype; integer entries (e.g. a step counter) are
    rounded to the nearest integer, boolean ones take the weighted majority. ``W`` must be a symmetric,
    doubly stochastic ``n x n`` matrix for the ``n`` states (:func:`check_mixing_matrix`).
    """
    _check_states(states)
    return mix_states(states, torch.from_numpy(check_mixing_matrix(W, len(states))))


def consensus_distance(states: Sequence[Mapping[str, torch.Tensor]]) -> float:
    """``(1/n) sum_i ||x_i - x_bar||^2`` over all floating entries of the state dicts, flattened.

    Zero exactly when all clients hold the same model; computed in float64.
    """
    _check_states(states)
    keys = [k for k, v in states[0].items() if v.is_floating_point()]
    if not keys:
        return 0.0
    x = torch.stack(
        [torch.cat([s[k].detach().reshape(-1).to(torch.float64) for k in keys]) for s in states]
    )
    return float(((x - x.mean(dim=0)) ** 2).sum() / len(states))


class GossipSimulation:
    """Serverless FL on a graph, in one process: local SGD on every client, then one gossip step.

    State: every client's model (``states``, all starting from ``model``'s weights), the round and the
    history. ``clients`` are :class:`~labsupport.fl.clients.DataClient` objects (or anything with
    ``num_samples`` and ``fit``); they train with ``config`` (a
    :class:`~labsupport.fl.clients.TrainConfig`), client ``i``'s batch order in round ``t`` seeded by
    ``client_seed(seed, t, i)`` as in :class:`~labsupport.fl.server.FedAvgSimulation`. ``W`` is a
    symmetric doubly stochastic ``n x n`` matrix (:func:`~labsupport.fl.graphs.mixing_matrix`);
    ``W = I`` is local training with no communication. ``test`` is ``(x, y)``: the average model is
    evaluated every ``eval_every`` rounds (and at the last round of :meth:`run`), and with
    ``eval_clients=True`` every client's own model too (``n`` evaluations).
    """

    def __init__(
        self,
        model: nn.Module,
        clients: Sequence[Client],
        test: tuple[torch.Tensor, torch.Tensor] | None,
        W: np.ndarray | torch.Tensor,
        config: TrainConfig | None = None,
        *,
        seed: int = 0,
        eval_every: int = 1,
        eval_clients: bool = False,
    ) -> None:
        if len(clients) < 2:
            raise ValueError(f"decentralized learning needs at least 2 clients; got {len(clients)}")
        for i, c in enumerate(clients):
            if not isinstance(c, Client):
                raise TypeError(
                    f"client {i} is a {type(c).__name__}; expected an object with num_samples and fit()"
                )
        if eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {eval_every}")
        self.W = check_mixing_matrix(W, len(clients))
        self.config = config or TrainConfig()
        self.seed = seed
        self.eval_every = eval_every
        self.eval_clients = eval_clients
        self.model = model
        self.scratch = copy.deepcopy(model)  # our clients train in this one
        self.clients = list(clients)
        self.test = test
        initial = clone_state(model.state_dict())
        self.states: list[StateDict] = [clone_state(initial) for _ in self.clients]
        self.round = 0
        self.history = History()
        self.spectral_gap = spectral_gap(self.W)
        self.num_directed_edges = num_directed_edges(self.W)
        self._state_nbytes = payload_nbytes(initial)  # same shapes every round

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def _local_training(self) -> tuple[list[StateDict], list[float], dict[int, str]]:
        trained, losses, rejected = [], [], {}
        cohort = tuple(range(self.num_clients))
        for cid, client in enumerate(self.clients):
            own = self.states[cid]
            ctx = RoundContext(
                self.round + 1, cid, client_seed(self.seed, self.round + 1, cid), cohort
            )
            reply = fit_or_reject(client, self.scratch, own, ctx, self.config)
            if isinstance(reply, Rejection):  # a bad client keeps its model; the run goes on
                rejected[cid] = reply.reason
                trained.append(own)
                continue
            trained.append(reply.state)
            if "loss" in reply.metrics:
                losses.append(reply.metrics["loss"])
        return trained, losses, rejected

    def run_round(self, *, evaluate_now: bool | None = None) -> RoundRecord:
        """Local SGD on every client, one gossip step with ``W``, evaluation; returns the record.

        ``evaluate_now`` overrides the ``eval_every`` schedule for this round.
        """
        start = time.perf_counter()
        trained, losses, rejected = self._local_training()
        before = consensus_distance(trained)
        self.states = gossip_average(trained, self.W)
        after = consensus_distance(self.states)
        self.round += 1
        eval_start = time.perf_counter()
        if evaluate_now is None:
            evaluate_now = self.round % self.eval_every == 0
        acc = loss = None
        extra: dict = {"consensus_distance_before_gossip": before, "consensus_distance": after}
        if self.test is not None and evaluate_now:
            metrics = self.evaluate()
            acc, loss = metrics["accuracy"], metrics["loss"]
            if self.eval_clients:
                accs = [m["accuracy"] for m in self.evaluate_clients()]
                extra["client_accuracy_mean"] = float(np.mean(accs))
                extra["client_accuracy_min"] = float(min(accs))
        end = time.perf_counter()
        record = RoundRecord(
            round=self.round,
            clients=list(range(self.num_clients)),
            rejected=rejected,
            train_loss=sum(losses) / len(losses) if losses else None,
            accuracy=acc,
            loss=loss,
            bytes_up=self._state_nbytes * self.num_directed_edges,
            bytes_down=0,
            seconds=end - start,
            eval_seconds=end - eval_start,
            extra=extra,
        )
        self.history.append(record)
        return record

    def run(self, num_rounds: int, *, progress: bool = True, desc: str = "gossip") -> History:
        """Run until round ``num_rounds`` (as :meth:`FedAvgSimulation.run`); the last one is evaluated."""
        if num_rounds < 0:
            raise ValueError(f"num_rounds must be >= 0, got {num_rounds}")
        bar = tqdm(
            total=num_rounds, initial=min(self.round, num_rounds), desc=desc, disable=not progress
        )
        while self.round < num_rounds:
            last = self.round + 1 == num_rounds
            record = self.run_round(evaluate_now=True if last else None)
            bar.update(1)
            postfix = {"consensus": f"{record.extra['consensus_distance']:.2e}"}
            if record.accuracy is not None:
                postfix["acc"] = f"{record.accuracy:.3f}"
            bar.set_postfix(postfix)
        bar.close()
        return self.history

    def average_state(self) -> StateDict:
        """``x_bar``: the uniform average of the clients' models (gossip leaves it unchanged)."""
        return aggregate(self.states, [1.0] * self.num_clients)

    def average_model(self) -> nn.Module:
        """``model`` holding ``x_bar``."""
        self.model.load_state_dict(self.average_state())
        return self.model

    def client_model(self, client: int) -> nn.Module:
        """``model`` holding client ``client``'s current weights."""
        if not 0 <= client < self.num_clients:
            raise ValueError(f"client must be in [0, {self.num_clients - 1}], got {client}")
        self.model.load_state_dict(self.states[client])
        return self.model

    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy of the average model ``x_bar`` on the test set."""
        if self.test is None:
            raise ValueError("this simulation has no test set")
        return evaluate(self.average_model(), *self.test)

    def evaluate_clients(self) -> list[dict[str, float]]:
        """Loss and accuracy of every client's own model on the test set (``n`` evaluations)."""
        if self.test is None:
            raise ValueError("this simulation has no test set")
        return [evaluate(self.client_model(i), *self.test) for i in range(self.num_clients)]
