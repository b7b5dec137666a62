"""The edge client: routing, cache, cloud calls and degraded answers (labsupport.hybrid.client),
against the real app served in-process (httpx.ASGITransport) or a closed port."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
import torch

from labsupport.hybrid.balancer import Balancer
from labsupport.hybrid.cache import LRUCache
from labsupport.hybrid.client import HybridClient, encode_binary, quantize_int8
from labsupport.hybrid.models import TorchClassifier
from labsupport.hybrid.service import create_app
from labsupport.models import build_model, save_model

CNN4 = {
    "model_name": "cnn",
    "input_shape": (40,),
    "num_classes": 10,
    "model_kwargs": {"channels": 4},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    edge = build_model("cnn", seed=1, channels=2).eval()
    cloud = build_model("cnn", seed=2, channels=4).eval()
    path = save_model(cloud, tmp_path_factory.mktemp("c") / "cloud", **CNN4)[0]
    x = torch.randn(32, 40, generator=torch.Generator().manual_seed(0))
    return edge, cloud, path, x


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _expected(edge, cloud, x, threshold):
    with torch.no_grad():
        p = torch.softmax(edge(x), 1)
        off = p.max(1).values < threshold
        return torch.where(off, cloud(x).argmax(1), p.argmax(1)), off


@pytest.mark.parametrize("wire", ["binary", "json"])
def test_offloaded_inputs_get_the_cloud_answer_others_the_edge_answer(setup, wire):
    edge, cloud, path, x = setup
    with torch.no_grad():
        threshold = float(torch.softmax(edge(x), 1).max(1).values.median())
    expected, off = _expected(edge, cloud, x, threshold)
    assert 0 < off.sum() < len(x)

    async def main():
        transport = httpx.ASGITransport(app=create_app(path, microbatch=False))
        async with Balancer(
            ["http://127.0.0.1:1"], transport=transport, health_interval_s=None
        ) as lb:
            hc = HybridClient(TorchClassifier(edge), threshold=threshold, balancer=lb, wire=wire)
            return await hc.predict(x), lb

    ans, lb = asyncio.run(main())
    assert torch.equal(ans.predictions, expected)
    assert torch.equal(ans.offload, off)
    assert not ans.degraded.any()
    assert set(ans.source[off.numpy()]) == {"cloud"} and set(ans.source[~off.numpy()]) == {"edge"}
    assert lb.sent == [1]  # every offloaded input in one request


def test_cache_answers_repeated_inputs_without_a_cloud_request(setup):
    edge, cloud, path, x = setup
    expected, _ = _expected(edge, cloud, x, 1.01)  # everything offloaded

    async def main():
        transport = httpx.ASGITransport(app=create_app(path, microbatch=False))
        async with Balancer(
            ["http://127.0.0.1:1"], transport=transport, health_interval_s=None
        ) as lb:
            hc = HybridClient(
                TorchClassifier(edge), threshold=1.01, balancer=lb, cache=LRUCache(64)
            )
            first = await hc.predict(x)
            second = await hc.predict(x)
            return first, second, lb, hc.cache

    first, second, lb, cache = asyncio.run(main())
    assert torch.equal(first.predictions, expected) and torch.equal(second.predictions, expected)
    assert set(second.source) == {"cache"} and lb.sent == [1]
    assert cache.stats.hits == 32 and cache.stats.misses == 32


def test_unreachable_cloud_gives_degraded_edge_answers(setup):
    edge, _, _, x = setup
    threshold = 1.01  # offload everything

    async def main():
        async with Balancer(
            [f"http://127.0.0.1:{_free_port()}"], timeout_s=0.5, health_interval_s=None
        ) as lb:
            hc = HybridClient(TorchClassifier(edge), threshold=threshold, balancer=lb)
            return await hc.predict(x)

    ans = asyncio.run(main())
    with torch.no_grad():
        assert torch.equal(ans.predictions, edge(x).argmax(1))
    assert ans.degraded.all() and ans.offload.all() and set(ans.source) == {"edge"}


def test_no_cloud_configured_is_degraded_too(setup):
    edge, _, _, x = setup
    ans = asyncio.run(HybridClient(TorchClassifier(edge), threshold=1.01).predict(x[:3]))
    assert ans.degraded.tolist() == [True] * 3


def test_confident_inputs_never_touch_the_network(setup):
    edge, _, _, x = setup
    ans = asyncio.run(HybridClient(TorchClassifier(edge), threshold=0.0).predict(x))
    assert not ans.offload.any() and not ans.degraded.any()


def test_int8_wire_format_round_trips_within_one_step():
    x = torch.randn(4, 25, 5)
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and (q.float() * scale - x).abs().max() <= scale / 2 + 1e-7
    assert len(encode_binary(x, int8=True)) < len(encode_binary(x)) / 3


def test_client_validates_its_arguments(setup):
    edge = TorchClassifier(setup[0])
    with pytest.raises(ValueError, match="score"):
        HybridClient(edge, threshold=0.5, score="confidence")
    with pytest.raises(ValueError, match="temperature"):
        HybridClient(edge, threshold=0.5, temperature=0)
    with pytest.raises(ValueError, match="wire"):
        HybridClient(edge, threshold=0.5, wire="pickle")


def test_decide_fast_path_equals_the_textbook_calibrated_route(setup):
    from labsupport.hybrid.calibration import apply_temperature
    from labsupport.hybrid.routing import max_softmax, route

    edge, _, _, x = setup
    x = x * 30  # spread the confidences over (0, 1]
    for t, thr in ((0.7, 0.5), (2.0, 0.3), (1.0, 2.0)):
        logits, conf, off = HybridClient(
            TorchClassifier(edge), threshold=thr, temperature=t
        ).decide(x)
        ref_conf = max_softmax(apply_temperature(logits, t)).double()
        assert torch.allclose(conf.double(), ref_conf, rtol=1e-5)
        assert torch.equal(off, route(ref_conf, thr))
    assert 0 < off.sum() < len(x) or thr > 1
