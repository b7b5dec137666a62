"""Communication graphs and mixing matrices (labsupport.fl.graphs)."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch

from labsupport.fl.graphs import (
    as_adjacency,
    check_mixing_matrix,
    fully_connected,
    mixing_matrix,
    num_directed_edges,
    random_regular,
    ring,
    spectral_gap,
    star,
    torus,
)

GRAPHS = {
    "ring16": lambda: ring(16),
    "ring2": lambda: ring(2),
    "random_regular16_4": lambda: random_regular(16, 4, seed=0),
    "complete16": lambda: fully_connected(16),
    "torus4x4": lambda: torus(4, 4),
    "star16": lambda: star(16),
}


# --------------------------------------------------------------------------- graphs and W
@pytest.mark.parametrize("kind", ["metropolis", "max_degree"])
@pytest.mark.parametrize("name", list(GRAPHS))
def test_mixing_matrix_is_symmetric_doubly_stochastic_and_follows_the_graph(
    name: str, kind: str
) -> None:
    a = GRAPHS[name]()
    w = mixing_matrix(a, kind)
    np.testing.assert_allclose(w, w.T, atol=1e-15)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    assert (w >= 0).all()
    off_graph = ~a & ~np.eye(len(a), dtype=bool)
    assert (w[off_graph] == 0).all()
    assert (w[a] > 0).all()
    assert spectral_gap(w) > 0  # every graph here is connected


def test_metropolis_weights_on_a_star_match_the_hand_worked_values() -> None:
    # hub degree 3, leaves degree 1: W_hub,leaf = 1/(1+3), W_hub,hub = 1/4, W_leaf,leaf = 3/4
    expected = np.array(
        [[0.25, 0.25, 0.25, 0.25], [0.25, 0.75, 0, 0], [0.25, 0, 0.75, 0], [0.25, 0, 0, 0.75]]
    )
    np.testing.assert_allclose(mixing_matrix(star(4)), expected, atol=1e-15)


def test_graphs_have_the_expected_degrees_and_match_networkx() -> None:
    assert (ring(16).sum(axis=1) == 2).all()
    assert (random_regular(16, 4, seed=3).sum(axis=1) == 4).all()
    assert (fully_connected(16).sum(axis=1) == 15).all()
    assert (torus(4, 5).sum(axis=1) == 4).all()
    assert nx.is_isomorphic(nx.from_numpy_array(ring(9).astype(int)), nx.cycle_graph(9))
    grid = nx.grid_2d_graph(4, 5, periodic=True)
    assert nx.is_isomorphic(nx.from_numpy_array(torus(4, 5).astype(int)), grid)
    np.testing.assert_array_equal(as_adjacency(nx.cycle_graph(9)), ring(9))


def test_complete_graph_metropolis_weights_are_the_exact_average() -> None:
    np.testing.assert_allclose(
        mixing_matrix(fully_connected(7)), np.full((7, 7), 1 / 7), atol=1e-15
    )
    assert spectral_gap(mixing_matrix(fully_connected(7))) == pytest.approx(1.0, abs=1e-12)


def test_spectral_gap_orders_ring_below_random_regular_below_complete() -> None:
    gaps = [
        spectral_gap(mixing_matrix(a))
        for a in (ring(16), random_regular(16, 4, seed=0), fully_connected(16))
    ]
    assert 0 < gaps[0] < gaps[1] < gaps[2]
    assert gaps[2] == pytest.approx(1.0)


@pytest.mark.parametrize("n", [3, 8, 16, 25])
def test_ring_spectrum_matches_the_closed_form(n: int) -> None:
    w = mixing_matrix(ring(n))
    k = np.arange(n)
    closed_form = 1 / 3 + 2 / 3 * np.cos(2 * np.pi * k / n)
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(w)), np.sort(closed_form), atol=1e-12)
    lam2 = np.sort(np.abs(closed_form))[::-1][1]
    assert spectral_gap(w) == pytest.approx(1 - lam2, abs=1e-12)


def second_eigenvalue_magnitude(w: np.ndarray) -> float:
    return float(np.sort(np.abs(np.linalg.eigvals(w)))[::-1][1])


def test_spectral_gap_is_one_minus_the_second_eigenvalue_magnitude() -> None:
    for name, make in GRAPHS.items():
        w = mixing_matrix(make())
        assert spectral_gap(w) == pytest.approx(1 - second_eigenvalue_magnitude(w), abs=1e-12), name


def test_spectral_gap_is_zero_when_the_graph_is_disconnected() -> None:
    two_edges = np.zeros((4, 4), dtype=bool)
    two_edges[0, 1] = two_edges[1, 0] = two_edges[2, 3] = two_edges[3, 2] = True
    assert spectral_gap(mixing_matrix(two_edges)) == pytest.approx(0.0, abs=1e-12)
    assert spectral_gap(np.eye(5)) == 0.0


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: ring(1), ValueError, "n >= 2"),
        (lambda: fully_connected(0), ValueError, "n >= 2"),
        (lambda: ring(4.0), TypeError, "integer"),
        (lambda: ring(True), TypeError, "integer"),
        (lambda: random_regular(8, 8), ValueError, r"degree must be in \[1, n-1\]"),
        (lambda: random_regular(8, 0), ValueError, "degree must be in"),
        (lambda: random_regular(5, 3), ValueError, "odd"),
        (lambda: random_regular(6, 1, seed=0), ValueError, "disconnected.*another seed"),
        (lambda: torus(2, 4), ValueError, "rows >= 3"),
        (lambda: torus(4, 2), ValueError, "cols >= 3"),
        (lambda: mixing_matrix(ring(4), kind="uniform"), ValueError, "unknown mixing matrix kind"),
        (lambda: mixing_matrix(np.triu(fully_connected(3))), ValueError, "symmetric"),
        (lambda: mixing_matrix(np.ones((3, 3), dtype=bool)), ValueError, "self-loop"),
        (lambda: mixing_matrix(np.full((3, 3), 2)), ValueError, "0/1"),
        (lambda: mixing_matrix(np.zeros((3, 4), dtype=bool)), ValueError, "square"),
        (lambda: mixing_matrix(nx.DiGraph([(0, 1), (1, 0)])), ValueError, "undirected"),
        (lambda: mixing_matrix([[0, 1], [1, 0]]), TypeError, "adjacency matrix or a networkx"),
        (lambda: check_mixing_matrix(np.full((3, 3), 0.5)), ValueError, "doubly stochastic"),
        (lambda: check_mixing_matrix(np.array([[0.5, 0.5], [0.4, 0.6]])), ValueError, "symmetric"),
        (
            lambda: check_mixing_matrix(np.array([[1.5, -0.5], [-0.5, 1.5]])),
            ValueError,
            "nonnegative",
        ),
        (lambda: check_mixing_matrix(np.full((2, 2), np.nan)), ValueError, "non-finite"),
        (lambda: check_mixing_matrix(np.eye(3), n=4), ValueError, "3 x 3 but there are 4"),
        (lambda: check_mixing_matrix(np.ones(3)), ValueError, "square"),
    ],
)
def test_invalid_inputs_raise_a_clear_error(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    ("graph", "edges"), [(ring(6), 12), (fully_connected(6), 30), (star(6), 10)]
)
def test_num_directed_edges_counts_one_message_per_ordered_neighbour_pair(graph, edges) -> None:
    assert num_directed_edges(mixing_matrix(graph)) == edges == int(graph.sum())
    assert num_directed_edges(np.eye(6)) == 0


def test_a_torch_adjacency_and_a_torch_mixing_matrix_are_accepted() -> None:
    w = mixing_matrix(torch.from_numpy(ring(5)))
    np.testing.assert_array_equal(w, mixing_matrix(ring(5)))
    assert spectral_gap(torch.from_numpy(w)) == pytest.approx(spectral_gap(w))
