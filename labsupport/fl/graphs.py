"""Communication graphs and mixing matrices for decentralized (peer-to-peer) FL.

``n`` clients sit on the nodes of a connected graph and only talk to their neighbours. A symmetric,
doubly stochastic mixing matrix ``W`` (``W_ij > 0`` only for neighbours and ``i = j``) says how much
of each neighbour's model a client takes in one gossip step ``x_i <- sum_j W_ij x_j``
(:mod:`labsupport.fl.gossip`). Because ``W`` is doubly stochastic the average is unchanged by a step,
and because it is symmetric the distance to consensus shrinks by at least ``lambda_2^2`` per step,
``lambda_2`` being the second largest eigenvalue magnitude of ``W``; the *spectral gap*
``delta = 1 - |lambda_2|`` (:func:`spectral_gap`) predicts how fast consensus happens (Koloskova et
al. 2020's consensus rate is ``p = 1 - lambda_2^2 = delta (2 - delta)``).

* graphs as symmetric boolean adjacency matrices -- :func:`ring`, :func:`random_regular`,
  :func:`fully_connected`, :func:`torus`, :func:`star` (networkx graphs are accepted where an
  adjacency is expected, :func:`as_adjacency`);
* :func:`mixing_matrix` (Metropolis-Hastings or max-degree weights, Xiao & Boyd 2004),
  :func:`check_mixing_matrix`, :func:`spectral_gap`, :func:`num_directed_edges`.
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import torch

__all__ = [
    "as_adjacency",
    "check_mixing_matrix",
    "fully_connected",
    "mixing_matrix",
    "num_directed_edges",
    "random_regular",
    "ring",
    "spectral_gap",
    "star",
    "torus",
]

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


def num_directed_edges(w: np.ndarray) -> int:
    """Messages per gossip step: one per ordered pair ``(j, i)``, ``i != j``, with ``W_ij != 0``."""
    off = w != 0
    np.fill_diagonal(off, False)
    return int(off.sum())
