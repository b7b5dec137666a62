"""Chapter 02 benchmark ``secagg_cost``: what secure aggregation costs, and what SecAgg+ saves.

Bonawitz et al. (CCS 2017) cost a client ``O(n + L)`` and the server ``O(n^2 + n L)`` (Section 7): for
every client that drops after sharing its keys the server re-expands one pairwise mask per survivor.
Bell et al. (CCS 2020) mask along a random graph of degree ``O(log n)`` and bring both down to
``O(log n)`` expansions. Measured here side by side in one run, for ``n`` in {10, 50, 100, 200}
clients and vectors of length ``L = 10^5``:

* ``full`` -- :mod:`labsupport.privacy.secagg` on the complete graph; ``plus`` -- SecAgg+ with degree
  ``2 * ceil(log2 n)`` (capped at ``n - 1``); ``plain`` -- the clipped float32 vectors sent in the clear
  and summed by numpy (no privacy: the reference).
* 0% and 10% of the clients dropping after share distribution (the server's expensive case). The
  rounds before are shared by the two cases (the messages are identical); each case gets fresh
  copies of the clients' unmasking state, since a client never answers two different requests.
  The server's unmasking is timed twice per case and the faster kept (the machines are shared).

Figures: ``client_s_<n>`` (mean client CPU seconds over the four rounds), ``server_s_<n>``,
``bytes_up_<n>`` (mean bytes a client sends), for the full graph without dropouts, plus suffixed
variants ``_drop10``, ``_plus``, ``_plus_drop10``, ``_plain``; ``overhead_vs_plain_sum`` = (client +
server seconds) of the full protocol ÷ that of the plain sum at the largest ``n``. Target:
``plus_vs_full_server_drop10`` (SecAgg+ server seconds ÷ full graph's, largest ``n``, 10% dropouts)
<= 1/3. Smoke mode: ``n`` in {4, 8}, ``L = 1000``.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np

from labsupport.privacy.secagg import SecAggClient, SecAggParams, SecAggServer, client_seed
from labsupport.privacy.secagg_masking import clip_to_norm

from . import Result, Target, benchmark


def secagg_plus_degree(n: int) -> int:
    """The neighbourhood size used for SecAgg+: ``2 * ceil(log2 n)``, even, at most ``n - 1``."""
    degree = 2 * math.ceil(math.log2(n))
    return degree if degree < n - 1 else n - 1


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def measure_secagg(
    n: int,
    length: int,
    degree: int | None,
    drop_fractions: tuple[float, ...],
    seed: int = 0,
    repeats: int = 2,
) -> dict[float, dict[str, float]]:
    """Run one round for each dropout fraction; mean client seconds, server seconds, mean bytes up."""
    params = SecAggParams(n, length, clip=1.0, degree=degree, frac_bits=16, graph_seed=seed)
    x = np.random.default_rng(seed).normal(scale=1e-3, size=(n, length))
    clients = [SecAggClient(u, params, client_seed(seed, 0, u)) for u in range(n)]
    client_s = np.zeros(n)
    up = np.zeros(n)
    ads = {}
    for u, c in enumerate(clients):
        ads[u], dt = _timed(c.advertise)
        client_s[u] += dt
    server = SecAggServer(params)
    key_list, server_setup = _timed(server.key_list, ads)
    shares = {}
    for u, c in enumerate(clients):
        shares[u], dt = _timed(c.share_keys, key_list)
        client_s[u] += dt
    forwards, dt = _timed(server.forward_shares, shares)
    server_setup += dt
    masked = {}
    for u, c in enumerate(clients):
        masked[u], dt = _timed(c.masked_input, forwards[u], x[u])
        client_s[u] += dt
    for u in range(n):
        up[u] = len(ads[u]) + len(shares[u]) + len(masked[u])
    out = {}
    for frac in drop_fractions:
        gone = set(
            np.random.default_rng(seed + 1).choice(
                n, max(round(frac * n), 1 if frac else 0), replace=False
            )
        )
        arrived = {u: m for u, m in masked.items() if u not in gone}
        c_s, c_up = client_s.copy(), up.copy()
        responses: dict[int, bytes] = {}
        best = math.inf
        for _ in range(repeats):  # the server's unmasking, timed twice (min): a shared machine
            srv = copy.copy(server)  # the state after forward_shares, shared by every case
            srv._lagrange = {}  # no Lagrange coefficients cached from another case
            request, dt_request = _timed(srv.unmask_request, arrived)
            if not responses:
                for u in arrived:
                    fresh = copy.copy(clients[u])  # a client answers one request only
                    fresh._revealed = {}
                    responses[u], dt = _timed(fresh.unmask, request)
                    c_s[u] += dt
                    c_up[u] += len(responses[u])
            result, dt = _timed(srv.aggregate, responses)
            best = min(best, dt_request + dt)
        server_s = server_setup + best
        expected = sum(clip_to_norm(x[u], 1.0) for u in arrived)
        err = float(np.abs(result.total - expected).max())
        if err > n / 2.0**16:
            raise AssertionError(f"secagg_cost: unmasked sum off by {err} (n = {n})")
        out[frac] = {
            "client_s": float(c_s.mean()),
            "server_s": server_s,
            "bytes_up": float(c_up.mean()),
        }
    return out


def measure_plain(n: int, length: int, seed: int = 0) -> dict[str, float]:
    """The reference: clipped float32 vectors in the clear, summed by numpy."""
    x = np.random.default_rng(seed).normal(scale=1e-3, size=(n, length))
    client_s, msgs = 0.0, []
    for u in range(n):
        start = time.perf_counter()
        msgs.append(clip_to_norm(x[u], 1.0).astype("<f4").tobytes())
        client_s += time.perf_counter() - start
    start = time.perf_counter()
    total = np.zeros(length)
    for m in msgs:
        total += np.frombuffer(m, dtype="<f4")
    server_s = time.perf_counter() - start
    return {"client_s": client_s / n, "server_s": server_s, "bytes_up": float(len(msgs[0]))}


@benchmark(
    "secagg_cost",
    "Secure aggregation vs SecAgg+ vs a plain sum: client/server seconds and bytes, 0/10% dropouts",
    chapter="02",
)
def secagg_cost(smoke: bool) -> Result:
    sizes = (4, 8) if smoke else (10, 50, 100, 200)
    length = 1000 if smoke else 100_000
    figures: dict[str, float] = {}
    details: dict[str, dict] = {"length": length, "degree": {}}
    for n in sizes:
        degree = secagg_plus_degree(n)
        details["degree"][n] = degree
        full = measure_secagg(n, length, None, (0.0, 0.1))
        plus = measure_secagg(n, length, degree, (0.0, 0.1))
        plain = measure_plain(n, length)
        for name, res in (
            ("", full[0.0]),
            ("_drop10", full[0.1]),
            ("_plus", plus[0.0]),
            ("_plus_drop10", plus[0.1]),
            ("_plain", plain),
        ):
            figures[f"client_s_{n}{name}"] = round(res["client_s"], 6)
            figures[f"server_s_{n}{name}"] = round(res["server_s"], 6)
            figures[f"bytes_up_{n}{name}"] = res["bytes_up"]
    big = sizes[-1]
    secagg_total = figures[f"client_s_{big}"] + figures[f"server_s_{big}"]
    plain_total = figures[f"client_s_{big}_plain"] + figures[f"server_s_{big}_plain"]
    figures["overhead_vs_plain_sum"] = round(secagg_total / plain_total, 2)
    figures["plus_vs_full_server_drop10"] = round(
        figures[f"server_s_{big}_plus_drop10"] / figures[f"server_s_{big}_drop10"], 3
    )
    targets = {
        "secagg_plus_server": Target(
            "plus_vs_full_server_drop10",
            max=1 / 3,
            note=f"SecAgg+ server time at n = {big} with 10% dropouts <= 1/3 of the complete graph's",
        )
    }
    return Result(figures=figures, targets=targets, details=details)
