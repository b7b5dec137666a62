"""Checkpoints without pickle, the cached teacher, and the deployment command's artifacts and report."""

from __future__ import annotations

import json

import pytest
import torch

from labsupport.device import tensorrt_status
from labsupport.edge import checkpoint as ckpt
from labsupport.edge.checkpoint import load_checkpoint, save_checkpoint, split_validation
from labsupport.edge.deploy import deploy, main
from labsupport.models import build_model


@pytest.fixture
def tiny_checkpoint(tmp_path):
    model = build_model("cnn", (40,), 10, seed=0, channels=4)
    save_checkpoint(
        model,
        tmp_path / "ckpt" / "tiny",
        model_name="cnn",
        input_shape=(40,),
        num_classes=10,
        model_kwargs={"channels": 4},
        extra={"note": "random weights"},
    )
    return tmp_path / "ckpt" / "tiny", model


def test_checkpoint_round_trip_gives_the_same_outputs(tiny_checkpoint):
    stem, model = tiny_checkpoint
    loaded, config = load_checkpoint(stem.with_suffix(".json"))
    x = torch.randn(3, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert config["kwargs"] == {"channels": 4} and config["note"] == "random weights"
    assert not loaded.training
    assert stem.with_suffix(".safetensors").read_bytes()[8:9] == b"{"  # safetensors header


def test_checkpoint_with_missing_keys_or_wrong_shapes_is_rejected(tiny_checkpoint):
    stem, _ = tiny_checkpoint
    meta = stem.with_suffix(".json")
    config = json.loads(meta.read_text())
    meta.write_text(json.dumps({**config, "kwargs": {"channels": 5}}))
    with pytest.raises(ValueError, match="do not fit"):
        load_checkpoint(stem)
    meta.write_text(json.dumps({"kwargs": {}}))
    with pytest.raises(ValueError, match="lacks"):
        load_checkpoint(stem)
    meta.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_checkpoint(stem)
    meta.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        load_checkpoint(stem)


def test_validation_split_is_disjoint_seeded_and_complete():
    x = torch.arange(100.0).reshape(50, 2)
    y = torch.arange(50)
    _, yt, xv, yv = split_validation(x, y, 0.2, seed=3)
    assert len(yv) == 10 and len(yt) == 40
    assert sorted(torch.cat([yt, yv]).tolist()) == list(range(50))
    torch.testing.assert_close(xv[:, 0], yv.float() * 2)
    assert torch.equal(split_validation(x, y, 0.2, seed=3)[3], yv)
    with pytest.raises(ValueError, match="fraction"):
        split_validation(x, y, 1.0)
    with pytest.raises(ValueError, match="empty"):
        split_validation(x[:2], y[:2], 0.1)


def test_teacher_is_trained_once_and_keyed_by_its_parameters(tmp_path, monkeypatch, mnist1d):
    calls = []
    real_train = ckpt.train
    monkeypatch.setattr(
        ckpt, "train", lambda *a, **k: calls.append(k["steps"]) or real_train(*a, **k)
    )
    m1, c1 = ckpt.train_teacher(channels=4, steps=3, cache_dir=tmp_path, device="cpu")
    m2, c2 = ckpt.train_teacher(channels=4, steps=3, cache_dir=tmp_path, device="cpu")
    assert calls == [3]
    assert c1 == c2 and c1["training"]["steps"] == 3 and 0 <= c1["val_accuracy"] <= 1
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)
    ckpt.train_teacher(channels=4, steps=4, cache_dir=tmp_path, device="cpu")
    assert calls == [3, 4]
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))


@pytest.mark.slow
def test_deploy_command_writes_every_artifact_and_an_honest_report(
    tiny_checkpoint, tmp_path, capsys
):
    stem, _ = tiny_checkpoint
    out = tmp_path / "out"
    argv = [str(stem.with_suffix(".json")), str(out), "--calib-samples", "64", "--repeats", "3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "onnx_int8:" in printed and "report.json" in printed
    report = json.loads((out / "report.json").read_text())
    for name in ("model.onnx", "model_int8.onnx", "model_int8_sym.onnx"):
        assert (out / name).is_file()
    arts = report["artifacts"]
    assert arts["onnx_fp32"]["parity"]["max_abs_diff"] < 1e-4
    assert arts["onnx_fp32"]["parity"]["argmax_agreement"] == 1.0
    assert arts["onnx_int8"]["size_bytes"] == (out / "model_int8.onnx").stat().st_size
    assert arts["onnx_int8"]["provider"] == "CPUExecutionProvider"
    assert "Gaussian" in report["calibration"]  # no dataset named in this checkpoint
    assert all(a["p50_b1_ms"] > 0 and a["p50_b64_ms"] > 0 for a in arts.values())
    usable, _ = tensorrt_status()
    for precision in ("fp16", "int8"):
        entry = report["tensorrt"][precision]
        assert entry["built"] == usable
        assert (out / f"model_{precision}.engine").is_file() == usable
        if not usable:
            assert entry["reason"].startswith("TensorRT skipped")


def test_deploy_command_reports_a_missing_checkpoint(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "missing" in capsys.readouterr().err


def test_deploy_rejects_a_bad_calibration_size(tiny_checkpoint, tmp_path):
    stem, _ = tiny_checkpoint
    with pytest.raises(ValueError, match="calib_samples"):
        deploy(stem, tmp_path / "out", calib_samples=0)
