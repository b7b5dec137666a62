"""Fixtures for chapter 04's tests: a tiny CNN1D trained for a moment on MNIST-1D, and its ONNX file."""

from __future__ import annotations

import pytest
import torch

from labsupport.models import build_model
from labsupport.train import train


@pytest.fixture(scope="session")
def tiny_cnn(mnist1d):
    """A 16-channel CNN1D trained 300 steps (about 0.5 s): accurate enough that quantization
    errors show up as accuracy changes, small enough for unit tests."""
    model = build_model("cnn", (40,), 10, seed=0, channels=16)
    train(
        model,
        mnist1d.x_train,
        mnist1d.y_train,
        steps=300,
        batch_size=100,
        lr=1e-2,
        optimizer="adam",
        generator=torch.Generator().manual_seed(0),
    )
    return model.eval()


@pytest.fixture(scope="session")
def tiny_onnx(tiny_cnn, tmp_path_factory):
    from labsupport.edge.export import export_onnx

    return export_onnx(tiny_cnn, tmp_path_factory.mktemp("onnx") / "tiny.onnx")
