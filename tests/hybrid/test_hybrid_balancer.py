"""Balancing policies, failover and health checks (labsupport.hybrid.balancer), against mock
replicas (httpx.MockTransport): no sockets, deterministic."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from labsupport.hybrid.balancer import (
    Balancer,
    LeastOutstanding,
    NaiveLeastLoaded,
    NoReplicaAvailable,
    PowerOfTwoChoices,
    RoundRobin,
)
from labsupport.hybrid.loadgen import require_loopback, run_load

URLS = ["http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003"]


def _fleet(delays_s, *, dead=(), status=None, hang=()):
    """A mock transport: replica i answers after delays_s[i]; `dead` refuse connections; `hang`
    time out (MockTransport applies no timeouts itself)."""
    status = status or {}

    async def handler(request: httpx.Request) -> httpx.Response:
        i = URLS.index(f"http://127.0.0.1:{request.url.port}")
        if i in dead:
            raise httpx.ConnectError("refused", request=request)
        if i in hang:
            raise httpx.ReadTimeout("timed out", request=request)
        await asyncio.sleep(delays_s[i])
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        body = request.read()
        rid = httpx.Response(200, content=body).json().get("request_id") if body else None
        return httpx.Response(status.get(i, 200), json={"request_id": rid, "replica": i})

    return httpx.MockTransport(handler)


async def _drive(policy, delays, n=120, clients=8, **kw):
    async with Balancer(
        URLS[: len(delays)], policy, transport=_fleet(delays, **kw), health_interval_s=None
    ) as lb:

        async def send(i):
            data, _ = await lb.post("/v1/predict", json={"request_id": i})
            return data["request_id"]

        res = await run_load(send, num_clients=clients, num_requests=n, max_duration_s=20)
        return lb, res


def test_round_robin_cycles_and_skips_unhealthy():
    rr = RoundRobin(3)
    assert [rr.choose([0, 1, 2]) for _ in range(5)] == [0, 1, 2, 0, 1]
    assert [rr.choose([0, 2]) for _ in range(3)] == [2, 0, 2]


def test_least_outstanding_picks_fewest_in_flight():
    lo = LeastOutstanding(3)
    lo.started(0)
    lo.started(0)
    lo.started(1)
    assert lo.choose([0, 1, 2]) == 2
    assert lo.choose([0, 1]) == 1
    lo.finished(0)
    lo.finished(0)
    assert lo.choose([0, 1]) == 0


def test_power_of_two_takes_the_less_loaded_of_its_two_samples():
    p2 = PowerOfTwoChoices(2, seed=0)
    p2.outstanding = [5, 0]
    assert all(p2.choose([0, 1]) == 1 for _ in range(20))  # with two replicas both are sampled
    assert p2.choose([0]) == 0


def test_naive_least_loaded_never_decrements_and_degenerates_to_round_robin():
    naive = NaiveLeastLoaded(2)
    seq = []
    for _ in range(6):
        i = naive.choose([0, 1])
        naive.started(i)
        naive.finished(i)
        seq.append(i)
    assert seq == [0, 1, 0, 1, 0, 1]
    assert naive.load == [3, 3] and naive.outstanding == [0, 0]


def test_least_outstanding_avoids_a_slow_replica_round_robin_and_naive_do_not():
    delays = [0.03, 0.001]
    sent = {}
    for policy in ("round_robin", "naive_least_loaded", "least_outstanding", "power_of_two"):
        lb, res = asyncio.run(_drive(policy, delays))
        assert res.lost == res.duplicated == res.mismatched == 0
        sent[policy] = lb.sent
    assert sent["round_robin"] == [60, 60]
    assert sent["naive_least_loaded"] == [60, 60]  # blind to the slow replica, like round-robin
    assert sent["least_outstanding"][0] < 30
    assert sent["power_of_two"][0] < 45


def test_failover_retries_on_another_replica_and_loses_nothing():
    lb, res = asyncio.run(_drive("round_robin", [0.001, 0.001, 0.001], dead={1}))
    assert res.answered == 120 and res.lost == res.duplicated == 0
    assert lb.healthy == [True, False, True]
    assert lb.retries == 1  # one request hit the dead replica, then it was marked down
    assert all(c == 1 for c in lb.delivered.values()) and len(lb.delivered) == 120


def test_5xx_is_retried_elsewhere_and_4xx_is_not():
    lb, res = asyncio.run(_drive("round_robin", [0.0, 0.0], status={0: 503}, n=10))
    assert res.answered == 10 and lb.sent[1] == 10
    lb, res = asyncio.run(_drive("round_robin", [0.0, 0.0], status={0: 422, 1: 422}, n=4))
    assert res.answered == 0 and res.errors["ClientError"] == 4 and sum(lb.sent) == 4


def test_all_replicas_down_raises_no_replica_available():
    async def main():
        async with Balancer(
            URLS[:2], transport=_fleet([0, 0], dead={0, 1}), health_interval_s=None
        ) as lb:
            with pytest.raises(NoReplicaAvailable, match="ConnectError"):
                await lb.post("/v1/predict", json={})
            assert lb.healthy == [False, False]
            with pytest.raises(NoReplicaAvailable, match="ConnectError"):  # still tried, last
                await lb.post("/v1/predict", json={})

    asyncio.run(main())


def test_health_check_removes_and_restores_a_replica():
    dead: set[int] = set()

    async def main():
        transport = _fleet([0, 0], dead=dead)
        async with Balancer(URLS[:2], transport=transport, health_interval_s=None) as lb:
            assert await lb.check_health() == [True, True]
            dead.add(0)
            assert await lb.check_health() == [False, True]
            _data, i = await lb.post("/v1/predict", json={"request_id": "a"})
            assert i == 1
            dead.clear()
            assert await lb.check_health() == [True, True]
            return lb.health_events

    assert asyncio.run(main()) == [(0, False), (0, True)]


def test_balancer_and_loadgen_refuse_non_loopback_urls():
    with pytest.raises(ValueError, match="loopback"):
        Balancer(["http://10.0.0.1:8000"])
    with pytest.raises(ValueError, match="loopback"):
        require_loopback("http://example.com/")
    assert require_loopback("http://127.0.0.1:1/") == "http://127.0.0.1:1/"


def test_loadgen_counts_lost_duplicated_and_mismatched_answers():
    async def send(i):
        if i == 3:
            raise ConnectionError("gone")
        return {5: 4, 7: 99}.get(i, i)  # 5 answers as 4 (a duplicate of 4), 7 as an unsent id

    res = asyncio.run(run_load(send, num_clients=3, num_requests=10))
    assert (res.issued, res.answered) == (10, 9)
    assert (res.lost, res.duplicated, res.mismatched) == (3, 1, 1)  # ids 3, 5, 7 never answered
    assert res.errors["ConnectionError"] == 1
    with pytest.raises(ValueError):
        asyncio.run(run_load(send, num_clients=0, num_requests=1))


def test_a_timeout_retries_elsewhere_without_marking_the_replica_down():
    async def main():
        async with Balancer(
            URLS[:2],
            "round_robin",
            transport=_fleet([0.0, 0.0], hang={0}),
            health_interval_s=None,
        ) as lb:
            data, i = await lb.post("/v1/predict", json={"request_id": "t"})
            return data, i, lb

    data, i, lb = asyncio.run(main())
    assert i == 1 and data["request_id"] == "t" and lb.retries == 1
    assert lb.healthy == [True, True]
