"""A closed-loop load generator for the cloud service, on loopback only (chapter 05, section 7).

:func:`run_load` runs ``num_clients`` concurrent asyncio clients; each takes the next request id and
awaits ``send(id)`` until ``num_requests`` ids are issued or ``max_duration_s`` has passed (both bounds
always apply). ``send`` returns the request id echoed by the server's answer. The
:class:`LoadResult` counts, by request id, answers that never came back (``lost``), ids answered more
than once (``duplicated``) and answers carrying an id that was never sent (``mismatched``), and
gives latency percentiles and throughput. :func:`require_loopback` refuses any URL that is not
127.0.0.1 / localhost: these experiments never leave the machine. :class:`LoopbackConnection` is a
minimal keep-alive HTTP/1.1 client whose own CPU cost stays small beside the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import numpy as np

__all__ = [
    "LoadResult",
    "LoopbackConnection",
    "percentiles",
    "require_loopback",
    "run_load",
    "run_sync",
]


def require_loopback(url: str) -> str:
    """``url`` if its host is loopback, else ``ValueError``."""
    host = httpx.URL(url).host
    if host not in {"127.0.0.1", "localhost", "::1"}:
        raise ValueError(f"{url!r} is not a loopback address; load is only generated on 127.0.0.1")
    return url


def percentiles(latencies_s, qs=(50, 90, 99)) -> dict[str, float]:
    """``{"p50_ms": ..., ...}`` of latencies given in seconds (NaN when empty)."""
    arr = np.asarray(latencies_s, dtype=np.float64) * 1000
    return {f"p{q}_ms": float(np.percentile(arr, q)) if len(arr) else float("nan") for q in qs}


@dataclass
class LoadResult:
    issued: int
    answered: int
    lost: int
    duplicated: int
    mismatched: int
    duration_s: float
    latencies_s: np.ndarray
    errors: Counter = field(default_factory=Counter)

    @property
    def throughput_rps(self) -> float:
        return self.answered / self.duration_s if self.duration_s > 0 else 0.0

    def summary(self) -> dict[str, float]:
        return {
            "issued": self.issued,
            "answered": self.answered,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "mismatched": self.mismatched,
            "throughput_rps": self.throughput_rps,
            **percentiles(self.latencies_s),
        }


async def run_load(
    send: Callable[[int], Awaitable[object]],
    *,
    num_clients: int,
    num_requests: int,
    max_duration_s: float = 30.0,
) -> LoadResult:
    """Closed-loop load: ``num_clients`` workers call ``send(request_id)`` back to back."""
    if num_clients < 1 or num_requests < 1 or max_duration_s <= 0:
        raise ValueError(
            f"need num_clients >= 1, num_requests >= 1, max_duration_s > 0; got {num_clients}, "
            f"{num_requests}, {max_duration_s}"
        )
    next_id = 0
    answers: Counter = Counter()
    errors: Counter = Counter()
    latencies: list[float] = []
    start = time.perf_counter()
    deadline = start + max_duration_s

    async def worker() -> None:
        nonlocal next_id
        while next_id < num_requests and time.perf_counter() < deadline:
            rid = next_id
            next_id += 1
            t0 = time.perf_counter()
            try:
                echoed = await asyncio.wait_for(send(rid), max(deadline - t0, 0.001))
            except Exception as exc:  # counted, not raised: a lost request is a measurement
                errors[type(exc).__name__] += 1
                continue
            latencies.append(time.perf_counter() - t0)
            answers[echoed] += 1

    await asyncio.gather(*(worker() for _ in range(num_clients)))
    duration = time.perf_counter() - start
    issued = set(range(next_id))
    return LoadResult(
        issued=next_id,
        answered=sum(answers.values()),
        lost=len(issued - set(answers)),
        duplicated=sum(c - 1 for c in answers.values() if c > 1),
        mismatched=sum(c for k, c in answers.items() if k not in issued),
        duration_s=duration,
        latencies_s=np.asarray(latencies),
        errors=errors,
    )


class LoopbackConnection:
    """A minimal keep-alive HTTP/1.1 client over one asyncio stream, for load generation only.

    A full client (httpx) spends about as much CPU per request as the small service it measures; on
    a 2-core machine the load generator then saturates first and every server-side change looks
    like no change. This one writes the request bytes and reads ``Content-Length`` bytes back
    (no chunked encoding, no TLS, no redirects), so the server is the bottleneck.
    """

    def __init__(self, url: str) -> None:
        u = httpx.URL(require_loopback(url))
        self.host, self.port = u.host, u.port or 80
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> LoopbackConnection:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await self._writer.wait_closed()

    async def post(self, path: str, body: bytes, content_type: str = "application/json"):
        """``(status, body bytes)`` of one POST on the open connection."""
        assert self._reader is not None and self._writer is not None, "use `async with`"
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self._writer.write(head.encode() + body)
        status_line = await self._reader.readuntil(b"\r\n")
        status = int(status_line.split()[1])
        length = 0
        while (line := await self._reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        return status, await self._reader.readexactly(length)


def run_sync(coro):
    """Run a coroutine to completion from synchronous code, also inside Jupyter.

    ``asyncio.run`` refuses to start while an event loop is running (as in a notebook kernel); the
    coroutine then runs on a fresh loop in a worker thread, and this call waits for it.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
