"""Chapter 05: edge–cloud hybrid inference.

An edge model answers every input and offloads the ones it is unsure of to a cloud model served over
HTTP. The modules, in the order the chapter uses them:

* :mod:`~labsupport.hybrid.models` -- the edge/cloud model pair (chapter 04's distilled INT8
  student on ONNX Runtime, a wide cloud CNN; safetensors checkpoints), the ``Classifier`` interface
  (PyTorch or ONNX Runtime), split inference.
* :mod:`~labsupport.hybrid.calibration` -- temperature scaling, ECE, reliability diagrams.
* :mod:`~labsupport.hybrid.routing` -- confidence scores, vectorized routing, thresholds from a
  validation target; :mod:`~labsupport.hybrid.route_kernel`, the device's offload decision as one
  compiled loop (numba, imported on first use).
* :mod:`~labsupport.hybrid.service` -- the FastAPI cloud service with validation and micro-batching.
* :mod:`~labsupport.hybrid.replicas` -- replicas as real processes on loopback, stopped by group.
* :mod:`~labsupport.hybrid.balancer` -- round-robin, least-outstanding, power-of-two choices,
  health checks and failover.
* :mod:`~labsupport.hybrid.client` -- the edge client: route, cache, call the cloud, degrade offline.
* :mod:`~labsupport.hybrid.cache` -- LRU vs the naive count-based cache, prefetching.
* :mod:`~labsupport.hybrid.loadgen` -- a bounded closed-loop load generator on 127.0.0.1.

The web stack (FastAPI, uvicorn, httpx) and numba are imported only by the modules that need them.
"""

from .cache import LRUCache, MarkovPrefetcher, NaiveCountCache, input_key, simulate_cache
from .calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    plot_reliability,
    reliability_bins,
)
from .models import (
    Classifier,
    ModelPair,
    OnnxClassifier,
    TorchClassifier,
    distilled_edge,
    train_pair,
)
from .routing import (
    SCORES,
    choose_threshold,
    hybrid_predictions,
    margin,
    max_softmax,
    naive_route,
    neg_entropy,
    route,
    tradeoff_curve,
)

__all__ = [
    "SCORES",
    "Classifier",
    "LRUCache",
    "MarkovPrefetcher",
    "ModelPair",
    "NaiveCountCache",
    "OnnxClassifier",
    "TorchClassifier",
    "apply_temperature",
    "choose_threshold",
    "distilled_edge",
    "expected_calibration_error",
    "fit_temperature",
    "hybrid_predictions",
    "input_key",
    "margin",
    "max_softmax",
    "naive_route",
    "neg_entropy",
    "plot_reliability",
    "reliability_bins",
    "route",
    "simulate_cache",
    "tradeoff_curve",
    "train_pair",
]
