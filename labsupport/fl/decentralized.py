"""Decentralized (peer-to-peer) federated learning: local SGD, then gossip with the neighbours.

There is no server. ``n`` clients sit on the nodes of a connected communication graph; each keeps its
own model ``x_i`` and only talks to its neighbours. A doubly stochastic, symmetric mixing matrix ``W``
(``W_ij > 0`` only for neighbours and ``i = j``) says how much of each neighbour's model a client
takes when they average -- one *gossip step*:

    x_i  <-  sum_j W_ij x_j                       (X <- W X, rows of X are the clients' models)

Because ``W`` is doubly stochastic the average ``x_bar = (1/n) sum_i x_i`` is unchanged by a gossip
step, and because it is symmetric the distance to consensus shrinks by at least ``lambda_2^2`` per step,

    (1/n) sum_i ||x_i - x_bar||^2  <=  lambda_2^2 * (the same before the step),

with ``lambda_2`` the second largest eigenvalue magnitude of ``W``; the *spectral gap*
``delta = 1 - |lambda_2|`` (:func:`spectral_gap`) is the number that predicts how fast consensus
happens. Koloskova et al.'s consensus rate is ``p = 1 - lambda_2^2 = delta (2 - delta)``.

Papers and equations:

* Lian et al., "Can Decentralized Algorithms Outperform Centralized Algorithms? A Case Study for
  Decentralized Parallel Stochastic Gradient Descent" (NeurIPS 2017), Algorithm 1 (D-PSGD):
  ``x_{t+1} = W x_t - lr * grad F(x_t)`` -- each node mixes the models it has and then applies the
  stochastic gradient it computed at its own ``x_t``.
* Koloskova et al., "A Unified Theory of Decentralized SGD with Changing Topology and Local Updates"
  (ICML 2020), Algorithm 1: ``x_i^{t+1/2} = x_i^t - lr * grad F_i(x_i^t)``, then
  ``x_i^{t+1} = sum_j W_ij^t x_j^{t+1/2}``, with ``W^t = I`` in steps without communication.

This module runs *local SGD, then gossip*: in a round every client runs
:func:`~labsupport.fl.fedavg.local_update` (``local_epochs`` epochs of mini-batch SGD) from its own
current model, and then the clients take one gossip step with ``W``. That is Koloskova et al.'s
Algorithm 1 with ``tau`` local steps (``W^t = I``) between gossip steps; with one local step per round
it is the "adapt-then-combine" form ``x_{t+1} = W (x_t - lr * grad F(x_t))`` of D-PSGD, which differs
from Lian et al.'s ``W x_t - lr * grad F(x_t)`` only in whether the gradient step is mixed too. With
the uniform ``W = (1/n) 1 1^T`` (the Metropolis weights of the complete graph) one gossip step is an
exact average and a round is one round of FedAvg with every client selected and equal client sizes.
Gossip averages clients uniformly: unequal client sizes are *not* weighted as FedAvg weights them.

Parts:

* graphs as symmetric boolean adjacency matrices -- :func:`ring`, :func:`random_regular`,
  :func:`fully_connected`, :func:`torus`, :func:`star` (networkx graphs are accepted where an
  adjacency is expected);
* :func:`mixing_matrix` (Metropolis-Hastings or max-degree weights), :func:`spectral_gap`;
* :func:`gossip_average`, :func:`consensus_distance` over state dicts;
* :class:`DecentralizedSimulation` -- the per-client models, the round and the history.

Chapter 01 uses it to compare ring, random-regular and fully-connected graphs against server FedAvg
(:class:`~labsupport.fl.simulation.FedAvgSimulation`): accuracy of the average model, consensus
distance and bytes sent per round.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from labsupport.train import evaluate

from .fedavg import (
    StateDict,
    aggregate,
    clone_state,
    mix_states,
)
from .serialize import payload_nbytes
from .simulation import Client, FedAvgConfig, History, fit_or_reject

__all__ = [
    "DecentralizedHistory",
    "DecentralizedRecord",
    "DecentralizedSimulation",
    "as_adjacency",
    "check_mixing_matrix",
    "consensus_distance",
    "fully_connected",
    "gossip_average",
    "mixing_matrix",
    "random_regular",
    "ring",
    "spectral_gap",
    "star",
    "torus",
]

logger = logging.getLogger("labsupport.fl")

_TOL = 1e-8  # tolerance for "doubly stochastic" and "symmetric" checks on float64 matrices


# ------------------------------------------------------------------------------------- graphs
def _check_num_nodes(n: object) -> int:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool):
        raise TypeError(f"the number of nodes must be an integer, got {n!r}")
    if n < 2:
        raise ValueError(f"a communication graph needs n >= 2 nodes, got n={n}")
    return int(n)


def _is_connected(adjacency: np.ndarray) -> bool:
    return bool(nx.is_connected(nx.from_numpy_array(adjacency.astype(np.int8))))


def _num_components(adjacency: np.ndarray) -> int:
    return nx.number_connected_components(nx.from_numpy_array(adjacency.astype(np.int8)))


def as_adjacency(graph: np.ndarray | torch.Tensor | nx.Graph) -> np.ndarray:
    """A validated symmetric boolean adjacency matrix (no self-loops) from a matrix or networkx graph.

    A networkx graph's nodes are taken in sorted order (node ``i`` of the matrix is the ``i``-th
    smallest node label). Raises ``ValueError`` for a non-square, non-symmetric or non-0/1 matrix, a
    matrix with self-loops (``W_ii`` is the self-weight; the graph must not hold it), or fewer than
    two nodes. Connectivity is not required here; see :func:`spectral_gap`.
    """
    if isinstance(graph, nx.Graph):
        if graph.is_directed():
            raise ValueError(
                "the communication graph must be undirected; got a directed networkx graph"
            )
        nodes = sorted(graph.nodes())
        a = nx.to_numpy_array(graph, nodelist=nodes, weight=None) != 0
    elif isinstance(graph, (np.ndarray, torch.Tensor)):
        a = np.asarray(graph.detach().cpu() if isinstance(graph, torch.Tensor) else graph)
        if a.ndim != 2 or a.shape[0] != a.shape[1]:
            raise ValueError(f"an adjacency matrix must be square, got shape {a.shape}")
        if a.dtype != np.bool_:
            if not np.isin(a, (0, 1)).all():
                raise ValueError("an adjacency matrix must hold only 0/1 (or booleans)")
            a = a != 0
    else:
        raise TypeError(
            f"expected an adjacency matrix or a networkx graph, got {type(graph).__name__}"
        )
    _check_num_nodes(a.shape[0])
    if not np.array_equal(a, a.T):
        i, j = (int(v) for v in np.argwhere(a != a.T)[0])
        raise ValueError(
            f"the adjacency matrix must be symmetric (undirected): edge ({i}, {j}) has no reverse"
        )
    if a.diagonal().any():
        i = int(np.flatnonzero(a.diagonal())[0])
        raise ValueError(
            f"node {i} has a self-loop; leave the diagonal empty (W_ii is set by mixing_matrix)"
        )
    return a


def ring(n: int) -> np.ndarray:
    """The cycle ``0 - 1 - ... - (n-1) - 0``: every node has degree 2 (degree 1 when ``n = 2``)."""
    n = _check_num_nodes(n)
    a = np.zeros((n, n), dtype=bool)
    idx = np.arange(n)
    a[idx, (idx + 1) % n] = True
    a[(idx + 1) % n, idx] = True
    return a


def fully_connected(n: int) -> np.ndarray:
    """The complete graph: every node is a neighbour of every other (degree ``n - 1``)."""
    n = _check_num_nodes(n)
    return ~np.eye(n, dtype=bool)


def star(n: int) -> np.ndarray:
    """Node 0 is the hub, linked to every other node; the leaves only talk to the hub."""
    n = _check_num_nodes(n)
    a = np.zeros((n, n), dtype=bool)
    a[0, 1:] = True
    a[1:, 0] = True
    return a


def torus(rows: int, cols: int) -> np.ndarray:
    """A ``rows x cols`` grid with wrap-around (degree 4); node ``r * cols + c`` sits at ``(r, c)``."""
    for name, v in (("rows", rows), ("cols", cols)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 3:
            raise ValueError(
                f"a torus needs {name} >= 3 (smaller sides would double edges), got {v!r}"
            )
    n = rows * cols
    a = np.zeros((n, n), dtype=bool)
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            for j in (((r + 1) % rows) * cols + c, r * cols + (c + 1) % cols):
                a[i, j] = a[j, i] = True
    return a


def random_regular(n: int, degree: int, seed: int = 0) -> np.ndarray:
    """A random ``degree``-regular graph on ``n`` nodes (networkx's generator), seeded.

    Needs ``1 <= degree < n`` and ``n * degree`` even. The graph must be connected: degree 1 is a
    perfect matching (never connected for ``n > 2``) and degree 2 is a union of cycles (often not
    connected); from degree 3 on a random regular graph is connected with high probability. A
    disconnected draw raises ``ValueError`` -- try another ``seed`` or a larger ``degree``.
    """
    n = _check_num_nodes(n)
    if not isinstance(degree, (int, np.integer)) or isinstance(degree, bool):
        raise TypeError(f"degree must be an integer, got {degree!r}")
    if not 1 <= degree < n:
        raise ValueError(
            f"degree must be in [1, n-1] = [1, {n - 1}] for n={n}, got degree={degree}"
        )
    if (n * degree) % 2:
        raise ValueError(
            f"a {degree}-regular graph on {n} nodes does not exist: n * degree = {n * degree} is odd "
            "(every edge has two ends); change n or degree"
        )
    graph = nx.random_regular_graph(int(degree), n, seed=int(seed))
    a = nx.to_numpy_array(graph, nodelist=range(n), weight=None) != 0
    if not _is_connected(a):
        raise ValueError(
            f"random_regular(n={n}, degree={degree}, seed={seed}) drew a disconnected graph "
            f"({_num_components(a)} components), on which the clients can never reach consensus; "
            "try another seed, or degree >= 3 (connected with high probability)"
        )
    return a


# ----------------------------------------------------------------------------- mixing matrices
def mixing_matrix(
    graph: np.ndarray | torch.Tensor | nx.Graph, kind: str = "metropolis"
) -> np.ndarray:
    """A symmetric, doubly stochastic mixing matrix ``W`` (float64) for the graph.

    * ``"metropolis"`` (Metropolis-Hastings): ``W_ij = 1 / (1 + max(d_i, d_j))`` for each edge;
    * ``"max_degree"``: ``W_ij = 1 / (1 + d_max)`` for each edge;

    and ``W_ii = 1 - sum_{j != i} W_ij``, zero for non-neighbours. Both are nonnegative with a
    positive diagonal, so for a connected graph ``|lambda_2| < 1``. On the complete graph both give
    ``W = (1/n) 1 1^T``, an exact average.
    """
    a = as_adjacency(graph)
    deg = a.sum(axis=1).astype(np.float64)
    if kind == "metropolis":
        w = np.where(a, 1.0 / (1.0 + np.maximum(deg[:, None], deg[None, :])), 0.0)
    elif kind == "max_degree":
        w = np.where(a, 1.0 / (1.0 + deg.max()), 0.0)
    else:
        raise ValueError(
            f"unknown mixing matrix kind {kind!r}; expected 'metropolis' or 'max_degree'"
        )
    np.fill_diagonal(w, 1.0 - w.sum(axis=1))
    return w


def check_mixing_matrix(W: np.ndarray | torch.Tensor, n: int | None = None) -> np.ndarray:
    """``W`` as a float64 array after checking it is ``n x n``, finite, nonnegative, symmetric and
    doubly stochastic (rows and columns sum to 1, to ``1e-8``); raises ``ValueError`` otherwise."""
    w = np.asarray(W.detach().cpu() if isinstance(W, torch.Tensor) else W, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"a mixing matrix must be square, got shape {w.shape}")
    if n is not None and w.shape[0] != n:
        raise ValueError(
            f"the mixing matrix is {w.shape[0]} x {w.shape[1]} but there are {n} clients"
        )
    if not np.isfinite(w).all():
        raise ValueError("the mixing matrix holds non-finite values (NaN or inf)")
    if (w < 0).any():
        i, j = (int(v) for v in np.argwhere(w < 0)[0])
        raise ValueError(f"the mixing matrix must be nonnegative; W[{i}, {j}] = {w[i, j]}")
    if not np.allclose(w, w.T, rtol=0.0, atol=_TOL):
        i, j = (int(v) for v in np.unravel_index(np.abs(w - w.T).argmax(), w.shape))
        raise ValueError(
            f"the mixing matrix must be symmetric; W[{i}, {j}] = {w[i, j]} but W[{j}, {i}] = {w[j, i]}"
        )
    rows = w.sum(axis=1)
    if not np.allclose(rows, 1.0, rtol=0.0, atol=_TOL):
        i = int(np.abs(rows - 1.0).argmax())
        raise ValueError(
            f"the mixing matrix must be doubly stochastic; row {i} sums to {rows[i]!r}, not 1"
        )
    return w


def spectral_gap(W: np.ndarray | torch.Tensor) -> float:
    """``1 - |lambda_2|``: one minus the second largest eigenvalue magnitude of the symmetric ``W``.

    1 for the exact average ``(1/n) 1 1^T``; close to 0 for a long ring; 0 when the graph is
    disconnected (consensus never happens). One gossip step shrinks the consensus distance by at
    least the factor ``(1 - gap)^2``.
    """
    w = check_mixing_matrix(W)
    magnitudes = np.sort(np.abs(np.linalg.eigvalsh(w)))[::-1]
    return float(max(0.0, 1.0 - magnitudes[1]))


def _num_directed_edges(w: np.ndarray) -> int:
    """Messages per gossip step: one per ordered pair ``(j, i)``, ``i != j``, with ``W_ij != 0``."""
    off = w != 0
    np.fill_diagonal(off, False)
    return int(off.sum())


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


# ---------------------------------------------------------------------------------- simulation
@dataclass
class DecentralizedRecord:
    """One round. Accuracy fields are None in rounds without that evaluation."""

    round: int
    train_loss: float | None  # mean local training loss over the clients that trained
    consensus_distance_before_gossip: float  # after local training, before mixing
    consensus_distance: float  # after the gossip step
    accuracy: float | None  # of the average model x_bar on the test set
    loss: float | None
    client_accuracy_mean: float | None  # of the individual client models (only with eval_clients)
    client_accuracy_min: float | None
    bytes_sent: int  # one state per directed edge of the graph
    seconds: float
    eval_seconds: float
    rejected: dict[int, str] = field(default_factory=dict)


@dataclass
class DecentralizedHistory(History):
    """Per-round records of a decentralized run (``rounds`` holds :class:`DecentralizedRecord`)."""

    def cumulative_bytes_sent(self) -> list[int]:
        return self.cumulative("bytes_sent")


class DecentralizedSimulation:
    """Serverless FL on a graph, in one process: local SGD on every client, then one gossip step.

    State: every client's model (``states``, all starting from ``model``'s weights), the round and the
    history. ``clients`` are :class:`~labsupport.fl.simulation.DataClient` objects (or anything with
    ``num_samples`` and ``fit``); client ``i``'s batch order in round ``t`` is seeded by
    ``client_seed(seed, t, i)``, as in :class:`~labsupport.fl.simulation.FedAvgSimulation`. ``W`` is a
    symmetric doubly stochastic ``n x n`` matrix (:func:`mixing_matrix`); ``W = I`` is local training
    with no communication. ``test`` is ``(x, y)``: the average model is evaluated every ``eval_every``
    rounds (and at the last round of :meth:`run`), and with ``eval_clients=True`` every client's own
    model too (``n`` evaluations). A client whose update fails validation keeps its previous model.
    """

    def __init__(
        self,
        model: nn.Module,
        clients: Sequence[Client],
        test: tuple[torch.Tensor, torch.Tensor] | None,
        W: np.ndarray | torch.Tensor,
        *,
        local_epochs: int = 1,
        batch_size: int | None = 10,
        lr: float = 0.05,
        optimizer: str = "sgd",
        momentum: float = 0.0,
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
        self.W = check_mixing_matrix(W, len(clients))
        # The clients' fit() takes FedAvg's config; only its local-training knobs are used here.
        self.config = FedAvgConfig(
            num_rounds=0,
            fraction_train=1.0,
            local_epochs=local_epochs,
            batch_size=batch_size,
            lr=lr,
            optimizer=optimizer,
            momentum=momentum,
            seed=seed,
            eval_every=eval_every,
        )
        self.eval_clients = eval_clients
        self.model = model
        self.scratch = copy.deepcopy(model)  # clients train in this one
        self.clients = list(clients)
        self.test = test
        initial = clone_state(model.state_dict())
        self.states: list[StateDict] = [clone_state(initial) for _ in self.clients]
        self.round = 0
        self.history = DecentralizedHistory()
        self.spectral_gap = spectral_gap(self.W)
        self.num_directed_edges = _num_directed_edges(self.W)
        self._state_nbytes = payload_nbytes(initial)  # same shapes every round

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def _local_training(self) -> tuple[list[StateDict], list[float], dict[int, str]]:
        trained, losses, rejected = [], [], {}
        for cid, client in enumerate(self.clients):
            own = self.states[cid]
            reply = fit_or_reject(client, cid, self.scratch, own, self.config, self.round + 1)
            if isinstance(reply, str):  # a bad client keeps its model; the run goes on
                rejected[cid] = reply
                state, metrics = own, {}
            else:
                state, _, metrics = reply
            trained.append(state)
            if isinstance(metrics, Mapping) and "loss" in metrics:
                losses.append(float(metrics["loss"]))
        return trained, losses, rejected

    def run_round(self, *, evaluate_now: bool | None = None) -> DecentralizedRecord:
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
            evaluate_now = self.round % self.config.eval_every == 0
        acc = loss = acc_mean = acc_min = None
        if self.test is not None and evaluate_now:
            metrics = self.evaluate()
            acc, loss = metrics["accuracy"], metrics["loss"]
            if self.eval_clients:
                accs = [m["accuracy"] for m in self.evaluate_clients()]
                acc_mean, acc_min = float(np.mean(accs)), float(min(accs))
        end = time.perf_counter()
        record = DecentralizedRecord(
            round=self.round,
            train_loss=sum(losses) / len(losses) if losses else None,
            consensus_distance_before_gossip=before,
            consensus_distance=after,
            accuracy=acc,
            loss=loss,
            client_accuracy_mean=acc_mean,
            client_accuracy_min=acc_min,
            bytes_sent=self._state_nbytes * self.num_directed_edges,
            seconds=end - start,
            eval_seconds=end - eval_start,
            rejected=rejected,
        )
        self.history.rounds.append(record)
        return record

    def run(
        self, num_rounds: int, *, progress: bool = True, desc: str = "gossip"
    ) -> DecentralizedHistory:
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
            postfix = {"consensus": f"{record.consensus_distance:.2e}"}
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
