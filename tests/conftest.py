"""Shared test settings: offline, one torch thread, quiet progress bars, a private data directory."""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mnist1d():
    """The default MNIST-1D split, from the repository's cache (generated once if missing)."""
    from labsupport.data import load_dataset

    return load_dataset("mnist1d")
