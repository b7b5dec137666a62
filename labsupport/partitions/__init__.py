"""Federated partitions: how every chapter splits a dataset across simulated clients (IID and skewed).

See :mod:`labsupport.partitions.partition` for the schemes and the papers they come from.
"""

from labsupport.partitions.partition import (
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
