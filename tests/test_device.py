from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from labsupport import device


def test_cpu_override_and_default(monkeypatch):
    monkeypatch.setenv("LAB_DEVICE", "cpu")
    assert device.get_device() == torch.device("cpu")
    monkeypatch.delenv("LAB_DEVICE")
    expected = (
        "cuda" if torch.cuda.is_available() else ("mps" if device._mps_available() else "cpu")
    )
    assert device.get_device().type == expected


def test_asking_for_a_missing_gpu_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LAB_DEVICE", "cuda")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        device.get_device()


def test_bad_device_name_is_explained():
    with pytest.raises(ValueError, match="not a device name"):
        device.get_device("tpu9")


def test_jetson_detection_reads_the_device_tree(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.write_text("NVIDIA Jetson Orin Nano Developer Kit\x00")
    monkeypatch.setattr(device, "_JETSON_MODEL", model)
    monkeypatch.setattr(device, "_L4T_RELEASE", tmp_path / "missing")
    assert device.is_jetson()
    model.write_text("Raspberry Pi 5 Model B")
    assert not device.is_jetson()


def test_tensorrt_is_reported_unusable_without_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as if not installed
    usable, detail = device.tensorrt_status()
    assert not usable and "not installed" in detail


def test_set_threads_reads_the_environment(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("LAB_THREADS", "2")
        assert device.set_threads() == 2 and torch.get_num_threads() == 2
        monkeypatch.delenv("LAB_THREADS")
        assert device.set_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("LAB_THREADS", "many")
        with pytest.raises(ValueError, match="LAB_THREADS"):
            device.set_threads()
    finally:
        torch.set_num_threads(before)


def test_report_command_prints_json():
    out = subprocess.run(
        [sys.executable, "-m", "labsupport.device"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    info = json.loads(out)
    assert info["torch"] == torch.__version__
    assert "CPUExecutionProvider" in info["onnxruntime"]["providers"]
    assert isinstance(info["tensorrt_usable"], bool)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_is_picked_when_present(monkeypatch):
    monkeypatch.delenv("LAB_DEVICE", raising=False)
    assert device.get_device().type == "cuda"
    assert device.report()["gpus"]


@pytest.mark.jetson
@pytest.mark.skipif(not device.is_jetson(), reason="needs an NVIDIA Jetson")
def test_jetson_has_cuda_and_tensorrt():
    assert torch.cuda.is_available()
    assert device.tensorrt_status()[0]
