from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from labsupport.models import CNN1D, CNN2D, MLP, build_model, count_parameters

CASES = [
    ("logistic", (40,)),
    ("mlp", (40,)),
    ("cnn", (40,)),
    ("cnn2d", (1, 8, 8)),
    ("cnn2d", (3, 32, 32)),
]


@pytest.mark.parametrize(("name", "shape"), CASES)
def test_models_map_a_batch_to_logits(name, shape):
    model = build_model(name, shape, 10, seed=0)
    assert model(torch.randn(5, *shape)).shape == (5, 10)


def test_reference_architectures_have_the_papers_sizes():
    # MNIST-1D's MLP: 40-100-100-10; its CNN: 3 convs of 25 channels and a 125-feature read-out
    assert count_parameters(MLP()) == 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
    cnn = CNN1D()
    assert cnn.fc.in_features == 125
    assert count_parameters(build_model("logistic")) == 410


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(7)
    expected = torch.rand(1)
    torch.manual_seed(7)
    a = build_model("mlp", seed=3)
    assert torch.rand(1) == expected
    b = build_model("mlp", seed=3)
    assert all(
        torch.equal(p, q)
        for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_models_have_no_batchnorm_and_groupnorm_is_optional():
    for name, shape in CASES:
        assert not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm)
            for m in build_model(name, shape).modules()
        )
    assert any(isinstance(m, nn.GroupNorm) for m in CNN2D(group_norm=True).modules())


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [("resnet", (40,), "unknown model"), ("cnn2d", (40,), "C, H, W"), ("cnn", (3, 8, 8), "cnn2d")],
)
def test_bad_model_requests_are_explained(name, shape, message):
    with pytest.raises(ValueError, match=message):
        build_model(name, shape)


@pytest.mark.parametrize(("name", "shape"), [*CASES, ("cnn2d_gn", (1, 8, 8))])
def test_models_work_with_opacus(name, shape):
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    model = (
        CNN2D(shape, group_norm=True) if name == "cnn2d_gn" else build_model(name, shape, seed=0)
    )
    assert ModuleValidator.validate(model, strict=False) == []
    x, y = torch.randn(16, *shape), torch.randint(0, 10, (16,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, loader = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0
    )
    for xb, yb in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        assert all(p.grad_sample is not None for p in model.parameters() if p.requires_grad)
        opt.step()


@pytest.mark.parametrize(("name", "shape"), CASES)
def test_models_export_to_onnx_and_match_torch(tmp_path, name, shape):
    model = build_model(name, shape, seed=0).eval()
    x = torch.randn(4, *shape)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(
        model,
        (x,),
        str(path),
        input_names=["x"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        xb = torch.randn(batch, *shape)
        (out,) = session.run(None, {"x": xb.numpy()})
        np.testing.assert_allclose(out, model(xb).detach().numpy(), rtol=1e-4, atol=1e-5)
