"""Behaviour of labsupport.partitions: coverage, sizes, class counts, determinism, validation, plots."""

from __future__ import annotations

import io
import os

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch

from labsupport.partitions import (
    QUANTITY_KINDS,
    client_data,
    dirichlet,
    feature_skew,
    iid,
    label_counts,
    partition,
    plot_partition,
    quantity_skew,
    shards,
)

# (scheme, kwargs) pairs that every generic test runs over.
SCHEMES = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.5, "min_partition_size": 0}),
    ("shards", {"shards_per_client": 2}),
    ("quantity", {"kind": "linear"}),
    ("quantity", {"kind": "square"}),
    ("quantity", {"kind": "exponential"}),
    ("quantity", {"kind": "dirichlet", "beta": 0.5, "min_partition_size": 1}),
]
SCHEME_IDS = [f"{s}-{kw.get('kind', '')}".rstrip("-") for s, kw in SCHEMES]


@pytest.fixture(scope="module", autouse=True)
def _import_flwr_datasets_once():
    """The first flwr-backed call imports `datasets` (seconds); pay it once, outside the tests."""
    iid(np.zeros(4, dtype=np.int64), 2)


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """5,000 labels in 10 classes with unequal class sizes (n not a multiple of most client counts)."""
    return np.random.default_rng(123).integers(0, 10, size=5003)


def _flwr_indices(partitioner, y: np.ndarray) -> list[np.ndarray]:
    """Run a flwr-datasets partitioner directly, independently of labsupport's bridge."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    partitioner.dataset = datasets.Dataset.from_dict({"i": np.arange(len(y)), "label": y})
    return [
        np.sort(np.asarray(partitioner.load_partition(c)[:]["i"]))
        for c in range(partitioner.num_partitions)
    ]


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "each part must be sorted and free of duplicates"
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


# ----------------------------------------------------------------------------------------------
# Every scheme
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("scheme", "kwargs"), SCHEMES, ids=SCHEME_IDS)
@pytest.mark.parametrize("num_clients", [1, 7, 100])
def test_every_scheme_uses_every_sample_exactly_once(labels, scheme, kwargs, num_clients):
    parts = partition(labels, num_clients, scheme, seed=3, **kwargs)
    assert len(parts) == num_clients
    _assert_exact_cover(parts, len(labels))


@pytest.mark.parametrize(("scheme", "kwargs"), SCHEMES, ids=SCHEME_IDS)
def test_every_scheme_gives_one_client_all_samples(labels, scheme, kwargs):
    (only,) = partition(labels, 1, scheme, **kwargs)
    np.testing.assert_array_equal(only, np.arange(len(labels)))


@pytest.mark.parametrize(("scheme", "kwargs"), SCHEMES, ids=SCHEME_IDS)
def test_every_scheme_handles_as_many_clients_as_samples(scheme, kwargs):
    y = np.repeat(np.arange(3), 10)
    if scheme == "shards":
        kwargs = {"shards_per_client": 1}  # num_clients * 2 shards would exceed n
    parts = partition(y, len(y), scheme, seed=1, **kwargs)
    _assert_exact_cover(parts, len(y))
    if scheme != "dirichlet":  # label-skew may leave clients empty (min_partition_size=0)
        assert all(len(p) == 1 for p in parts)


@pytest.mark.parametrize(("scheme", "kwargs"), SCHEMES, ids=SCHEME_IDS)
def test_same_seed_gives_same_partition_and_other_seed_another(labels, scheme, kwargs):
    a = partition(labels, 10, scheme, seed=5, **kwargs)
    b = partition(labels, 10, scheme, seed=5, **kwargs)
    c = partition(labels, 10, scheme, seed=6, **kwargs)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


@pytest.mark.parametrize(("scheme", "kwargs"), SCHEMES, ids=SCHEME_IDS)
def test_labels_as_list_tensor_or_array_give_the_same_partition(labels, scheme, kwargs):
    small = labels[:500]
    ref = partition(small, 5, scheme, **kwargs)
    for form in (small.tolist(), torch.from_numpy(small), small.astype(np.uint8)):
        got = partition(form, 5, scheme, **kwargs)
        assert all(np.array_equal(p, q) for p, q in zip(ref, got, strict=True))


@pytest.mark.parametrize(("scheme", "kwargs"), SCHEMES, ids=SCHEME_IDS)
def test_5000_labels_split_over_100_clients_use_every_sample_once(labels, scheme, kwargs):
    # the cross-device setting of chapter 01 (speed is a benchmark's business, not a test's)
    parts = partition(labels[:5000], 100, scheme, seed=0, **kwargs)
    assert len(parts) == 100 and all(len(p) > 0 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(5000))


# ----------------------------------------------------------------------------------------------
# IID and Dirichlet label skew
# ----------------------------------------------------------------------------------------------


def test_iid_sizes_differ_by_at_most_one(labels):
    parts = iid(labels, 10)
    sizes = sorted(len(p) for p in parts)
    assert sizes == sorted(len(a) for a in np.array_split(np.arange(len(labels)), 10))


def test_iid_clients_have_the_global_class_mix(labels):
    counts = label_counts(labels, iid(labels, 4, seed=2))
    expected = np.bincount(labels) / len(labels) * counts.sum(axis=1, keepdims=True)
    # Hypergeometric counts: within 5 standard deviations (about 5 * sqrt(1250 * 0.09)).
    assert np.abs(counts - expected).max() < 55


def test_dirichlet_with_huge_alpha_splits_every_class_evenly():
    y = np.repeat(np.arange(10), 500)
    counts = label_counts(y, dirichlet(y, 10, alpha=1e7, seed=0))
    assert np.abs(counts - 50).max() <= 1


def test_dirichlet_with_tiny_alpha_puts_each_class_on_one_client():
    y = np.repeat(np.arange(10), 500)
    counts = label_counts(y, dirichlet(y, 20, alpha=1e-6, seed=0, min_partition_size=0))
    # Flooring the cumulative shares can leak a sample to a neighbour; the rest is on one client.
    np.testing.assert_array_equal((counts >= 499).sum(axis=0), np.ones(10))
    held = counts[counts.sum(axis=1) > 0] > 1
    assert held.sum(axis=1).mean() <= 2.0  # about one class per non-empty client


def test_dirichlet_smaller_alpha_gives_more_skewed_clients(labels):
    def mean_classes(alpha: float) -> float:
        counts = label_counts(labels, dirichlet(labels, 20, alpha=alpha, min_partition_size=0))
        return float((counts > 0).sum(axis=1).mean())

    assert mean_classes(0.05) < mean_classes(0.5) < mean_classes(100.0) == 10.0


def test_dirichlet_keeps_every_client_at_min_partition_size(labels):
    parts = dirichlet(labels, 20, alpha=0.5, min_partition_size=100, seed=4)
    assert min(len(p) for p in parts) >= 100


def test_dirichlet_explains_an_unreachable_min_partition_size(labels):
    with pytest.raises(ValueError, match=r"min_partition_size=10 .* alpha=0\.01"):
        dirichlet(labels, 50, alpha=0.01, min_partition_size=10)


def test_dirichlet_matches_flwr_dirichlet_partitioner(labels):
    from flwr_datasets.partitioner import DirichletPartitioner

    ref = _flwr_indices(DirichletPartitioner(8, "label", alpha=0.3, seed=9), labels)
    got = dirichlet(labels, 8, alpha=0.3, seed=9)
    assert all(np.array_equal(p, q) for p, q in zip(ref, got, strict=True))


# ----------------------------------------------------------------------------------------------
# Shards (McMahan et al. 2017)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_clients", "per_client"), [(100, 2), (37, 3), (5, 2), (10, 1)])
def test_shards_give_each_client_at_most_shards_per_client_classes(labels, num_clients, per_client):
    parts = shards(labels, num_clients, shards_per_client=per_client, seed=1)
    _assert_exact_cover(parts, len(labels))
    classes_per_client = (label_counts(labels, parts) > 0).sum(axis=1)
    assert classes_per_client.max() <= per_client
    sizes = np.array([len(p) for p in parts])
    expected = len(labels) / num_clients
    assert np.all(np.abs(sizes - expected) <= 0.1 * expected + per_client)


def test_shards_spread_the_remainder_when_n_is_not_divisible():
    y = np.zeros(103, dtype=np.int64)  # one class: all ties, shards of 11 or 10 samples
    parts = shards(y, 5, shards_per_client=2, seed=0)
    _assert_exact_cover(parts, 103)
    assert sorted(len(p) for p in parts) in ([20, 20, 21, 21, 21], [20, 20, 20, 21, 22])
    assert sum(len(p) for p in parts) == 103


def test_shards_cut_a_single_class_into_contiguous_runs_of_the_stable_sort():
    y = np.array([1, 0, 1, 0, 1, 0, 1, 0])
    parts = shards(y, 2, shards_per_client=1, seed=0)
    assert sorted(map(tuple, parts)) == [(0, 2, 4, 6), (1, 3, 5, 7)]


@pytest.mark.filterwarnings("ignore:Specifying null_placement:FutureWarning")  # pyarrow, in flwr
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shards_match_flwr_shard_partitioner_when_classes_divide_evenly(seed):
    from flwr_datasets.partitioner import ShardPartitioner

    y = np.random.default_rng(seed).permutation(np.repeat(np.arange(10), 60))
    ref = _flwr_indices(
        ShardPartitioner(10, "label", num_shards_per_partition=3, shuffle=False, seed=seed), y
    )
    got = shards(y, 10, shards_per_client=3, seed=seed)
    assert all(np.array_equal(p, q) for p, q in zip(ref, got, strict=True))


def test_shards_with_fewer_shards_than_classes_still_use_every_sample(labels):
    parts = shards(labels, 2, shards_per_client=2)
    _assert_exact_cover(parts, len(labels))
    assert abs(len(parts[0]) - len(parts[1])) <= 2


# ----------------------------------------------------------------------------------------------
# Quantity skew
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "square", "exponential"])
def test_quantity_sizes_match_flwr_size_partitioners(labels, kind):
    from flwr_datasets import partitioner as fp

    cls = {
        "linear": fp.LinearPartitioner,
        "square": fp.SquarePartitioner,
        "exponential": fp.ExponentialPartitioner,
    }[kind]
    ref_sizes = [len(p) for p in _flwr_indices(cls(6), labels)]
    assert [len(p) for p in quantity_skew(labels, 6, kind=kind)] == ref_sizes


@pytest.mark.parametrize("kind", ["linear", "square", "exponential"])
def test_quantity_gives_every_client_a_sample_where_flwr_would_leave_one_empty(labels, kind):
    from flwr_datasets import partitioner as fp

    cls = {
        "linear": fp.LinearPartitioner,
        "square": fp.SquarePartitioner,
        "exponential": fp.ExponentialPartitioner,
    }[kind]
    with pytest.raises(ValueError, match="not greater than 0"):
        _flwr_indices(cls(100), labels)
    sizes = np.array([len(p) for p in quantity_skew(labels, 100, kind=kind)])
    assert sizes.min() >= 1 and sizes.sum() == len(labels)
    assert np.all(np.diff(sizes) >= 0)  # client ids ordered by size, as in flwr-datasets


def test_quantity_exponential_with_more_clients_than_exp_can_hold():
    y = np.zeros(2000, dtype=np.int64)
    sizes = np.array([len(p) for p in quantity_skew(y, 1000, kind="exponential")])
    assert sizes.sum() == 2000 and sizes.min() == 1
    assert sizes[-1] > sizes[-2] > sizes[0]


def test_quantity_dirichlet_smaller_beta_gives_more_unequal_sizes(labels):
    def spread(beta: float) -> float:
        sizes = [len(p) for p in quantity_skew(labels, 20, kind="dirichlet", beta=beta)]
        return float(np.std(sizes) / np.mean(sizes))

    assert spread(0.1) > spread(1.0) > spread(1000.0)
    assert spread(1000.0) < 0.05


def test_quantity_dirichlet_respects_min_partition_size(labels):
    parts = quantity_skew(labels, 50, kind="dirichlet", beta=0.05, min_partition_size=30)
    assert min(len(p) for p in parts) >= 30


def test_quantity_skew_keeps_labels_iid_within_each_client(labels):
    parts = quantity_skew(labels, 5, kind="exponential", seed=2)
    big = label_counts(labels, parts)[-1]
    expected = np.bincount(labels) / len(labels) * big.sum()
    assert np.abs(big - expected).max() < 5 * np.sqrt(expected.max())


# ----------------------------------------------------------------------------------------------
# Feature skew
# ----------------------------------------------------------------------------------------------


def test_feature_skew_applies_one_affine_map_per_client_and_leaves_x_untouched():
    x = torch.randn(60, 1, 8, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    parts = [np.arange(0, 20), np.arange(20, 45), np.arange(45, 60)]
    out = feature_skew(x, parts, noise_std=0.0, seed=1)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(x, before)
    fitted = []
    for idx in parts:
        a, b = x[idx].reshape(-1).numpy(), out[idx].reshape(-1).numpy()
        scale, shift = np.polyfit(a, b, deg=1)
        np.testing.assert_allclose(b, scale * a + shift, atol=1e-5)
        assert 0.7 <= scale <= 1.3
        fitted.append((scale, shift))
    assert len({round(s, 6) for s, _ in fitted}) == 3


def test_feature_skew_noise_has_the_requested_standard_deviation():
    x = torch.zeros(4000, 5)
    parts = [np.arange(2000), np.arange(2000, 4000)]
    out = feature_skew(x, parts, scale_range=(1, 1), shift_std=0.0, noise_std=0.5)
    assert abs(out.std().item() - 0.5) < 0.01
    assert abs(out.mean().item()) < 0.01


def test_feature_skew_is_deterministic_by_seed(labels):
    x = torch.randn(100, 3)
    parts = iid(labels[:100], 4)
    assert torch.equal(feature_skew(x, parts, seed=7), feature_skew(x, parts, seed=7))
    assert not torch.equal(feature_skew(x, parts, seed=7), feature_skew(x, parts, seed=8))


def test_feature_skew_copies_samples_outside_every_part_unchanged():
    x = torch.randn(10, 2)
    out = feature_skew(x, [np.array([0, 1, 2]), np.array([], dtype=np.int64)])
    assert torch.equal(out[3:], x[3:])
    assert not torch.equal(out[:3], x[:3])


@pytest.mark.parametrize(
    ("x", "parts", "kwargs", "error", "match"),
    [
        (torch.zeros(5, 2), [np.array([0, 1]), np.array([1, 2])], {}, ValueError, "sample 1"),
        (torch.zeros(5, 2), [np.array([0, 5])], {}, ValueError, "index 5"),
        (torch.zeros(5, 2), [np.array([-1])], {}, ValueError, "index -1"),
        (torch.zeros(5, 2, dtype=torch.long), [np.array([0])], {}, TypeError, "floating"),
        (np.zeros((5, 2)), [np.array([0])], {}, TypeError, "torch.Tensor"),
        (torch.zeros(5), np.array([0, 1]), {}, TypeError, "list of index arrays"),
        (torch.zeros(5), [np.array([0])], {"scale_range": (1.3, 0.7)}, ValueError, "low <= high"),
        (torch.zeros(5), [np.array([0])], {"noise_std": -0.1}, ValueError, "noise_std"),
    ],
)
def test_feature_skew_rejects_bad_inputs(x, parts, kwargs, error, match):
    with pytest.raises(error, match=match):
        feature_skew(x, parts, **kwargs)


# ----------------------------------------------------------------------------------------------
# label_counts, client_data, plot_partition
# ----------------------------------------------------------------------------------------------


def test_label_counts_match_bincount_per_client(labels):
    parts = dirichlet(labels, 6, alpha=0.2, min_partition_size=0, seed=3)
    counts = label_counts(labels, parts)
    assert counts.shape == (6, 10) and counts.dtype == np.int64
    for c, idx in enumerate(parts):
        np.testing.assert_array_equal(counts[c], np.bincount(labels[idx], minlength=10))
    np.testing.assert_array_equal(counts.sum(axis=0), np.bincount(labels))


def test_label_counts_pads_to_num_classes_and_rejects_too_few():
    y = np.array([0, 1, 1, 2])
    np.testing.assert_array_equal(
        label_counts(y, [[0, 1], [2, 3]], 5), [[1, 1, 0, 0, 0], [0, 1, 1, 0, 0]]
    )
    with pytest.raises(ValueError, match=r"num_classes=2 .* class 2"):
        label_counts(y, [[0, 1]], 2)
    assert label_counts(y, []).shape == (0, 3)


def test_client_data_returns_each_clients_rows():
    x = torch.arange(20.0).reshape(10, 2)
    y = torch.arange(10)
    parts = [np.array([0, 3]), np.array([], dtype=np.int64), np.array([9])]
    data = client_data(x, y, parts)
    assert len(data) == 3
    assert torch.equal(data[0][0], torch.tensor([[0.0, 1.0], [6.0, 7.0]]))
    assert torch.equal(data[0][1], torch.tensor([0, 3]))
    assert data[1][0].shape == (0, 2) and data[1][1].shape == (0,)
    assert data[2][1].tolist() == [9]


def test_client_data_rejects_parts_that_do_not_index_x_and_mismatched_lengths():
    x, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"parts\[1\] holds index 4, but x has 4 samples"):
        client_data(x, y, [np.array([0]), np.array([4])])
    with pytest.raises(ValueError, match="same number of samples"):
        client_data(x, y[:3], [np.array([0])])
    with pytest.raises(TypeError, match="integer indices"):
        client_data(x, y, [np.array([0.5])])


@pytest.mark.parametrize(("num_clients", "num_classes"), [(10, 10), (100, 4)])
def test_plot_partition_draws_one_stacked_bar_per_client_and_class(num_clients, num_classes):
    # 100 clients x 4 classes keeps the test fast: matplotlib spends about 0.5 ms per bar.
    y = np.random.default_rng(0).integers(0, num_classes, size=3000)
    parts = dirichlet(y, num_clients, alpha=0.5, min_partition_size=0)
    fig = plot_partition(y, parts, title="test")
    (ax,) = fig.axes
    assert len(ax.containers) == num_classes
    assert all(len(container.patches) == num_clients for container in ax.containers)
    assert len(ax.patches) == num_classes * num_clients
    tops = np.array([[bar.get_y() + bar.get_height() for bar in c.patches] for c in ax.containers])
    np.testing.assert_allclose(tops.max(axis=0), [len(p) for p in parts])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [str(k) for k in range(num_classes)]
    assert ax.get_title() == "test"
    assert ax.get_ylim()[1] > max(len(p) for p in parts)  # the tallest bar is not cut off
    if num_clients == 10:  # rendering is slow for many bars; the structure is checked above
        fig.savefig(io.BytesIO(), format="png")


def test_plot_partition_draws_on_a_given_axes():
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    y = np.array([0, 1, 2, 2])
    assert plot_partition(y, [[0, 1], [2, 3]], num_classes=4, ax=ax) is fig
    assert len(ax.containers) == 4
    with pytest.raises(ValueError, match="at least one client"):
        plot_partition(y, [])


# ----------------------------------------------------------------------------------------------
# Validation at the boundary
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda y: partition(y, 0), ValueError, "num_clients must be between 1 and .* got 0"),
        (lambda y: partition(y, 11), ValueError, r"\(10\), got 11"),
        (lambda y: partition(y, 2.5), TypeError, "num_clients must be an integer"),
        (lambda y: partition(y, True), TypeError, "num_clients must be an integer"),
        (lambda y: partition(y, 2, "pathological"), ValueError, "unknown partition scheme"),
        (lambda y: partition(y, 2, "iid", alpha=0.5), TypeError, r"'iid' .* \['alpha'\]"),
        (lambda y: partition(y, 2, seed=-1), ValueError, "seed must be a non-negative"),
        (lambda y: dirichlet(y, 2, alpha=0), ValueError, "alpha must be a finite number > 0"),
        (lambda y: dirichlet(y, 2, alpha=float("nan")), ValueError, "alpha"),
        (lambda y: dirichlet(y, 2, alpha="big"), TypeError, "alpha"),
        (lambda y: dirichlet(y, 2, min_partition_size=6), ValueError, "needs 12 samples"),
        (lambda y: shards(y, 3, shards_per_client=4), ValueError, "12 shards.* only 10"),
        (lambda y: shards(y, 3, shards_per_client=0), ValueError, "shards_per_client must be"),
        (lambda y: quantity_skew(y, 2, kind="zipf"), ValueError, "unknown quantity-skew kind"),
        (lambda y: quantity_skew(y, 2, kind="linear", beta=1), TypeError, r"\['beta'\]"),
        (lambda y: quantity_skew(y, 2, kind="dirichlet", beta=-1), ValueError, "beta"),
        (lambda y: partition(y.astype(float), 2), TypeError, "integer class indices"),
        (lambda y: partition(y.reshape(2, 5), 2), ValueError, "1-D"),
        (lambda y: partition(y - 1, 2), ValueError, "non-negative"),
        (lambda y: partition([], 1), ValueError, "empty"),
    ],
)
def test_bad_arguments_raise_naming_the_value(call, error, match):
    y = np.arange(10) % 3
    with pytest.raises(error, match=match):
        call(y)


def test_quantity_kinds_are_all_reachable_through_partition(labels):
    for kind in QUANTITY_KINDS:
        _assert_exact_cover(partition(labels, 4, "quantity", kind=kind), len(labels))
