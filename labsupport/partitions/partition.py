"""Federated partitions: how a centralized dataset is split across simulated clients.

Every scheme returns one sorted ``int64`` index array per client; together they use every sample
exactly once, and the same ``seed`` gives the same partition.

* :func:`iid` -- a random split into sizes that differ by at most one (the IID baseline).
* :func:`dirichlet` -- label skew: for each class ``k`` the shares of its samples across the clients
  are drawn from ``Dir(alpha)``. Hsu et al., "Measuring the effects of non-identical data
  distribution for federated visual classification" (2019) introduced Dirichlet label skew; the
  per-class draw over clients used here is the variant of Yurochkin et al. (2019) and NIID-Bench
  that flwr-datasets implements. Large ``alpha`` approaches IID; small ``alpha`` gives each class
  to one or a few clients.
* :func:`shards` -- pathological non-IID of McMahan et al., "Communication-efficient learning of
  deep networks from decentralized data" (AISTATS 2017): sort by label, cut into
  ``num_clients * shards_per_client`` shards, deal ``shards_per_client`` shards to each client.
* :func:`quantity_skew` -- unequal client sizes with IID labels inside each client, and
  :func:`feature_skew` -- a per-client affine transform plus noise of the inputs: two of the skews
  of Li et al., "Federated learning on non-IID data silos: an experimental study" (NIID-Bench,
  ICDE 2022).
* :func:`partition` dispatches by scheme name; :func:`label_counts`, :func:`client_data` and
  :func:`plot_partition` inspect and use the result.

Where flwr-datasets (Flower Datasets) has the scheme, its partitioner does the work on an in-memory
``datasets.Dataset`` that carries an index column (IID, Dirichlet, and the linear, square and
exponential quantity skews); our own code covers what it lacks or where it would drop samples
(shards, Dirichlet-sized quantity skew, feature skew), as each function's docstring says.

Chapter 03 (non-IID data) builds every experiment on these partitions, and the federated
simulations of chapter 01 use :func:`iid` and :func:`dirichlet` to give their clients data.
"""

from __future__ import annotations

import inspect
import math
import operator
import os
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "QUANTITY_KINDS",
    "SCHEMES",
    "client_data",
    "dirichlet",
    "feature_skew",
    "iid",
    "label_counts",
    "partition",
    "plot_partition",
    "quantity_skew",
    "shards",
]

LabelsLike = np.ndarray | Sequence[int] | torch.Tensor
PartsLike = Sequence[np.ndarray | Sequence[int] | torch.Tensor]

QUANTITY_KINDS: tuple[str, ...] = ("linear", "square", "exponential", "dirichlet")

_INDEX, _LABEL = "index", "label"
# np.exp overflows float64 above ~709; flwr's ExponentialPartitioner would then divide inf by inf.
_MAX_EXP_CLIENTS = 700


# ----------------------------------------------------------------------------------------------
# Input checks shared by every function
# ----------------------------------------------------------------------------------------------


def _as_labels(labels: LabelsLike) -> np.ndarray:
    """``labels`` as a 1-D int64 numpy array of non-negative class indices."""
    if isinstance(labels, torch.Tensor):
        arr = labels.detach().cpu().numpy()
    else:
        arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D (one class index per sample), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("labels is empty; expected at least one sample")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"labels must be integer class indices, got dtype {arr.dtype}")
    if arr.min() < 0:
        raise ValueError(f"labels must be non-negative class indices, got {int(arr.min())}")
    return arr.astype(np.int64, copy=False)


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an integer, got {value!r} of type {type(value).__name__}"
        ) from None


def _check_num_clients(num_clients: Any, n: int) -> int:
    num_clients = _as_int(num_clients, "num_clients")
    if not 1 <= num_clients <= n:
        raise ValueError(
            f"num_clients must be between 1 and the number of samples ({n}), got {num_clients}"
        )
    return num_clients


def _check_seed(seed: Any) -> int:
    seed = _as_int(seed, "seed")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return seed


def _check_positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name} must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_min_size(min_partition_size: Any, num_clients: int, n: int) -> int:
    min_partition_size = _as_int(min_partition_size, "min_partition_size")
    if min_partition_size < 0:
        raise ValueError(f"min_partition_size must be >= 0, got {min_partition_size}")
    if min_partition_size * num_clients > n:
        raise ValueError(
            f"min_partition_size={min_partition_size} for each of {num_clients} clients needs "
            f"{min_partition_size * num_clients} samples, but labels has only {n}"
        )
    return min_partition_size


def _as_parts(parts: PartsLike, n: int, what: str, *, disjoint: bool = False) -> list[np.ndarray]:
    """Check that ``parts`` is a list of integer index arrays into a collection of ``n`` samples."""
    if isinstance(parts, np.ndarray | torch.Tensor) and parts.ndim == 1:
        raise TypeError(
            "parts must be a list of index arrays (one per client), got a single 1-D array"
        )
    if isinstance(parts, str | bytes) or not isinstance(parts, Sequence | np.ndarray):
        raise TypeError(f"parts must be a list of index arrays, got {type(parts).__name__}")
    out = []
    for c, part in enumerate(parts):
        idx = part.detach().cpu().numpy() if isinstance(part, torch.Tensor) else np.asarray(part)
        if idx.ndim != 1:
            raise ValueError(f"parts[{c}] must be a 1-D index array, got shape {idx.shape}")
        if idx.size == 0:
            out.append(np.empty(0, dtype=np.int64))
            continue
        if idx.dtype.kind not in "iu":
            raise TypeError(f"parts[{c}] must hold integer indices, got dtype {idx.dtype}")
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= n:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"parts[{c}] holds index {bad}, but {what} has {n} samples "
                f"(valid indices are 0..{n - 1})"
            )
        out.append(idx.astype(np.int64, copy=False))
    if disjoint and out:
        seen = np.bincount(np.concatenate(out), minlength=n)
        if seen.max(initial=0) > 1:
            raise ValueError(
                f"sample {int(np.argmax(seen > 1))} is in more than one part; "
                "expected disjoint parts (one client per sample)"
            )
    return out


# ----------------------------------------------------------------------------------------------
# flwr-datasets bridge
# ----------------------------------------------------------------------------------------------


def _flwr_partitioners():
    """Import ``flwr_datasets.partitioner`` (and ``datasets``) offline, on first use only.

    Importing ``datasets`` takes a couple of seconds, so ``import labsupport.partitions`` stays fast and
    pays for it only when a flwr-backed scheme runs. The partitioners work on an in-memory dataset
    and need no network; the variables keep ``datasets`` from trying the Hub.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets
    from flwr_datasets import partitioner

    return datasets, partitioner


def _run_flwr(partitioner: Any, index: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    """Partition rows ``(index[i], labels[i])`` with a flwr-datasets partitioner.

    The dataset carries the original sample index as a column, so a partition read back gives the
    indices into the caller's ``labels`` whatever order the partitioner reorders rows in.
    """
    datasets, _ = _flwr_partitioners()
    # Arrow format: the partitioners read the label column with np.array(dataset[col]), which in
    # the default (python) format goes row by row: 0.1-0.8 s for 5,000 labels here, more than
    # the partitioning itself.
    dataset = datasets.Dataset.from_dict({_INDEX: index, _LABEL: labels}).with_format("arrow")
    partitioner.dataset = dataset
    return [
        np.sort(np.asarray(partitioner.load_partition(c)[:][_INDEX], dtype=np.int64))
        for c in range(partitioner.num_partitions)
    ]


def _blocks(order: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """Cut ``order`` into consecutive blocks of the given sizes (which sum to ``len(order)``)."""
    return [np.sort(block) for block in np.split(order, np.cumsum(sizes)[:-1])]


# ----------------------------------------------------------------------------------------------
# Schemes
# ----------------------------------------------------------------------------------------------


def iid(labels: LabelsLike, num_clients: int, *, seed: int = 0) -> list[np.ndarray]:
    """IID split: a random permutation cut into ``num_clients`` sizes that differ by at most one.

    flwr-datasets' ``IidPartitioner`` cuts the dataset into contiguous blocks in the order it is
    given (the first ``n % num_clients`` clients get one extra sample) and does not shuffle, so the
    rows are handed to it in an order permuted by ``seed``.
    """
    y = _as_labels(labels)
    num_clients = _check_num_clients(num_clients, len(y))
    order = np.random.default_rng(_check_seed(seed)).permutation(len(y))
    _, flwr_part = _flwr_partitioners()
    return _run_flwr(flwr_part.IidPartitioner(num_partitions=num_clients), order, y[order])


def dirichlet(
    labels: LabelsLike,
    num_clients: int,
    *,
    alpha: float = 0.5,
    seed: int = 0,
    min_partition_size: int = 10,
) -> list[np.ndarray]:
    """Label skew: each class's samples are split across clients in ``Dir(alpha)`` proportions.

    Uses flwr-datasets' ``DirichletPartitioner`` (no self-balancing, as in Hsu et al.): for each
    class ``k`` it draws ``p_k ~ Dir(alpha, ..., alpha)`` over the clients and cuts that class's
    samples at ``floor(cumsum(p_k) * n_k)``, so every sample is used. If a client ends up with
    fewer than ``min_partition_size`` samples the whole draw is repeated (up to 11 draws, then a
    ``ValueError``); its warning for each repeat is silenced here. Use ``min_partition_size=0``
    for very small ``alpha`` or many clients, where empty clients are expected.
    """
    y = _as_labels(labels)
    num_clients = _check_num_clients(num_clients, len(y))
    alpha = _check_positive(alpha, "alpha")
    min_partition_size = _check_min_size(min_partition_size, num_clients, len(y))
    _, flwr_part = _flwr_partitioners()
    partitioner = flwr_part.DirichletPartitioner(
        num_partitions=num_clients,
        partition_by=_LABEL,
        alpha=alpha,
        min_partition_size=min_partition_size,
        self_balancing=False,
        shuffle=False,  # we sort each client's indices anyway
        seed=_check_seed(seed),
    )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            return _run_flwr(partitioner, np.arange(len(y)), y)
    except ValueError as err:
        if "max number of attempts" not in str(err):
            raise
        raise ValueError(
            f"could not give each of {num_clients} clients at least min_partition_size="
            f"{min_partition_size} samples with alpha={alpha} in 11 Dirichlet draws; "
            "lower min_partition_size (0 allows empty clients) or raise alpha"
        ) from err


def _shards_per_class(class_sizes: np.ndarray, num_shards: int) -> np.ndarray:
    """How many shards to cut each class into: at least one each, ``num_shards`` in total.

    Each further shard goes to the class whose shards are currently the largest (ties to the lower
    class), which keeps shard sizes as equal as class boundaries allow and never gives a class more
    shards than samples (``num_shards <= n``).
    """
    counts = np.ones(len(class_sizes), dtype=np.int64)
    for _ in range(num_shards - len(class_sizes)):
        counts[np.argmax(class_sizes / counts)] += 1
    return counts


def shards(
    labels: LabelsLike, num_clients: int, *, shards_per_client: int = 2, seed: int = 0
) -> list[np.ndarray]:
    """Pathological non-IID (McMahan et al. 2017): each client gets ``shards_per_client`` shards.

    The samples are sorted by label (stable, so ties keep their original order) and cut into
    ``num_clients * shards_per_client`` shards; with ``perm = default_rng(seed).permutation(
    num_shards)``, client ``c`` gets shards ``perm[c * shards_per_client:(c + 1) *
    shards_per_client]``. Every client therefore has ``shards_per_client`` shards and at most
    that many classes.

    Our own code, because flwr-datasets' ``ShardPartitioner`` drops samples when ``n`` is not a
    multiple of the number of shards (it uses shards of ``floor(n / num_shards)`` samples, and with
    ``keep_incomplete_shard=True`` leaves a random shard unassigned), and its shards can straddle
    two classes. Here the cuts fall on class boundaries: each class is cut into a number of shards
    roughly proportional to its size (at least one; see :func:`_shards_per_class`), and within a
    class the remainder is spread one sample each over its first shards (``np.array_split``), so
    shard sizes differ only by what class sizes force. When every class size is a multiple of
    ``n / num_shards`` this is exactly ``ShardPartitioner`` with the same seed.

    If ``num_clients * shards_per_client`` is smaller than the number of classes, shards cannot be
    single-class; they are then cut from the sorted order into sizes differing by at most one,
    which can give a client more than ``shards_per_client`` classes (e.g. one client gets all).
    """
    y = _as_labels(labels)
    n = len(y)
    num_clients = _check_num_clients(num_clients, n)
    shards_per_client = _as_int(shards_per_client, "shards_per_client")
    if shards_per_client < 1:
        raise ValueError(f"shards_per_client must be >= 1, got {shards_per_client}")
    num_shards = num_clients * shards_per_client
    if num_shards > n:
        raise ValueError(
            f"num_clients * shards_per_client = {num_clients} * {shards_per_client} = {num_shards}"
            f" shards, but labels has only {n} samples (at most one shard per sample)"
        )
    rng = np.random.default_rng(_check_seed(seed))
    order = np.argsort(y, kind="stable")
    _, class_sizes = np.unique(y, return_counts=True)
    if num_shards >= len(class_sizes):
        pieces: list[np.ndarray] = []
        for block, count in zip(
            np.split(order, np.cumsum(class_sizes)[:-1]),
            _shards_per_class(class_sizes, num_shards),
            strict=True,
        ):
            pieces.extend(np.array_split(block, count))
    else:
        pieces = np.array_split(order, num_shards)
    dealt = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in dealt]


def _size_weights(kind: str, num_clients: int) -> np.ndarray:
    """flwr-datasets' size weights ``f(1), ..., f(M)``, scaled so that ``exp`` cannot overflow."""
    ids = np.linspace(1, num_clients, num_clients)
    if kind == "linear":
        return ids
    if kind == "square":
        return np.square(ids)
    return np.exp(ids - num_clients)  # same ratios as exp(ids)


def _flwr_sizes_feasible(kind: str, num_clients: int, n: int) -> bool:
    """Whether flwr-datasets' size rule ``floor(f(i) / sum f * n)`` gives every client a sample."""
    if kind == "exponential" and num_clients > _MAX_EXP_CLIENTS:
        return False
    w = {"linear": lambda x: x, "square": np.square, "exponential": np.exp}[kind](
        np.linspace(1, num_clients, num_clients)
    )
    return bool(np.array(w / w.sum() * n, dtype=np.int64).min() >= 1)


def quantity_skew(
    labels: LabelsLike,
    num_clients: int,
    *,
    kind: str = "exponential",
    seed: int = 0,
    **kw: Any,
) -> list[np.ndarray]:
    """Quantity skew (NIID-Bench): client sizes differ, labels are IID within each client.

    The samples are permuted with ``seed`` and cut into consecutive blocks whose sizes depend on
    ``kind``:

    * ``"linear"``, ``"square"``, ``"exponential"`` -- flwr-datasets' ``LinearPartitioner``,
      ``SquarePartitioner``, ``ExponentialPartitioner``: client ``i`` (1-based) gets a share
      proportional to ``i``, ``i**2`` or ``e**i``, rounded down, the remainder to the last (largest)
      client. Client ids are ordered by size. No extra keyword arguments. Those partitioners raise
      when a client would get no sample (linear with 100 clients needs 5,050 samples; exponential
      with more than about ``ln(n) + 1`` clients); we then give every client one sample first and
      split the other ``n - num_clients`` by the same weights and rounding (our own code).
    * ``"dirichlet"`` -- sizes in proportions ``q ~ Dir(beta, ..., beta)`` (NIID-Bench's
      ``iid-diff-quantity``), keyword arguments ``beta=0.5`` and ``min_partition_size=10``. Our own
      code (flwr-datasets has no equivalent): instead of NIID-Bench's redrawing until every client
      has ``min_partition_size`` samples, which can loop for ever with many clients, each client
      gets ``min_partition_size`` samples first and the rest is cut at ``floor(cumsum(q) * rest)``.
    """
    y = _as_labels(labels)
    n = len(y)
    num_clients = _check_num_clients(num_clients, n)
    if kind not in QUANTITY_KINDS:
        raise ValueError(f"unknown quantity-skew kind {kind!r}; expected one of {QUANTITY_KINDS}")
    allowed = {"beta", "min_partition_size"} if kind == "dirichlet" else set()
    if unexpected := sorted(set(kw) - allowed):
        raise TypeError(
            f"quantity_skew(kind={kind!r}) got unexpected keyword argument(s) {unexpected}; "
            f"it accepts {sorted(allowed) or 'none'}"
        )
    rng = np.random.default_rng(_check_seed(seed))
    order = rng.permutation(n)

    if kind == "dirichlet":
        beta = _check_positive(kw.get("beta", 0.5), "beta")
        floor = _check_min_size(kw.get("min_partition_size", 10), num_clients, n)
        rest = n - floor * num_clients
        q = rng.dirichlet(np.full(num_clients, beta))
        cuts = (np.cumsum(q) * rest).astype(np.int64)[:-1]
        sizes = floor + np.diff(np.concatenate([[0], cuts, [rest]]))
        return _blocks(order, sizes)

    if _flwr_sizes_feasible(kind, num_clients, n):
        _, flwr_part = _flwr_partitioners()
        cls = {
            "linear": flwr_part.LinearPartitioner,
            "square": flwr_part.SquarePartitioner,
            "exponential": flwr_part.ExponentialPartitioner,
        }[kind]
        return _run_flwr(cls(num_partitions=num_clients), order, y[order])

    w = _size_weights(kind, num_clients)
    rest = n - num_clients
    sizes = 1 + (w / w.sum() * rest).astype(np.int64)
    sizes[-1] += n - sizes.sum()
    return _blocks(order, sizes)


SCHEMES: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "shards": shards,
    "quantity": quantity_skew,
}


def partition(
    labels: LabelsLike, num_clients: int, scheme: str = "iid", *, seed: int = 0, **kwargs: Any
) -> list[np.ndarray]:
    """Split ``labels`` into ``num_clients`` parts by scheme name; one sorted index array per client.

    ``scheme`` is one of :data:`SCHEMES` (``"iid"``, ``"dirichlet"``, ``"shards"``,
    ``"quantity"``); ``kwargs`` go to that function, e.g.
    ``partition(y, 10, "dirichlet", alpha=0.1)`` or ``partition(y, 10, "quantity", kind="linear")``.
    """
    if not isinstance(scheme, str) or scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; expected one of {list(SCHEMES)}")
    fn = SCHEMES[scheme]
    params = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        accepted = [
            name
            for name, p in params.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "seed"
        ]
        if unexpected := sorted(set(kwargs) - set(accepted)):
            raise TypeError(
                f"scheme {scheme!r} got unexpected keyword argument(s) {unexpected}; "
                f"it accepts {accepted or 'none'}"
            )
    return fn(labels, num_clients, seed=seed, **kwargs)


# ----------------------------------------------------------------------------------------------
# Feature skew and helpers
# ----------------------------------------------------------------------------------------------


def feature_skew(
    x: torch.Tensor,
    parts: PartsLike,
    *,
    scale_range: tuple[float, float] = (0.7, 1.3),
    shift_std: float = 0.3,
    noise_std: float = 0.1,
    seed: int = 0,
) -> torch.Tensor:
    """Feature skew (NIID-Bench): client ``c``'s samples become ``x * scale_c + shift_c + noise``.

    ``scale_c ~ U(scale_range)`` and ``shift_c ~ N(0, shift_std**2)`` are one scalar per client
    (think of a sensor's gain and offset), drawn in client order from
    ``np.random.default_rng(seed)``; ``noise ~ N(0, noise_std**2)`` is drawn per element from a
    CPU ``torch.Generator`` seeded with ``seed``. Returns a new tensor of ``x``'s shape, dtype and
    device (detached; ``x`` is untouched). Samples in no part are copied unchanged. Our own code:
    flwr-datasets partitions rows and does not transform features.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 1:
        raise ValueError(
            f"x must have a sample dimension (shape (N, ...)), got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}; convert with x.float()")
    parts = _as_parts(parts, len(x), "x", disjoint=True)
    try:
        low, high = (float(v) for v in scale_range)
    except (TypeError, ValueError):
        raise TypeError(
            f"scale_range must be two numbers (low, high), got {scale_range!r}"
        ) from None
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range!r}")
    for name, value in (("shift_std", shift_std), ("noise_std", noise_std)):
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            raise TypeError(f"{name} must be a number >= 0, got {value!r}")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    seed = _check_seed(seed)

    rng = np.random.default_rng(seed)
    scales = rng.uniform(low, high, size=len(parts))
    shifts = rng.normal(0.0, shift_std, size=len(parts))
    gen = torch.Generator().manual_seed(seed)
    out = x.detach().clone()
    for idx, scale, shift in zip(parts, scales, shifts, strict=True):
        if idx.size == 0:
            continue
        rows = torch.from_numpy(idx).to(x.device)
        noise = torch.randn((len(idx), *x.shape[1:]), generator=gen) * noise_std
        out[rows] = out[rows] * float(scale) + float(shift) + noise.to(x.device, x.dtype)
    return out


def label_counts(
    labels: LabelsLike, parts: PartsLike, num_classes: int | None = None
) -> np.ndarray:
    """``(num_clients, num_classes)`` int64 matrix: how many samples of each class each client has.

    ``num_classes`` defaults to ``max(labels) + 1``.
    """
    y = _as_labels(labels)
    parts = _as_parts(parts, len(y), "labels")
    if num_classes is None:
        num_classes = int(y.max()) + 1
    num_classes = _as_int(num_classes, "num_classes")
    if num_classes <= int(y.max()):
        raise ValueError(
            f"num_classes={num_classes} but labels contains class {int(y.max())}; "
            f"expected num_classes >= {int(y.max()) + 1}"
        )
    counts = np.zeros((len(parts), num_classes), dtype=np.int64)
    for c, idx in enumerate(parts):
        counts[c] = np.bincount(y[idx], minlength=num_classes)
    return counts


def client_data(
    x: torch.Tensor, y: torch.Tensor, parts: PartsLike
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-client ``(x_i, y_i)`` tensors (copies) for the index arrays in ``parts``.

    numpy arrays are accepted for ``x`` and ``y`` and converted with ``torch.as_tensor``.
    """
    for name, value in (("x", x), ("y", y)):
        if not isinstance(value, torch.Tensor | np.ndarray):
            raise TypeError(
                f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}"
            )
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.ndim < 1 or y.ndim < 1 or len(x) != len(y):
        raise ValueError(
            f"x and y must have the same number of samples, got shapes {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    out = []
    for idx in _as_parts(parts, len(x), "x"):
        rows = torch.from_numpy(idx)
        out.append((x[rows.to(x.device)], y[rows.to(y.device)]))
    return out


def _class_colors(num_classes: int) -> list:
    import matplotlib

    if num_classes <= 10:
        return [matplotlib.colormaps["tab10"](k) for k in range(num_classes)]
    if num_classes <= 20:
        return [matplotlib.colormaps["tab20"](k) for k in range(num_classes)]
    cmap = matplotlib.colormaps["turbo"]
    return [cmap(v) for v in np.linspace(0.05, 0.95, num_classes)]


def plot_partition(
    labels: LabelsLike,
    parts: PartsLike,
    num_classes: int | None = None,
    *,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Stacked bars, one per client (x axis), one colour per class; bar height = client size.

    Draws on ``ax`` if given, else on a new ``matplotlib.figure.Figure`` (not registered with
    pyplot, so a notebook shows it once, as the cell's value, and no figure leaks). With more than
    40 clients the gaps narrow and only some client ids are labelled, which keeps 100 clients
    readable. Returns the figure; ``ax.containers`` holds one bar container per class.
    """
    counts = label_counts(labels, parts, num_classes)
    num_clients, num_classes = counts.shape
    if num_clients == 0:
        raise ValueError("parts is empty; expected at least one client to plot")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if ax is None:
        width_in = min(14.0, max(6.0, 3.0 + 0.1 * num_clients))
        fig = Figure(figsize=(width_in, 3.6), layout="constrained")
        ax = fig.add_subplot()
    clients = np.arange(num_clients)
    bar_width = 0.8 if num_clients <= 40 else 0.9
    bottom = np.zeros(num_clients, dtype=np.int64)
    for k, color in enumerate(_class_colors(num_classes)):
        ax.bar(
            clients,
            counts[:, k],
            bar_width,
            bottom=bottom,
            color=color,
            label=str(k),
            linewidth=0,
        )
        bottom += counts[:, k]
    ax.set_xlim(-0.5 - (1 - bar_width), num_clients - 0.5 + (1 - bar_width))
    # Set by hand: each stacked bar's bottom is a sticky edge, which stops autoscaling's top margin.
    ax.set_ylim(0, 1.05 * max(1, int(bottom.max())))
    if num_clients <= 20:
        ax.set_xticks(clients)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    ax.set_xlabel("client")
    ax.set_ylabel("samples")
    ax.set_title(title if title is not None else f"Label distribution over {num_clients} clients")
    ax.legend(
        title="class",
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        ncols=math.ceil(num_classes / 20),
        fontsize="small",
        frameon=False,
    )
    return ax.figure
