"""Federated partitions (chapter 03, and the FL simulations of chapter 01).

See :mod:`labsupport.noniid.partition` for the schemes and the papers they come from.
"""

from labsupport.noniid.partition import (
    QUANTITY_KINDS,
    SCHEMES,
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
