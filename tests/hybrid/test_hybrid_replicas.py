"""Real replica processes on 127.0.0.1: validation over a socket, failover when a replica process is
killed under load, degraded answers when none is up, and no process left behind.

Each test starts its own uvicorn processes (a few seconds each): marked slow.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from labsupport.hybrid.balancer import Balancer
from labsupport.hybrid.client import HybridClient
from labsupport.hybrid.loadgen import run_load
from labsupport.hybrid.models import TorchClassifier
from labsupport.hybrid.replicas import ReplicaSet, process_group_alive
from labsupport.models import build_model, save_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

CNN4 = {
    "model_name": "cnn",
    "input_shape": (40,),
    "num_classes": 10,
    "model_kwargs": {"channels": 4},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = build_model("cnn", seed=0, channels=4)
    return save_model(model, tmp_path_factory.mktemp("rep") / "cloud", **CNN4)[0]


def test_real_replica_answers_4xx_stays_up_and_restarts_on_its_port(checkpoint):
    with ReplicaSet(checkpoint, 1) as rs:
        url = rs.urls[0]
        pid = httpx.get(f"{url}/health").json()["pid"]
        bad = [
            {"json": {"input": [0.0] * 3}},
            {"json": {"input": "forty numbers"}},
            {"content": b"\x00\xff not json", "headers": {"content-type": "application/json"}},
            {"json": {"inputs": [[0.0] * 40] * 1000}},
        ]
        codes = [httpx.post(f"{url}/v1/predict_batch", **kw).status_code for kw in bad]
        assert all(400 <= c < 500 for c in codes), codes
        ok = httpx.post(f"{url}/v1/predict", json={"input": [0.0] * 40})
        assert ok.status_code == 200
        assert httpx.get(f"{url}/health").json()["pid"] == pid  # same process, still up
        old = rs.pgids[0]
        rs.kill(0)  # then: killed, refused, restarted on the same port
        assert not process_group_alive(old)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=1.0)
        rs.restart(0)
        assert rs.urls[0] == url and httpx.get(f"{url}/health").status_code == 200
        pgids = rs.pgids
    assert not any(process_group_alive(g) for g in pgids)


def test_failover_when_a_replica_process_is_killed_under_load(checkpoint):
    async def load(rs: ReplicaSet):
        async with Balancer(rs.urls, "least_outstanding", timeout_s=5.0) as lb:

            async def send(i: int):
                data, _ = await lb.post(
                    "/v1/predict", json={"input": [0.1] * 40, "request_id": str(i)}
                )
                return int(data["request_id"])

            async def killer():
                while sum(lb.sent) < 100:  # kill replica 0 mid-load, requests in flight
                    await asyncio.sleep(0.005)
                rs.kill(0)

            res, _ = await asyncio.gather(
                run_load(send, num_clients=64, num_requests=300, max_duration_s=60), killer()
            )
            return res, lb

    with ReplicaSet(checkpoint, 2) as rs:
        res, lb = asyncio.run(load(rs))
        assert not rs.replicas[0].alive()
        pgids = rs.pgids
    assert res.issued == 300 and res.answered == 300
    assert res.lost == 0 and res.duplicated == 0 and res.mismatched == 0
    assert lb.healthy[0] is False and lb.sent[1] > lb.sent[0]
    assert all(c == 1 for c in lb.delivered.values())
    assert not any(process_group_alive(g) for g in pgids)


def test_degraded_answers_when_every_replica_is_down_and_none_left_behind(checkpoint):
    edge = build_model("cnn", seed=1, channels=2).eval()
    x = torch.randn(8, 40)

    async def ask(urls):
        async with Balancer(urls, timeout_s=1.0, health_interval_s=None) as lb:
            return await HybridClient(TorchClassifier(edge), threshold=1.01, balancer=lb).predict(x)

    with pytest.raises(RuntimeError, match="boom"), ReplicaSet(checkpoint, 2) as rs:
        urls, pgids = rs.urls, rs.pgids
        up = asyncio.run(ask(urls))
        assert not up.degraded.any() and set(up.source) == {"cloud"}
        raise RuntimeError("boom")  # a failing test body: the set must still stop everything
    assert not any(process_group_alive(g) for g in pgids)
    down = asyncio.run(ask(urls))
    assert down.degraded.all()
    with torch.no_grad():
        assert torch.equal(down.predictions, edge(x).argmax(1))


def test_replica_set_validates_its_arguments(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError):
        ReplicaSet(tmp_path / "missing", 1)
    with pytest.raises(ValueError, match="at least one"):
        ReplicaSet(checkpoint, 0)
    with pytest.raises(ValueError, match="per_replica_env"):
        ReplicaSet(checkpoint, 2, per_replica_env=[{}])
