"""Checkpoints, the Classifier wrappers (PyTorch, ONNX Runtime INT8), the distilled edge and split
inference (labsupport.hybrid.models)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from labsupport.edge import checkpoint as ckpt
from labsupport.hybrid.models import (
    OnnxClassifier,
    TorchClassifier,
    cnn_head,
    cnn_tail,
    distilled_edge,
    feature_shape,
    reconstruction_r2,
    validation_split,
)
from labsupport.models import build_model, load_model, save_model

CNN6 = {
    "model_name": "cnn",
    "input_shape": (40,),
    "num_classes": 10,
    "model_kwargs": {"channels": 6},
}


def test_checkpoint_round_trip_is_safetensors_and_json_and_the_service_format(tmp_path):
    model = build_model("cnn", seed=0, channels=6)
    weights, meta = save_model(model, tmp_path / "m", **CNN6, extra={"val_accuracy": 0.5})
    assert weights.suffix == ".safetensors" and meta == tmp_path / "m.json"
    assert json.loads(meta.read_text())["val_accuracy"] == 0.5
    loaded, cfg = load_model(tmp_path / "m")
    x = torch.randn(5, 40)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert cfg["kwargs"] == {"channels": 6} and not loaded.training
    assert b"pickle" not in weights.read_bytes()[:200] and weights.read_bytes()[8:9] == b"{"
    # chapter 04's names are the same functions: one implementation of the format
    assert ckpt.save_checkpoint is save_model and ckpt.load_checkpoint is load_model


def test_load_model_rejects_missing_or_mismatched_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"\.safetensors"):
        load_model(tmp_path / "nothing")
    save_model(build_model("cnn", channels=6), tmp_path / "m", **CNN6)
    cfg = json.loads((tmp_path / "m.json").read_text())
    (tmp_path / "m.json").write_text(json.dumps({**cfg, "kwargs": {"channels": 7}}))
    with pytest.raises(ValueError, match="do not fit"):
        load_model(tmp_path / "m")
    (tmp_path / "m.json").write_text(json.dumps({"arch": "cnn", "kwargs": {"channels": 6}}))
    with pytest.raises(ValueError, match="lacks"):  # the first chapter-05 format is refused
        load_model(tmp_path / "m")


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """A linear classifier ``logits = x @ W + b`` written directly as an ONNX graph (no exporter: the
    reference is numpy), its INT8 QDQ version from chapter 04's ``ort_static_int8``, and data."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from labsupport.edge.quantize import ort_static_int8

    rng = np.random.default_rng(0)
    w = rng.normal(size=(40, 10)).astype(np.float32)
    b = rng.normal(size=10).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["logits"]),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 40])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    where = tmp_path_factory.mktemp("onnx")
    fp32 = where / "linear.onnx"
    onnx.save(model, str(fp32))
    x = rng.normal(size=(256, 40)).astype(np.float32)
    int8 = ort_static_int8(fp32, where / "linear_int8.onnx", x)  # calibrated on every input
    return (w, b), fp32, int8, x


def test_onnx_classifier_matches_numpy_on_a_hand_written_graph(tiny_onnx):
    (w, b), fp32, _, x = tiny_onnx
    clf = OnnxClassifier(fp32)
    ref = x[:64].astype(np.float64) @ w + b
    got = clf(torch.from_numpy(x[:64]))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.shape == (64, 10)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(clf.logits(x[:64]), got.numpy())
    assert clf.provider == "CPUExecutionProvider" and clf.path == fp32
    # float64 and non-contiguous inputs are converted; batch 1 works
    np.testing.assert_allclose(clf(x[:8].astype(np.float64)).numpy(), ref[:8], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(clf(x[:16:2]).numpy(), ref[:16:2], rtol=1e-5, atol=1e-4)
    assert clf(x[:1]).shape == (1, 10)


def test_onnx_classifier_runs_the_int8_file_close_to_fp32(tiny_onnx):
    import onnx

    (w, b), _, int8, x = tiny_onnx
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # really the QDQ int8 graph
    q, ref = OnnxClassifier(int8).logits(x), x.astype(np.float64) @ w + b
    err = np.abs(q - ref).max()
    assert 0 < err < 0.05 * np.abs(ref).max()  # quantized (not exact), but close
    assert (q.argmax(1) == ref.argmax(1)).mean() >= 0.95


def test_onnx_classifier_rejects_bad_inputs_and_missing_files(tiny_onnx, tmp_path):
    clf = OnnxClassifier(tiny_onnx[1])
    with pytest.raises(ValueError, match="batch"):
        clf(np.zeros(40, dtype=np.float32))
    with pytest.raises(TypeError, match="numpy"):
        clf([[0.0] * 40])
    with pytest.raises(TypeError, match="one string"):
        OnnxClassifier(tiny_onnx[1], providers="CPUExecutionProvider")
    with pytest.raises(FileNotFoundError):
        OnnxClassifier(tmp_path / "missing.onnx")
    # a provider this machine lacks is dropped, never silently "used"
    other = OnnxClassifier(tiny_onnx[1], providers=["NoSuchExecutionProvider"])
    assert other.provider == "CPUExecutionProvider"


@pytest.mark.slow  # two ONNX exports (torch.export): several seconds
def test_distilled_edge_is_cached_and_its_int8_file_answers_like_the_student(tmp_path, mnist1d):
    teacher = build_model("cnn", seed=0, channels=8).eval()
    save_model(teacher, tmp_path / "cloud", **{**CNN6, "model_kwargs": {"channels": 8}})
    x, y = mnist1d.x_train[:300], mnist1d.y_train[:300]
    kw = {"channels": 3, "steps": 20, "folder": tmp_path}
    student, stem, onnx_path = distilled_edge(teacher, tmp_path / "cloud", x, y, **kw)
    assert onnx_path.name.endswith(".int8.onnx") and stem.with_suffix(".json").is_file()
    mtime = onnx_path.stat().st_mtime_ns
    again, stem2, path2 = distilled_edge(teacher, tmp_path / "cloud", x, y, **kw)
    assert stem2 == stem and path2.stat().st_mtime_ns == mtime  # loaded, not retrained
    with torch.no_grad():
        assert torch.equal(again(x[:20]), student(x[:20]))
        agree = (OnnxClassifier(onnx_path)(x).argmax(1) == student(x).argmax(1)).float().mean()
    assert agree > 0.9
    other = distilled_edge(teacher, tmp_path / "cloud", x, y, **{**kw, "steps": 21})[1]
    assert other != stem  # every training parameter is in the cache key
    with pytest.raises(ValueError, match="channels"):
        distilled_edge(teacher, tmp_path / "cloud", x, y, channels=0, folder=tmp_path)


def test_torch_classifier_runs_in_eval_mode_without_autograd():
    model = torch.nn.Sequential(torch.nn.Linear(40, 10), torch.nn.Dropout(0.9))
    clf = TorchClassifier(model)
    x = torch.randn(6, 40).numpy()
    a, b = clf(x), clf(x)
    assert torch.equal(a, b) and not a.requires_grad  # dropout off, no graph
    with pytest.raises(ValueError, match="batch"):
        clf(torch.randn(40))
    with pytest.raises(TypeError):
        clf([[0.0] * 40])


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_split_head_then_tail_equals_the_full_model(layer):
    model = build_model("cnn", seed=0, channels=5).eval()
    x = torch.randn(7, 40)
    h = cnn_head(model, x, layer)
    assert tuple(h.shape[1:]) == feature_shape(model, layer)
    with torch.no_grad():
        assert torch.allclose(cnn_tail(model, h, layer), model(x), atol=1e-6)


def test_feature_shapes_by_hand_and_bad_layers():
    model = build_model("cnn", channels=25)
    # length 40 -> (40 + 2 - 5)//2 + 1 = 19 -> 10 -> 5
    assert [feature_shape(model, k) for k in range(4)] == [(40,), (25, 19), (25, 10), (25, 5)]
    with pytest.raises(ValueError, match="layer"):
        feature_shape(model, 4)
    with pytest.raises(TypeError, match="CNN1D"):
        cnn_head(build_model("mlp"), torch.randn(2, 40), 1)


def test_reconstruction_r2_is_one_for_an_invertible_map_and_near_zero_for_noise():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(400, 10, generator=g), torch.randn(400, 10, generator=g)
    mix = torch.randn(10, 20, generator=g)
    assert reconstruction_r2(x1 @ mix, x1, x2 @ mix, x2, ridge=1e-8) == pytest.approx(1.0, abs=1e-6)
    noise1, noise2 = torch.randn(400, 20, generator=g), torch.randn(400, 20, generator=g)
    assert abs(reconstruction_r2(noise1, x1, noise2, x2)) < 0.1


def test_validation_split_is_disjoint_and_seeded():
    tr, va = validation_split(100, 0.2, seed=3)
    assert len(va) == 20 and len(tr) == 80 and not set(tr.tolist()) & set(va.tolist())
    assert torch.equal(validation_split(100, 0.2, seed=3)[1], va)
    with pytest.raises(ValueError):
        validation_split(10, 1.0)
