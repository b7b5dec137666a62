"""The edge side of hybrid inference: run the edge model, route by calibrated confidence, ask the
cloud for the rest, fall back to the edge answer when the cloud is unreachable (chapter 05,
sections 3-5).

:class:`HybridClient` answers a batch in four vectorized steps -- edge logits; calibrated
probabilities ``softmax(z / T)``; a confidence score; the boolean offload mask ``confidence <
threshold`` (:func:`labsupport.hybrid.routing.route`; for the max-softmax score the folded
:class:`~labsupport.hybrid.routing.FastRouter` does the last three in one pass) -- then looks the offloaded inputs up in an
optional :class:`~labsupport.hybrid.cache.LRUCache` keyed by :func:`input_key`, and sends the misses in
*one* request through a :class:`~labsupport.hybrid.balancer.Balancer` (timeouts, retries, failover).
A 4xx answer is a bug in the request and raises :class:`~labsupport.hybrid.balancer.ClientError`. If
no replica answers, those inputs keep the edge's answer and are marked ``degraded``: the device
keeps working offline. :func:`encode_binary` is the wire format (safetensors, no pickle): raw inputs
(``layer=0``) or split-inference features, optionally int8 with one scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .balancer import Balancer, NoReplicaAvailable
from .cache import LRUCache, input_key
from .calibration import apply_temperature
from .models import Classifier, _to_tensor
from .routing import SCORES, FastRouter, route

__all__ = ["HybridAnswer", "HybridClient", "encode_binary", "quantize_int8"]


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Symmetric per-tensor int8: ``q = round(x / s)`` with ``s = max|x| / 127``."""
    amax = float(x.abs().max()) if x.numel() else 0.0
    scale = amax / 127 if amax > 0 else 1.0
    return torch.clamp(torch.round(x / scale), -127, 127).to(torch.int8), scale


def encode_binary(
    x: torch.Tensor, *, layer: int = 0, int8: bool = False, request_id: str | None = None
) -> bytes:
    """A safetensors body for ``POST /v1/predict_binary``."""
    from safetensors.torch import save

    meta = {"layer": str(layer)}
    if request_id is not None:
        meta["request_id"] = request_id
    if int8:
        q, scale = quantize_int8(x)
        meta["scale"] = repr(scale)
        return save({"x": q.contiguous()}, metadata=meta)
    return save({"x": x.float().contiguous()}, metadata=meta)


@dataclass
class HybridAnswer:
    """Per input: the answer, where it came from (``edge``/``cloud``/``cache``), the confidence,
    whether it was offloaded, and whether it is a degraded edge answer (cloud unreachable)."""

    predictions: torch.Tensor
    source: np.ndarray
    confidence: torch.Tensor
    offload: torch.Tensor
    degraded: torch.Tensor


class HybridClient:
    """Edge model + router + cache + cloud (see the module docstring)."""

    def __init__(
        self,
        edge: Classifier,
        *,
        threshold: float,
        temperature: float = 1.0,
        score: str = "max_softmax",
        balancer: Balancer | None = None,
        cache: LRUCache | None = None,
        wire: str = "binary",
    ) -> None:
        if score not in SCORES:
            raise ValueError(f"unknown score {score!r}; expected one of {sorted(SCORES)}")
        if wire not in {"binary", "json"}:
            raise ValueError(f"wire must be 'binary' or 'json', got {wire!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.edge = edge
        self.threshold = float(threshold)
        self.temperature = float(temperature)
        self.score = SCORES[score]
        folded = score == "max_softmax" and 0.0 < self.threshold < float("inf")
        self._fast = FastRouter(temperature, self.threshold) if folded else None
        self.balancer = balancer
        self.cache = cache
        self.wire = wire
        self._requests = 0

    def decide(self, x: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Edge logits, calibrated confidence and the offload mask for a batch (no network)."""
        logits = self.edge(x)
        if self._fast is not None:
            z = logits.numpy()
            if z.dtype != np.float32:
                z = z.astype(np.float32)
            conf, offload = self._fast.decide(z, z.argmax(axis=1))
            return logits, torch.from_numpy(conf), torch.from_numpy(offload)
        conf = self.score(apply_temperature(logits, self.temperature))
        return logits, conf, route(conf, self.threshold)

    async def _ask_cloud(self, x: torch.Tensor) -> torch.Tensor:
        assert self.balancer is not None
        self._requests += 1
        rid = f"h{self._requests}"
        if self.wire == "binary":
            body = encode_binary(x, request_id=rid)
            data, _ = await self.balancer.post(
                "/v1/predict_binary",
                content=body,
                headers={"content-type": "application/octet-stream"},
                request_id=rid,
            )
        else:
            data, _ = await self.balancer.post(
                "/v1/predict_batch", json={"inputs": x.tolist(), "request_id": rid}, request_id=rid
            )
        return torch.tensor(data["predictions"], dtype=torch.int64)

    async def predict(self, x: Any) -> HybridAnswer:
        xt = _to_tensor(x)
        logits, conf, offload = self.decide(xt)
        preds = logits.argmax(1)
        source = np.where(offload.numpy(), "cloud", "edge").astype(object)
        degraded = torch.zeros(len(xt), dtype=torch.bool)
        idx = offload.nonzero().flatten().tolist()
        keys = [input_key(xt[i]) for i in idx] if self.cache is not None else []
        misses = []
        for j, i in enumerate(idx):
            hit = self.cache.get(keys[j]) if self.cache is not None else None
            if hit is None:
                misses.append(j)
            else:
                preds[i] = hit
                source[i] = "cache"
        if misses:
            rows = [idx[j] for j in misses]
            try:
                if self.balancer is None:
                    raise NoReplicaAvailable("no cloud configured")
                cloud = await self._ask_cloud(xt[rows])
            except NoReplicaAvailable:
                degraded[rows] = True  # the edge answer stands, marked
                source[rows] = "edge"
            else:
                preds[rows] = cloud
                if self.cache is not None:
                    for j, p in zip(misses, cloud.tolist(), strict=True):
                        self.cache.put(keys[j], p)
        return HybridAnswer(preds, source, conf, offload, degraded)
