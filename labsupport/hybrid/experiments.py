"""The chapter's measurements, shared by notebook 05 and the ``hybrid`` benchmark (chapter 05,
sections 3-7). Each function runs one experiment and returns its numbers as data.

* :func:`routing_experiment` -- temperature on validation, ECE before/after on test, the threshold
  for "hybrid within ``gap`` of cloud accuracy" chosen on validation, and test accuracy/offload.
* :func:`routing_overhead` -- (calibration + score + decision time) / edge inference time (the INT8
  student on ONNX Runtime, with the argmax every edge answer needs) at batch sizes 1, 64 and 256,
  medians; the compiled :class:`FastRouter` beside its numpy :meth:`~FastRouter.decide` and the
  textbook softmax-then-max in torch, each in its own edge-then-route loop, the loops alternated.
* :func:`edge_ladder` -- chapter 04's students of several widths as edge models: INT8 accuracy,
  the gap to the cloud, and what routing must offload to close it.
* :func:`latency_by_mode` -- per-input latency percentiles for edge only, cloud only and hybrid,
  under ``num_clients`` concurrent single-input requests on loopback.
* :func:`failover_experiment` -- ``num_clients`` clients through a :class:`Balancer`; one replica
  process is killed (SIGKILL) after ``kill_after`` requests; lost and duplicated answers by id.
* :func:`microbatch_throughput` -- requests/s of one replica with and without micro-batching under
  ``num_clients`` concurrent clients, alternated ``rounds`` times.
* :func:`wire_table` -- bytes per input, accuracy and latency of sending raw inputs vs split-inference
  features (float32 and int8), and how much of the input a linear attacker recovers from each.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .balancer import Balancer
from .calibration import apply_temperature, expected_calibration_error, fit_temperature, nll
from .client import HybridClient, encode_binary, quantize_int8
from .loadgen import LoopbackConnection, percentiles, run_load, run_sync
from .models import (
    ModelPair,
    OnnxClassifier,
    TorchClassifier,
    cnn_head,
    cnn_tail,
    distilled_edge,
    feature_shape,
    reconstruction_r2,
)
from .replicas import ReplicaSet
from .routing import (
    SCORES,
    FastRouter,
    choose_threshold,
    hybrid_predictions,
    max_softmax,
    route,
    tradeoff_curve,
)

__all__ = [
    "edge_ladder",
    "failover_experiment",
    "latency_by_mode",
    "microbatch_throughput",
    "routing_experiment",
    "routing_overhead",
    "wire_table",
]


@torch.inference_mode()
def routing_experiment(
    pair: ModelPair,
    *,
    score: str = "max_softmax",
    gap: float = 0.005,
    level: float | None = 0.95,
    cloud_logits: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict:
    """Calibrate on validation, choose the threshold on validation, measure on test.

    ``level``: the threshold keeps the ``level`` upper confidence bound of the accuracy lost within
    ``gap`` (:func:`choose_threshold`); ``None`` uses the point estimate. ``cloud_logits``
    (validation, test) saves recomputing them across calls.
    """
    ev, et = pair.edge(pair.x_val), pair.edge(pair.x_test)
    cv, ct = (
        cloud_logits
        if cloud_logits is not None
        else (pair.cloud(pair.x_val), pair.cloud(pair.x_test))
    )
    t = fit_temperature(ev, pair.y_val)
    f = SCORES[score]
    conf_v, conf_t = f(apply_temperature(ev, t)), f(apply_temperature(et, t))
    e_ok_v, c_ok_v = ev.argmax(1) == pair.y_val, cv.argmax(1) == pair.y_val
    choice = choose_threshold(conf_v, e_ok_v, c_ok_v, target="cloud_gap", gap=gap, level=level)
    off = route(conf_t, choice.threshold)
    hyb = hybrid_predictions(et.argmax(1), ct.argmax(1), off)
    e_ok_t, c_ok_t = et.argmax(1) == pair.y_test, ct.argmax(1) == pair.y_test
    return {
        "temperature": t,
        "ece_before": expected_calibration_error(torch.softmax(et, 1), pair.y_test),
        "ece_after": expected_calibration_error(apply_temperature(et, t), pair.y_test),
        "nll_before": nll(et, pair.y_test),
        "nll_after": nll(et, pair.y_test, t),
        "threshold": choice.threshold,
        "val_offload": choice.offload,
        "val_accuracy": choice.accuracy,
        "test_offload": float(off.float().mean()),
        "test_hybrid_accuracy": float((hyb == pair.y_test).float().mean()),
        "test_edge_accuracy": float(e_ok_t.float().mean()),
        "test_cloud_accuracy": float(c_ok_t.float().mean()),
        "test_curve": tradeoff_curve(conf_t, e_ok_t, c_ok_t),
        "val_curve": tradeoff_curve(conf_v, e_ok_v, c_ok_v),
        "edge_logits_test": et,
    }


def _edge_logits(edge) -> Callable[[np.ndarray], np.ndarray]:
    if isinstance(edge, OnnxClassifier):
        return edge.logits
    clf = edge if isinstance(edge, TorchClassifier) else TorchClassifier(edge)
    return lambda x: clf(x).numpy()


def routing_overhead(
    pair: ModelPair,
    *,
    temperature: float,
    threshold: float,
    batch: int = 256,
    batches: tuple[int, ...] = (1, 64, 256),
    repeats: int = 200,
) -> dict:
    """Routing time against edge inference time on the same batches, medians of ``repeats``.

    Three routers make the same decision: *routing* = the compiled :class:`FastRouter` (score +
    calibration + decision, the mask only); *numpy routing* = :meth:`FastRouter.decide`, which also
    returns every row's confidence; *torch routing* = the textbook ``route(max_softmax(softmax(z /
    T)), t)``. Each is timed in the loop a device runs: *edge* (the device's model on the batch plus
    the argmax every edge answer needs), then the router, again and again. The loops take turns in
    blocks of 20 (the first two of each block dropped), so machine load hits all three alike, while
    no router runs right after another's cache traffic. Returns one row per batch size, each router's
    time with its ratio to the edge time of its own blocks, and, for ``batch``, ``edge_ms``,
    ``routing_ms`` and ``ratio`` (routing ÷ edge: batch-amortized, the per-input ratio is the same).
    """
    if batch not in batches:
        batches = (*batches, batch)
    logits_of = _edge_logits(pair.edge)
    router = FastRouter(temperature, threshold)

    def textbook(z: np.ndarray, pred: np.ndarray) -> torch.Tensor:
        return route(max_softmax(apply_temperature(torch.from_numpy(z), temperature)), threshold)

    routers: dict[str, Callable] = {
        "routing": lambda z, pred: router(z),
        "numpy_routing": router.decide,
        "torch_routing": textbook,
    }
    names = list(routers)
    block, skip = 20, 2
    rows = []
    for b in batches:
        x = np.ascontiguousarray(pair.x_test[:b].numpy(), dtype=np.float32)
        if len(x) < b:  # a test split smaller than the batch: tile it
            x = np.ascontiguousarray(np.resize(x, (b, *x.shape[1:])))
        router(logits_of(x))  # the first call loads the compiled kernel
        edge_t: dict[str, list[float]] = {k: [] for k in names}
        route_t: dict[str, list[float]] = {k: [] for k in names}
        for blk in range(max(1, repeats // block) + 1):  # block 0 is warm-up
            for name in (
                names[blk % len(names) :] + names[: blk % len(names)]
            ):  # each router goes first in turn
                fn = routers[name]
                for i in range(block + skip):
                    t0 = time.perf_counter()
                    z = logits_of(x)
                    pred = z.argmax(axis=1)
                    t1 = time.perf_counter()
                    fn(z, pred)
                    t2 = time.perf_counter()
                    if blk > 0 and i >= skip:
                        edge_t[name].append(t1 - t0)
                        route_t[name].append(t2 - t1)
        row: dict = {"batch": b, "edge_us": statistics.median(edge_t["routing"]) * 1e6}
        for name in names:
            r, e = statistics.median(route_t[name]), statistics.median(edge_t[name])
            row[f"{name}_us"] = r * 1e6
            row[name.replace("routing", "ratio")] = r / e
        rows.append(row)
    head = next(r for r in rows if r["batch"] == batch)
    return {
        "edge_ms": head["edge_us"] / 1e3,
        "routing_ms": head["routing_us"] / 1e3,
        "ratio": head["ratio"],
        "batch": batch,
        "runtime": type(pair.edge).__name__,
        "rows": rows,
    }


def edge_ladder(
    pair: ModelPair,
    channels: tuple[int, ...] = (8, 12, 16, 24, 40),
    *,
    steps: int = 3000,
    gap: float = 0.005,
    level: float | None = 0.95,
    seed: int = 0,
) -> list[dict]:
    """Chapter 04's distilled INT8 student at several widths as the edge of ``pair``'s cloud.

    Per width: parameters, INT8 test accuracy, the gap to the cloud (points), and the offload and
    hybrid-minus-cloud accuracy of :func:`routing_experiment` (threshold chosen on validation).
    Students are cached (:func:`labsupport.hybrid.models.distilled_edge`).
    """
    with torch.inference_mode():
        cloud_logits = (pair.cloud(pair.x_val), pair.cloud(pair.x_test))
    rows = []
    for ch in channels:
        model, _, onnx_path = distilled_edge(
            pair.cloud,
            pair.cloud_path,
            pair.x_train,
            pair.y_train,
            channels=ch,
            steps=steps,
            seed=seed,
        )
        edge = OnnxClassifier(onnx_path)
        r = routing_experiment(
            replace(pair, edge=edge), gap=gap, level=level, cloud_logits=cloud_logits
        )
        rows.append(
            {
                "channels": ch,
                "parameters": sum(p.numel() for p in model.parameters()),
                "int8_test_accuracy": r["test_edge_accuracy"],
                "cloud_test_accuracy": r["test_cloud_accuracy"],
                "gap_points": 100 * (r["test_cloud_accuracy"] - r["test_edge_accuracy"]),
                "val_offload": r["val_offload"],
                "test_offload": r["test_offload"],
                "hybrid_minus_cloud_points": 100
                * (r["test_hybrid_accuracy"] - r["test_cloud_accuracy"]),
            }
        )
    return rows


async def _latency_modes(urls, pair, temperature, threshold, num_clients, num_requests):
    edge = pair.edge if isinstance(pair.edge, OnnxClassifier) else TorchClassifier(pair.edge)
    x = pair.x_test
    out = {}
    async with Balancer(urls, "least_outstanding", timeout_s=30.0) as lb:
        hc = HybridClient(edge, threshold=threshold, temperature=temperature, balancer=lb)

        async def edge_only(i):
            hc.decide(x[i % len(x)][None])
            return i

        async def cloud_only(i):
            rid = str(i)
            body = encode_binary(x[i % len(x)][None], request_id=rid)
            data, _ = await lb.post(
                "/v1/predict_binary",
                content=body,
                headers={"content-type": "application/octet-stream"},
            )
            return int(data["request_id"])

        async def hybrid(i):
            ans = await hc.predict(x[i % len(x)][None])
            if ans.degraded.any():
                raise RuntimeError("degraded answer")
            return i

        for name, fn in (("edge", edge_only), ("cloud", cloud_only), ("hybrid", hybrid)):
            await run_load(fn, num_clients=num_clients, num_requests=50, max_duration_s=10)
            res = await run_load(
                fn, num_clients=num_clients, num_requests=num_requests, max_duration_s=60
            )
            out[name] = {**res.summary(), "latencies_ms": res.latencies_s * 1e3}
    return out


def latency_by_mode(
    urls: list[str],
    pair: ModelPair,
    *,
    temperature: float,
    threshold: float,
    num_clients: int = 8,
    num_requests: int = 400,
) -> dict:
    """Latency percentiles of single-input requests answered edge-only, cloud-only and hybrid."""
    return run_sync(_latency_modes(urls, pair, temperature, threshold, num_clients, num_requests))


def failover_experiment(
    replicas: ReplicaSet,
    x: torch.Tensor,
    *,
    num_clients: int = 64,
    num_requests: int = 400,
    kill_after: int | None = None,
    kill: int = 0,
    policy: str = "least_outstanding",
) -> dict:
    """Kill replica ``kill`` (SIGKILL) after ``kill_after`` requests were sent, under load."""
    kill_after = num_requests // 3 if kill_after is None else kill_after

    async def main():
        async with Balancer(replicas.urls, policy, timeout_s=30.0) as lb:

            async def send(i: int):
                body = encode_binary(x[i % len(x)][None], request_id=str(i))
                data, _ = await lb.post(
                    "/v1/predict_binary",
                    content=body,
                    headers={"content-type": "application/octet-stream"},
                )
                return int(data["request_id"])

            async def killer():
                while sum(lb.sent) < kill_after:
                    await asyncio.sleep(0.002)
                replicas.kill(kill)

            res, _ = await asyncio.gather(
                run_load(
                    send, num_clients=num_clients, num_requests=num_requests, max_duration_s=120
                ),
                killer(),
            )
            return res, lb

    res, lb = run_sync(main())
    return {
        **res.summary(),
        "sent_per_replica": list(lb.sent),
        "retries": lb.retries,
        "healthy_after": list(lb.healthy),
        "delivered_twice": sum(1 for c in lb.delivered.values() if c > 1),
    }


async def _throughput(
    url: str, num_clients: int, num_requests: int, length: int, warmup: int
) -> dict:
    conns = [LoopbackConnection(url) for _ in range(num_clients)]
    for c in conns:
        await c.__aenter__()
    free = list(conns)
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=length).round(4).tolist() for _ in range(64)]

    async def send(i: int):
        c = free.pop()
        try:
            body = json.dumps({"input": inputs[i % 64], "request_id": str(i)}).encode()
            status, raw = await c.post("/v1/predict", body)
        finally:
            free.append(c)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {raw[:200]!r}")
        return int(json.loads(raw)["request_id"])

    try:
        await run_load(send, num_clients=num_clients, num_requests=warmup, max_duration_s=10)
        res = await run_load(
            send, num_clients=num_clients, num_requests=num_requests, max_duration_s=30
        )
    finally:
        for c in conns:
            await c.__aexit__()
    return res.summary()


def microbatch_throughput(
    model_path: str | Path,
    *,
    num_clients: int = 64,
    num_requests: int = 2000,
    rounds: int = 2,
    max_wait_ms: float = 2.0,
    max_items: int = 64,
) -> dict:
    """Throughput of one replica without and with micro-batching, alternated ``rounds`` times.

    Each run first sends ``min(1000, num_requests)`` untimed requests: a fresh replica answers its
    first batched requests more slowly than later ones, and a throughput figure is the steady state.
    """
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for _ in range(rounds):
        for mode in ("off", "on"):
            env = {
                "HYBRID_MICROBATCH": "1" if mode == "on" else "0",
                "HYBRID_MAX_WAIT_MS": str(max_wait_ms),
                "HYBRID_MAX_ITEMS": str(max_items),
            }
            with ReplicaSet(model_path, 1, env=env) as rs:
                load = _throughput(
                    rs.urls[0], num_clients, num_requests, 40, min(1000, num_requests)
                )
                runs[mode].append(run_sync(load))
    best = {m: max(r["throughput_rps"] for r in runs[m]) for m in runs}
    return {
        "throughput_off_rps": best["off"],
        "throughput_on_rps": best["on"],
        "speedup": best["on"] / best["off"] if best["off"] else float("nan"),
        "p99_off_ms": min(r["p99_ms"] for r in runs["off"]),
        "p99_on_ms": min(r["p99_ms"] for r in runs["on"]),
        "runs": runs,
    }


async def _split_latency(urls, pair, layer, int8, n):
    out = []
    async with Balancer(urls, "least_outstanding", health_interval_s=None) as lb:
        for i in range(n):
            x = pair.x_test[i][None]
            t0 = time.perf_counter()
            h = cnn_head(pair.cloud, x, layer)
            body = encode_binary(h, layer=layer, int8=int8)
            await lb.post(
                "/v1/predict_binary",
                content=body,
                headers={"content-type": "application/octet-stream"},
            )
            out.append(time.perf_counter() - t0)
    return percentiles(out)["p50_ms"]


def wire_table(pair: ModelPair, urls: list[str], *, latency_requests: int = 100) -> list[dict]:
    """What crosses the wire for raw inputs and for the cloud model's features after 1-3 convs.

    Bytes per input: the safetensors payload of one input (and JSON text for raw inputs). Accuracy:
    the cloud answer on the test set from those bytes (int8 features change it slightly). Latency:
    median of single-input requests (head on the device + request). Exposure: R² of a ridge
    regression from the payload back to the raw input (fit on validation, scored on test).
    """
    rows = []
    y = pair.y_test
    for layer in (0, 1, 2, 3):
        for int8 in (False, True) if layer else (False,):
            h_test = cnn_head(pair.cloud, pair.x_test, layer)
            h_val = cnn_head(pair.cloud, pair.x_val, layer)
            one = encode_binary(h_test[:1], layer=layer, int8=int8)
            if int8:  # what the cloud sees after dequantization
                q, s = quantize_int8(h_test)
                h_seen, (qv, sv) = q.float() * s, quantize_int8(h_val)
                h_val = qv.float() * sv
            else:
                h_seen = h_test
            acc = float((cnn_tail(pair.cloud, h_seen, layer).argmax(1) == y).float().mean())
            rows.append(
                {
                    "payload": "raw input" if layer == 0 else f"features after conv{layer}",
                    "dtype": "int8" if int8 else "float32",
                    "values": int(np.prod(feature_shape(pair.cloud, layer))),
                    "bytes_binary": len(one),
                    "bytes_tensor": int(h_test[:1].numel() * (1 if int8 else 4)),
                    "accuracy": acc,
                    "p50_ms": run_sync(_split_latency(urls, pair, layer, int8, latency_requests)),
                    "reconstruction_r2": reconstruction_r2(h_val, pair.x_val, h_seen, pair.x_test),
                }
            )
    raw_json = len(json.dumps({"input": pair.x_test[0].tolist()}).encode())
    rows[0]["bytes_json"] = raw_json
    return rows
