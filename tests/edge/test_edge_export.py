"""ONNX export parity, the size of external data, and provider selection with a reported fallback."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from labsupport.edge.export import OrtModel, export_onnx, onnx_size_bytes, parity, select_providers


@pytest.mark.parametrize("batch", [1, 2, 37, 64])
def test_exported_model_matches_pytorch_at_every_batch_size(tiny_cnn, tiny_onnx, batch):
    x = torch.randn(batch, 40, generator=torch.Generator().manual_seed(batch))
    run = OrtModel(tiny_onnx, ["CPUExecutionProvider"])
    result = parity(tiny_cnn, run, x)
    assert result["max_abs_diff"] < 1e-4
    assert result["argmax_agreement"] == 1.0


def test_export_declares_a_dynamic_batch_and_one_self_contained_file(tiny_onnx):
    proto = onnx.load(str(tiny_onnx))
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.HasField("dim_value")
    assert not list(tiny_onnx.parent.glob("*.data"))
    assert onnx_size_bytes(tiny_onnx) == tiny_onnx.stat().st_size


def test_onnx_size_counts_external_data_files(tiny_onnx, tmp_path):
    proto = onnx.load(str(tiny_onnx))
    out = tmp_path / "ext.onnx"
    onnx.save_model(
        proto, str(out), save_as_external_data=True, location="ext.onnx.data", size_threshold=0
    )
    data = tmp_path / "ext.onnx.data"
    assert data.stat().st_size > 1000  # the weights moved out
    assert onnx_size_bytes(out) == out.stat().st_size + data.stat().st_size
    data.unlink()
    with pytest.raises(FileNotFoundError, match="ext.onnx.data"):
        onnx_size_bytes(out)


def test_unavailable_provider_is_dropped_and_the_one_that_ran_is_reported(tiny_onnx):
    wanted = ["NoSuchExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    usable, dropped = select_providers(wanted)
    available = set(ort.get_available_providers())
    assert usable == [p for p in wanted if p in available]
    assert "NoSuchExecutionProvider" in dropped
    run = OrtModel(tiny_onnx, wanted)
    assert run.providers == run.session.get_providers()
    assert run.provider in available
    assert "NoSuchExecutionProvider" in run.dropped


def test_no_usable_provider_falls_back_to_cpu(tiny_onnx):
    assert select_providers(["NoSuchExecutionProvider"]) == (
        ["CPUExecutionProvider"],
        ["NoSuchExecutionProvider"],
    )
    assert OrtModel(tiny_onnx, ["NoSuchExecutionProvider"]).provider == "CPUExecutionProvider"


def test_provider_list_given_as_one_string_is_rejected():
    with pytest.raises(TypeError, match="sequence"):
        select_providers("CPUExecutionProvider")


def test_export_rejects_size_one_example_for_dynamic_batch(tiny_cnn, tmp_path):
    with pytest.raises(ValueError, match="example_batch"):
        export_onnx(tiny_cnn, tmp_path / "m.onnx", example_batch=1)
    with pytest.raises(TypeError, match="nn.Module"):
        export_onnx(lambda x: x, tmp_path / "m.onnx")


def test_parity_rejects_wrong_shapes_and_empty_input(tiny_cnn):
    with pytest.raises(ValueError, match="shape"):
        parity(tiny_cnn, lambda x: np.zeros((len(x), 3), np.float32), torch.randn(4, 40))
    with pytest.raises(ValueError, match="at least one"):
        parity(tiny_cnn, lambda x: x, torch.randn(0, 40))


def test_ort_model_rejects_missing_file_and_bad_threads(tmp_path, tiny_onnx):
    with pytest.raises(FileNotFoundError):
        OrtModel(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="threads"):
        OrtModel(tiny_onnx, threads=0)
