"""Load balancing across cloud replicas, with health checks and failover (chapter 05, section 6).

Policies (each chooses one replica among the healthy candidates):

* :class:`RoundRobin` -- the next replica in turn; blind to load.
* :class:`LeastOutstanding` -- the replica with the fewest requests in flight (a slow replica
  accumulates outstanding requests and is avoided automatically).
* :class:`PowerOfTwoChoices` -- two replicas drawn at random, the less loaded one taken (Mitzenmacher,
  "The Power of Two Choices in Randomized Load Balancing", IEEE TPDS 2001): nearly the balance of
  least-outstanding with only two loads read, which matters when many balancers share replicas.
* :class:`NaiveLeastLoaded` -- the naive pattern the chapter corrects: a "least loaded" counter that is
  incremented on every request and never decremented, so it counts requests *ever sent*, and the
  policy degenerates to round-robin (and ignores the latency it claims to consider).

:class:`Balancer` sends a request through ``httpx.AsyncClient`` with a timeout, tracks requests in
flight, and on a transport failure (connection refused or reset, timeout) or a 5xx retries the *same*
request on another replica, up to ``max_attempts`` replicas; a refused or reset connection also marks
the replica down (a passive health check; a timeout does not: slow is not dead). Replicas marked down
are tried last, not never. A 4xx is the caller's fault and is not retried. An active health check
(``GET /health`` every ``health_interval_s``) removes dead replicas and brings recovered ones back.
When no replica is up, :class:`NoReplicaAvailable` is raised so that the edge can answer alone
(degraded).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from typing import Any

import httpx

__all__ = [
    "POLICIES",
    "Balancer",
    "ClientError",
    "LeastOutstanding",
    "NaiveLeastLoaded",
    "NoReplicaAvailable",
    "Policy",
    "PowerOfTwoChoices",
    "RoundRobin",
    "make_policy",
]


class NoReplicaAvailable(RuntimeError):
    """Every replica is down, or every attempt failed."""


class ClientError(RuntimeError):
    """A replica answered 4xx: the request itself is wrong (not retried)."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class Policy:
    """Chooses a replica index from ``candidates``; told when a request starts and finishes."""

    name = "policy"

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"need at least one replica, got {n}")
        self.n = n
        self.outstanding = [0] * n

    def choose(self, candidates: list[int]) -> int:
        raise NotImplementedError

    def started(self, i: int) -> None:
        self.outstanding[i] += 1

    def finished(self, i: int) -> None:
        self.outstanding[i] -= 1


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self._next = 0

    def choose(self, candidates: list[int]) -> int:
        # the first candidate at or after the cursor, cyclically
        pick = min(candidates, key=lambda i: (i - self._next) % self.n)
        self._next = (pick + 1) % self.n
        return pick


class LeastOutstanding(Policy):
    name = "least_outstanding"

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self._next = 0

    def choose(self, candidates: list[int]) -> int:
        # fewest in flight; ties rotate so that an idle fleet is still used evenly
        pick = min(candidates, key=lambda i: (self.outstanding[i], (i - self._next) % self.n))
        self._next = (pick + 1) % self.n
        return pick


class PowerOfTwoChoices(Policy):
    name = "power_of_two"

    def __init__(self, n: int, seed: int = 0) -> None:
        super().__init__(n)
        self._rng = random.Random(seed)

    def choose(self, candidates: list[int]) -> int:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(candidates, 2)
        return a if self.outstanding[a] <= self.outstanding[b] else b


class NaiveLeastLoaded(Policy):
    """Do not use: its "load" only ever grows (see the module docstring)."""

    name = "naive_least_loaded"

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.load = [0] * n

    def choose(self, candidates: list[int]) -> int:
        return min(candidates, key=lambda i: self.load[i])

    def started(self, i: int) -> None:
        super().started(i)
        self.load[i] += 1

    def finished(self, i: int) -> None:
        super().finished(i)  # the true count is kept for reporting; the policy never looks at it


POLICIES = {p.name: p for p in (RoundRobin, LeastOutstanding, PowerOfTwoChoices, NaiveLeastLoaded)}


def make_policy(policy: str | Policy, n: int) -> Policy:
    if isinstance(policy, Policy):
        if policy.n != n:
            raise ValueError(f"policy was built for {policy.n} replicas, the balancer has {n}")
        return policy
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {sorted(POLICIES)}")
    return POLICIES[policy](n)


def _check_loopback(url: str) -> str:
    host = httpx.URL(url).host
    if host not in {"127.0.0.1", "localhost", "::1"}:
        raise ValueError(f"replica URL {url!r} is not on loopback; the labs only talk to 127.0.0.1")
    return url.rstrip("/")


class Balancer:
    """Sends requests to replicas ``urls`` by ``policy``, with retries, failover and health checks.

    Use as ``async with Balancer(urls) as lb: data, i = await lb.post("/v1/predict", json=...)``.
    ``sent[i]`` counts attempts per replica, ``retries`` the attempts that failed over.
    """

    def __init__(
        self,
        urls: list[str],
        policy: str | Policy = "least_outstanding",
        *,
        timeout_s: float = 2.0,
        max_attempts: int = 3,
        health_interval_s: float | None = 0.25,
        health_timeout_s: float = 0.5,
        max_connections: int = 256,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not urls:
            raise ValueError("need at least one replica URL")
        if max_attempts < 1 or timeout_s <= 0:
            raise ValueError(
                f"need max_attempts >= 1 and timeout_s > 0, got {max_attempts}, {timeout_s}"
            )
        self.urls = [_check_loopback(u) for u in urls]
        self.policy = make_policy(policy, len(urls))
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.healthy = [True] * len(urls)
        self.sent = [0] * len(urls)
        self.failures = [0] * len(urls)
        self.retries = 0
        self.health_events: list[tuple[int, bool]] = []  # (replica, now healthy?) on each change
        self.delivered: Counter = Counter()  # request ids of the answers handed back
        self._limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=64)
        self._transport = transport  # tests pass httpx.MockTransport
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> Balancer:
        self._client = httpx.AsyncClient(
            timeout=self.timeout_s, limits=self._limits, transport=self._transport
        )
        if self.health_interval_s:
            self._task = asyncio.get_running_loop().create_task(self._health_loop())
        return self

    async def __aexit__(self, *exc) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._client is not None:
            await self._client.aclose()

    def _mark(self, i: int, ok: bool) -> None:
        if self.healthy[i] != ok:
            self.healthy[i] = ok
            self.health_events.append((i, ok))

    async def check_health(self) -> list[bool]:
        """Probe ``GET /health`` on every replica now; returns (and stores) who is up."""
        assert self._client is not None, "use the Balancer inside `async with`"

        async def probe(url: str) -> bool:
            try:
                r = await self._client.get(f"{url}/health", timeout=self.health_timeout_s)
                return r.status_code == 200
            except httpx.HTTPError:
                return False

        results = await asyncio.gather(*(probe(u) for u in self.urls))
        for i, ok in enumerate(results):
            self._mark(i, ok)
        return list(self.healthy)

    async def _health_loop(self) -> None:
        while True:
            await self.check_health()
            await asyncio.sleep(self.health_interval_s)

    async def post(
        self,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        request_id: str | None = None,
    ) -> tuple[dict, int]:
        """POST to one replica chosen by the policy; on failure, to another. Returns
        ``(json answer, replica index)``; raises :class:`NoReplicaAvailable` or
        :class:`ClientError`."""
        assert self._client is not None, "use the Balancer inside `async with`"
        tried: set[int] = set()
        errors: list[str] = []
        for attempt in range(self.max_attempts):
            untried = [i for i in range(len(self.urls)) if i not in tried]
            # healthy replicas first; marks are hints, so the others are still tried before giving up
            candidates = [i for i in untried if self.healthy[i]] or untried
            if not candidates:
                break
            i = self.policy.choose(candidates)
            tried.add(i)
            self.sent[i] += 1
            if attempt:
                self.retries += 1
            self.policy.started(i)
            try:
                r = await self._client.post(
                    f"{self.urls[i]}{path}", json=json, content=content, headers=headers
                )
            except httpx.TransportError as exc:  # refused, reset, timed out: try elsewhere
                self.failures[i] += 1
                if not isinstance(exc, httpx.TimeoutException):  # slow is not dead
                    self._mark(i, False)
                errors.append(f"{self.urls[i]}: {type(exc).__name__}")
                continue
            finally:
                self.policy.finished(i)
            if r.status_code >= 500:
                self.failures[i] += 1
                errors.append(f"{self.urls[i]}: HTTP {r.status_code}")
                continue
            if r.status_code >= 400:
                raise ClientError(r.status_code, r.json().get("detail", r.text))
            data = r.json()
            self.delivered[data.get("request_id", request_id)] += 1
            return data, i
        raise NoReplicaAvailable(
            "no replica answered"
            + (f" after {len(errors)} attempt(s): {'; '.join(errors)}" if errors else ": all down")
        )
