"""Checkpoints, the Classifier wrappers and split inference (labsupport.hybrid.models)."""

from __future__ import annotations

import json

import pytest
import torch

from labsupport.hybrid.models import (
    TorchClassifier,
    cnn_head,
    cnn_tail,
    feature_shape,
    load_checkpoint,
    reconstruction_r2,
    save_checkpoint,
    validation_split,
)
from labsupport.models import build_model


def test_checkpoint_round_trip_is_safetensors_and_json(tmp_path):
    model = build_model("cnn", seed=0, channels=6)
    path = save_checkpoint(model, tmp_path / "m", "cnn", {"channels": 6}, val_accuracy=0.5)
    assert path.suffix == ".safetensors" and (tmp_path / "m.json").exists()
    assert json.loads((tmp_path / "m.json").read_text())["val_accuracy"] == 0.5
    loaded, cfg = load_checkpoint(tmp_path / "m")
    x = torch.randn(5, 40)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert cfg["kwargs"] == {"channels": 6} and not loaded.training
    assert b"pickle" not in path.read_bytes()[:200] and path.read_bytes()[8:9] == b"{"


def test_load_checkpoint_rejects_missing_or_mismatched_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"\.json"):
        load_checkpoint(tmp_path / "nothing")
    save_checkpoint(build_model("cnn", channels=6), tmp_path / "m", "cnn", {"channels": 6})
    (tmp_path / "m.json").write_text(json.dumps({"arch": "cnn", "kwargs": {"channels": 7}}))
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_checkpoint(tmp_path / "m")
    (tmp_path / "m.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="'arch'"):
        load_checkpoint(tmp_path / "m")


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
