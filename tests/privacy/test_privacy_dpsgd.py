"""DP-SGD: per-example gradients, clipping and noise, against autograd loops and Opacus."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from labsupport.fl.clients import RoundContext, TrainConfig, fit_or_reject
from labsupport.models import build_model
from labsupport.privacy.accounting import BudgetExceeded, PrivacyLedger
from labsupport.privacy.dpsgd import (
    DPSGD,
    clip_per_sample,
    clipped_grad_sum,
    dp_sgd_client,
    make_opacus_private,
    naive_batch_clip_and_noise,
    one_example_influence,
    per_sample_grads,
    train_dp_sgd,
    utility_data,
)


def _data(n=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 40, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def test_per_sample_grads_equal_one_backward_per_example():
    model = build_model("cnn", seed=0)
    x, y = _data(5)
    grads, losses = per_sample_grads(model, x, y)
    for i in range(5):
        model.zero_grad()
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        loss.backward()
        assert losses[i] == pytest.approx(float(loss.detach()), rel=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-4, atol=1e-6)


def test_clipping_bounds_every_example_and_leaves_small_ones_alone():
    grads = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}  # norms 5 and 0.5
    summed, norms = clip_per_sample(grads, 1.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5]))
    expected = torch.tensor([3.0, 4.0]) / (5.0 + 1e-6) + torch.tensor([0.3, 0.4])
    torch.testing.assert_close(summed["w"], expected)


def _opacus_step(model, x, y, clip, sigma, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gen = torch.Generator().manual_seed(seed)
        _, pm, opt, loader = make_opacus_private(
            model,
            x,
            y,
            batch_size=len(x),
            max_grad_norm=clip,
            noise_multiplier=sigma,
            poisson_sampling=False,
            noise_generator=gen,
            lr=1.0,
        )
        xb, yb = next(iter(loader))
        F.cross_entropy(pm(xb), yb).backward()
        opt.clip_and_accumulate()
        summed = {n: p.summed_grad.clone() for n, p in model.named_parameters()}
        opt.add_noise()
        opt.scale_grad()
        return summed, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_ours_and_opacus_give_the_same_clipped_sum_and_the_same_noisy_update():
    x, y = _data(32)
    ours_model = build_model("cnn", seed=1)
    opacus_model = copy.deepcopy(ours_model)
    clip, sigma = 0.5, 1.3
    summed_opacus, grad_opacus = _opacus_step(opacus_model, x, y, clip, sigma, seed=7)

    grads, _ = per_sample_grads(ours_model, x, y)
    summed_ours, norms = clip_per_sample(grads, clip)
    assert bool((norms > clip).any())  # the clipping is exercised
    dp = DPSGD(
        max_grad_norm=clip,
        noise_multiplier=sigma,
        sample_rate=1.0,
        num_samples=32,
        generator=torch.Generator().manual_seed(7),
    )
    dp.loss_fn(ours_model, x, y).backward()
    dp.grad_hook(ours_model)
    for name, p in ours_model.named_parameters():
        torch.testing.assert_close(summed_ours[name], summed_opacus[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(p.grad, grad_opacus[name], rtol=1e-4, atol=1e-6)


def test_one_example_moves_the_naive_update_by_nearly_2c_but_dp_sgd_by_at_most_c_over_b():
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(50, 20, generator=gen) + 1.0  # a batch that agrees on a direction
    outlier = -1000.0 * grads.mean(0)  # one example pulling the opposite way, hard
    out = one_example_influence(grads, outlier, max_grad_norm=1.0)
    assert out["naive"] > 1.9  # up to 2C
    assert out["per_example"] <= out["per_example_bound"] + 1e-6  # C / B = 0.02
    assert out["naive"] > 50 * out["per_example"]


def test_naive_hook_clips_the_batch_gradient_and_adds_fixed_noise():
    model = build_model("logistic", seed=0)
    x, y = _data(8)
    F.cross_entropy(model(x), y).backward()
    naive_batch_clip_and_noise(1e-3, 0.0)(model)
    total = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))
    assert float(total) == pytest.approx(1e-3, rel=1e-3)


def test_an_empty_poisson_batch_still_gets_noise_of_std_sigma_c_over_expected_batch():
    model = build_model("mlp", seed=0)
    dp = DPSGD(
        max_grad_norm=2.0,
        noise_multiplier=1.5,
        sample_rate=0.1,
        num_samples=400,
        generator=torch.Generator().manual_seed(0),
    )
    dp.grad_hook(model)  # train() skips loss_fn on an empty batch
    noise = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float(noise.std()) == pytest.approx(1.5 * 2.0 / 40, rel=0.03)
    assert dp.steps == 1


def test_train_dp_sgd_uses_poisson_batches_and_learns():
    x, y = _data(200)
    y = (x[:, 0] > 0).long()  # an easy task
    model = build_model("logistic", seed=0)
    before = float(F.cross_entropy(model(x), y).detach())
    result = train_dp_sgd(
        model,
        x,
        y,
        max_grad_norm=1.0,
        noise_multiplier=0.5,
        sample_rate=0.1,
        epochs=5,
        lr=0.5,
        generator=torch.Generator().manual_seed(0),
        noise_generator=torch.Generator().manual_seed(1),
    )
    assert result.steps == 50
    assert float(F.cross_entropy(model(x), y).detach()) < before


def test_train_dp_sgd_refuses_an_unaffordable_run_before_training():
    x, y = _data(100)
    model = build_model("logistic", seed=0)
    start = copy.deepcopy(model.state_dict())
    ledger = PrivacyLedger(0.5, 1e-5, accountant="opacus_rdp")
    with pytest.raises(BudgetExceeded):
        train_dp_sgd(
            model,
            x,
            y,
            max_grad_norm=1.0,
            noise_multiplier=0.5,
            sample_rate=0.5,
            epochs=10,
            ledger=ledger,
        )
    assert ledger.events == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, start[k])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"noise_multiplier": -0.1}, "noise_multiplier"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.2}, "sample_rate"),
    ],
)
def test_bad_dp_sgd_settings_are_refused(kwargs, match):
    args = {"max_grad_norm": 1.0, "noise_multiplier": 1.0, "sample_rate": 0.1, "num_samples": 10}
    with pytest.raises(ValueError, match=match):
        DPSGD(**{**args, **kwargs})


def test_dp_sgd_client_trains_through_the_fl_client_protocol_reproducibly():
    x, y = _data(60)
    client = dp_sgd_client(x, y, max_grad_norm=1.0, noise_multiplier=1.0, sample_rate=0.2)
    model = build_model("mlp", seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = RoundContext(server_round=1, client_id=0, seed=123)
    cfg = TrainConfig(local_epochs=1, batch_size=10, lr=0.1)
    a = fit_or_reject(client, model, state, ctx, cfg)
    b = fit_or_reject(client, model, state, ctx, cfg)
    assert a.metrics["steps"] == 5  # round(1/q) Poisson steps per epoch, not n/B
    assert any(not torch.equal(a.state[k], state[k]) for k in state)
    for k in state:
        assert torch.equal(a.state[k], b.state[k])


# ------------------------------------------------- per-example gradients from layer outer products


class _DilatedNet(torch.nn.Module):
    """Stride, padding, dilation, no bias, a Linear on (B, T, in): every branch of the outer path."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(1, 4, 3, stride=2, padding=2, dilation=2, bias=False)
        self.per_position = torch.nn.Linear(4, 3)
        self.head = torch.nn.Linear(3 * 20, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x.unsqueeze(1))).transpose(1, 2)  # (B, 20, 4)
        return self.head(torch.tanh(self.per_position(h)).flatten(1))


class _TwiceNet(torch.nn.Module):
    """One Linear layer applied twice: its gradient is not one outer product per example."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(40, 40)
        self.out = torch.nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


class _NormNet(torch.nn.Module):
    """A LayerNorm has parameters but no outer-product gradient: the outer path must refuse it."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(40)
        self.fc = torch.nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


@pytest.mark.parametrize("name", ["cnn", "mlp", "logistic", "dilated"])
def test_outer_product_per_example_grads_equal_vmap(name):
    model = _DilatedNet() if name == "dilated" else build_model(name, seed=0)
    x, y = _data(6)
    g_vmap, l_vmap = per_sample_grads(model, x, y, method="vmap")
    g_outer, l_outer = per_sample_grads(model, x, y, method="outer")
    assert list(g_outer) == list(g_vmap)  # the parameter order, which the noise draw follows
    for k in g_vmap:
        torch.testing.assert_close(g_outer[k], g_vmap[k], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(l_outer, l_vmap)


@pytest.mark.parametrize("name", ["cnn", "mlp", "dilated"])
@pytest.mark.parametrize("clip", [1e-3, 0.5, 1e3])
def test_clipped_sum_without_per_example_grads_equals_clipping_them(name, clip):
    model = _DilatedNet() if name == "dilated" else build_model(name, seed=1)
    x, y = _data(9, seed=2)
    expected, norms = clip_per_sample(per_sample_grads(model, x, y, method="vmap")[0], clip)
    got, got_norms, _ = clipped_grad_sum(model, x, y, clip)
    assert list(got) == list(expected)
    torch.testing.assert_close(got_norms, norms, rtol=1e-4, atol=1e-6)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("net", [_TwiceNet, _NormNet])
def test_auto_falls_back_to_vmap_where_outer_products_do_not_apply(net):
    torch.manual_seed(0)
    model = net()
    x, y = _data(5)
    assert clipped_grad_sum(model, x, y, 1.0) is None
    with pytest.raises(ValueError, match="outer"):
        per_sample_grads(model, x, y, method="outer")
    g_auto, _ = per_sample_grads(model, x, y)
    for i in range(5):  # against one ordinary backward per example
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(g_auto[k][i], p.grad, rtol=1e-4, atol=1e-6)


def test_dp_sgd_step_is_the_same_whichever_way_the_per_example_grads_are_computed():
    x, y = _data(20)
    grads = {}
    for method in ("auto", "vmap", "outer"):
        model = build_model("cnn", seed=3)
        dp = DPSGD(
            max_grad_norm=0.3,
            noise_multiplier=0.7,
            sample_rate=0.5,
            num_samples=40,
            generator=torch.Generator().manual_seed(5),
            per_sample_method=method,
        )
        dp.loss_fn(model, x, y).backward()
        dp.grad_hook(model)
        grads[method] = {k: p.grad for k, p in model.named_parameters()}
    for method in ("auto", "outer"):
        for k in grads["vmap"]:
            torch.testing.assert_close(grads[method][k], grads["vmap"][k], rtol=1e-4, atol=1e-6)


def test_bad_per_example_methods_are_refused():
    x, y = _data(4)
    with pytest.raises(ValueError, match="method"):
        per_sample_grads(build_model("mlp"), x, y, method="fast")
    with pytest.raises(ValueError, match="per_sample_method"):
        DPSGD(
            max_grad_norm=1.0,
            noise_multiplier=1.0,
            sample_rate=0.1,
            num_samples=10,
            per_sample_method="ghost",
        )
    dp = DPSGD(
        max_grad_norm=1.0,
        noise_multiplier=1.0,
        sample_rate=0.5,
        num_samples=8,
        per_sample_method="outer",
    )
    with pytest.raises(ValueError, match="outer"):
        dp.loss_fn(_NormNet(), x, y)
    with pytest.raises(ValueError, match="empty"):
        clip_per_sample({}, 1.0)


# ------------------------------------------------------------------------ the utility sweep's data


def test_utility_validation_split_is_held_out_of_training_and_the_test_set_is_separate():
    x_tr, y_tr, x_val, _ = utility_data("val", num_samples=2000, val=300)
    x_tr2, y_tr2, x_te, _ = utility_data("test", num_samples=2000, val=300)
    assert torch.equal(x_tr, x_tr2) and torch.equal(y_tr, y_tr2)  # the recipe's training set
    assert len(x_tr) == 1600 - 300 and len(x_val) == 300 and len(x_te) == 400
    rows = {tuple(r.tolist()) for r in x_tr}
    assert not any(tuple(r.tolist()) in rows for r in x_val)
    with pytest.raises(ValueError, match="split"):
        utility_data("train", num_samples=2000)
    with pytest.raises(ValueError, match="val"):
        utility_data("val", num_samples=2000, val=1600)


@pytest.mark.parametrize("frozen", ["fc1.bias", "fc1.weight"])
def test_frozen_parameters_get_no_gradient_and_the_rest_are_exact(frozen):
    model = build_model("mlp", seed=4)
    model.get_parameter(frozen).requires_grad_(False)
    x, y = _data(6)
    expected, _ = clip_per_sample(per_sample_grads(model, x, y, method="vmap")[0], 0.5)
    fused = clipped_grad_sum(model, x, y, 0.5)
    if frozen == "fc1.weight":  # a trained bias under a frozen weight: not an outer product
        assert fused is None
        return
    got = fused[0]
    assert frozen not in got and list(got) == list(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-6)
