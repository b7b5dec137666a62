"""Chapter 05 benchmark ``hybrid``: edge–cloud hybrid inference on MNIST-1D, with real cloud replica
processes on 127.0.0.1 (:mod:`labsupport.hybrid`).

The edge is chapter 04's pipeline on the cloud model: a 12-channel student distilled from the
256-channel cloud, exported to ONNX and quantized to static INT8 QDQ, run by ONNX Runtime on one
thread (``edge_runtime``). Figures (each measured side by side in one run):

* ``edge_test_accuracy`` / ``cloud_test_accuracy`` and ``edge_cloud_gap_points``: the accuracy gap
  routing has to close (target >= 1 point: a pair with no gap has nothing to route).
* ``offload_at_cloud_acc`` -- fraction of test inputs offloaded when the threshold is chosen on the
  validation split for "hybrid accuracy within 0.5 points of cloud accuracy", holding for the 95%
  upper confidence bound of the accuracy lost (temperature-scaled max softmax). Target <= 0.35.
  ``hybrid_minus_cloud_acc`` says whether the test set agrees.
* ``routing_overhead`` -- (score + calibration + decision) time ÷ edge inference time (ONNX Runtime
  INT8 + argmax) on a batch of 256, medians; batch-amortized, so the per-input ratio is the same.
  Each router is timed in the loop a device runs (edge, then route), the routers' loops alternated
  in blocks of 20. The router is :class:`~labsupport.hybrid.routing.FastRouter`'s
  compiled loop (the offload mask). Target < 0.05. ``routing_overhead_b1`` / ``_b64`` are the same
  at batch 1 and 64 (per-call overheads of a few microseconds dominate both sides there);
  ``routing_overhead_numpy`` is the numpy version that also returns every confidence, and
  ``routing_overhead_torch`` the textbook softmax-then-max in torch, both at batch 256.
* ``lost_requests_replica_killed``, ``duplicated_requests_replica_killed`` -- 64 concurrent clients
  through the least-outstanding balancer; one of two replica processes is SIGKILLed a third of the
  way in. Target 0 each.
* ``p99_ms_edge``, ``p99_ms_cloud``, ``p99_ms_hybrid`` -- single-input requests, 8 concurrent clients.
* ``microbatch_speedup`` -- requests/s of one replica with ÷ without server-side micro-batching under
  64 concurrent clients (best of alternated rounds). Target >= 2.

Smoke mode trains a smaller cloud model and student for a few hundred steps and sends fewer requests:
every code path runs, the accuracy numbers mean little.
"""

from __future__ import annotations

from labsupport.hybrid import experiments as ex
from labsupport.hybrid.models import train_pair
from labsupport.hybrid.replicas import ReplicaSet

from . import Result, Target, benchmark


@benchmark(
    "hybrid",
    "edge–cloud routing, failover, micro-batching and latency with real replicas on loopback",
    chapter="05",
)
def hybrid(smoke: bool) -> Result:
    if smoke:
        edge = ("student", {"channels": 12, "steps": 300})
        pair = train_pair(steps=300, cloud=("cnn", {"channels": 64}), edge=edge)
    else:
        pair = train_pair(steps=4000)
    routing = ex.routing_experiment(pair, level=0.95)
    overhead = ex.routing_overhead(
        pair,
        temperature=routing["temperature"],
        threshold=routing["threshold"],
        repeats=100 if smoke else 400,
    )
    by_batch = {r["batch"]: r for r in overhead["rows"]}
    with ReplicaSet(pair.cloud_path, 2) as rs:
        lat = ex.latency_by_mode(
            rs.urls,
            pair,
            temperature=routing["temperature"],
            threshold=routing["threshold"],
            num_requests=100 if smoke else 600,
        )
        fail = ex.failover_experiment(rs, pair.x_test, num_requests=150 if smoke else 600)
    mb = ex.microbatch_throughput(
        pair.cloud_path, num_requests=300 if smoke else 3000, rounds=1 if smoke else 3
    )
    figures = {
        "offload_at_cloud_acc": round(routing["test_offload"], 4),
        "hybrid_minus_cloud_acc": round(
            routing["test_hybrid_accuracy"] - routing["test_cloud_accuracy"], 4
        ),
        "edge_test_accuracy": round(routing["test_edge_accuracy"], 4),
        "cloud_test_accuracy": round(routing["test_cloud_accuracy"], 4),
        "edge_cloud_gap_points": round(
            100 * (routing["test_cloud_accuracy"] - routing["test_edge_accuracy"]), 2
        ),
        "edge_fp32_test_accuracy": round(
            pair.metrics.get("edge_fp32_test_accuracy", float("nan")), 4
        ),
        "edge_parameters": pair.metrics["edge_parameters"],
        "cloud_parameters": pair.metrics["cloud_parameters"],
        "hybrid_test_accuracy": round(routing["test_hybrid_accuracy"], 4),
        "ece_before": round(routing["ece_before"], 4),
        "ece_after": round(routing["ece_after"], 4),
        "routing_overhead": round(overhead["ratio"], 4),
        "routing_overhead_b1": round(by_batch[1]["ratio"], 4),
        "routing_overhead_b64": round(by_batch[64]["ratio"], 4),
        "routing_overhead_numpy": round(by_batch[256]["numpy_ratio"], 4),
        "routing_overhead_torch": round(by_batch[256]["torch_ratio"], 4),
        "routing_us_b256": round(by_batch[256]["routing_us"], 2),
        "edge_us_b256": round(by_batch[256]["edge_us"], 2),
        "lost_requests_replica_killed": fail["lost"],
        "duplicated_requests_replica_killed": fail["duplicated"] + fail["delivered_twice"],
        "microbatch_speedup": round(mb["speedup"], 3),
    }
    for mode in ("edge", "cloud", "hybrid"):
        figures[f"p99_ms_{mode}"] = round(lat[mode]["p99_ms"], 3)
        figures[f"p50_ms_{mode}"] = round(lat[mode]["p50_ms"], 3)
    targets = {
        "offload": Target(
            "offload_at_cloud_acc",
            max=0.35,
            note="threshold from validation; the closest point is reported when unmet",
        ),
        "gap": Target("edge_cloud_gap_points", min=1.0, note="an edge/cloud pair worth routing"),
        "overhead": Target(
            "routing_overhead",
            max=0.05,
            note="compiled router, batch of 256 vs ONNX Runtime INT8 edge, medians",
        ),
        "lost": Target("lost_requests_replica_killed", max=0, note="1 of 2 replicas killed"),
        "duplicated": Target("duplicated_requests_replica_killed", max=0),
        "microbatch": Target("microbatch_speedup", min=2.0, note="64 concurrent clients"),
    }
    details = {
        "temperature": routing["temperature"],
        "threshold": routing["threshold"],
        "val_offload": routing["val_offload"],
        "routing_overhead": overhead,
        "failover": fail,
        "microbatch": {k: v for k, v in mb.items() if k != "runs"},
        "latency": {m: {k: v for k, v in d.items() if k != "latencies_ms"} for m, d in lat.items()},
        "metrics": pair.metrics,
        "edge_runtime": (
            f"onnxruntime int8 ({pair.edge.provider}, 1 thread)"
            if pair.edge_onnx is not None
            else "pytorch"
        ),
        "choice": "threshold: 95% upper bound of the accuracy lost within 0.5 points (validation)",
    }
    return Result(figures=figures, targets=targets, details=details)
