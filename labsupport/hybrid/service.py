"""The cloud side of hybrid inference: a FastAPI service that serves the cloud model, with request
validation and server-side micro-batching (chapter 05, section 2).

Start it with uvicorn's factory mode (what :mod:`labsupport.hybrid.replicas` does)::

    HYBRID_MODEL=path/to/cloud.safetensors python -m uvicorn --factory \\
        labsupport.hybrid.service:app_from_env --host 127.0.0.1 --port 0

Endpoints (``N`` inputs of the model's length ``L``, 40 for MNIST-1D):

* ``GET /health`` -- ``{"status": "ok", "replica", "pid", "served", ...}``.
* ``POST /v1/predict`` -- ``{"input": [L floats], "request_id": optional}``, one answer.
* ``POST /v1/predict_batch`` -- ``{"inputs": [[L floats] x N], "request_id": optional}``.
* ``POST /v1/predict_binary`` -- a safetensors body (``application/octet-stream``) holding one tensor
  ``x``: raw inputs ``(N, L)`` float32 (metadata ``layer`` "0", the default) or, for split inference,
  the features after ``layer`` convolutions of the cloud model, float32 or int8 with metadata
  ``scale``. safetensors parses without pickle.

Bad requests are answered 4xx with a message saying what was wrong and what was expected, and the
server stays up: a malformed or mistyped body (422, Pydantic), a wrong shape (422), non-finite
numbers (422), more than ``max_batch`` inputs or a body over ``max_body_bytes`` (413), an unreadable
binary body (400).

Micro-batching (the dynamic batching of Clipper, Crankshaw et al., NSDI 2017, and of Triton): with
``microbatch=True`` every request's inputs go through one ``asyncio.Queue``; a worker takes the first
waiting request, gathers more for at most ``max_wait_ms`` or until ``max_items`` inputs, and runs *one*
forward pass for all of them. With ``microbatch=False`` each request runs its own forward pass. One
torch thread per replica process: parallelism comes from replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from labsupport.models import load_model

from .models import cnn_tail, feature_shape

__all__ = ["BodyLimit", "MicroBatcher", "app_from_env", "create_app"]

Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
RequestId = Annotated[str, Field(max_length=128)]


class PredictOne(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: list[Number]
    request_id: RequestId | None = None


class PredictBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: list[list[Number]]
    request_id: RequestId | None = None


class MicroBatcher:
    """Gathers concurrent requests into one forward pass.

    ``await submit(x, layer)`` queues a batch ``x`` (features after ``layer`` convolutions; 0 = raw
    inputs) and returns its logits. The worker task (``start()``/``stop()``) takes the first queued
    item, then keeps taking items until ``max_items`` inputs are gathered or ``max_wait_s`` has passed
    since the first, and runs ``forward(x, layer)`` once per layer present.
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor, int], torch.Tensor],
        *,
        max_items: int = 64,
        max_wait_s: float = 0.002,
    ) -> None:
        if max_items < 1 or max_wait_s < 0:
            raise ValueError(
                f"need max_items >= 1 and max_wait_s >= 0, got {max_items}, {max_wait_s}"
            )
        self.forward = forward
        self.max_items = max_items
        self.max_wait_s = max_wait_s
        self.batches: list[int] = []  # sizes of the forward passes run (kept bounded)
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._worker())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None

    async def submit(self, x: torch.Tensor, layer: int = 0) -> torch.Tensor:
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((x, layer, fut))
        return await fut

    async def _gather(self) -> list[tuple]:
        assert self._queue is not None
        items = [await self._queue.get()]
        count = len(items[0][0])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while count < self.max_items:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), left)
                except TimeoutError:
                    break
            items.append(item)
            count += len(item[0])
        return items

    async def _worker(self) -> None:
        while True:
            items = await self._gather()
            for layer in sorted({it[1] for it in items}):
                group = [it for it in items if it[1] == layer]
                try:
                    logits = self.forward(torch.cat([it[0] for it in group]), layer)
                except Exception as exc:  # answer every waiting request, keep the worker alive
                    for it in group:
                        if not it[2].done():
                            it[2].set_exception(exc)
                    continue
                self.batches.append(len(logits))
                del self.batches[:-1000]
                for it, out in zip(group, logits.split([len(it[0]) for it in group]), strict=True):
                    if not it[2].done():  # the client may have gone away
                        it[2].set_result(out)


class BodyLimit:
    """Pure ASGI middleware refusing bodies over ``max_bytes`` with 413, *before* they are buffered.

    A declared ``content-length`` over the limit is answered at once; a body sent without one (chunked)
    is counted as it arrives and refused when it passes the limit, so no client can make the server
    hold more than ``max_bytes`` of one request. (Starlette's ``@app.middleware("http")`` would do the
    first check only, and wraps every request in extra tasks and streams: a per-request cost of the
    same order as the cloud model's forward pass at batch 1, which micro-batching cannot share.)
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: object) -> JSONResponse:
        return JSONResponse(
            {"detail": f"request body of {size} bytes; at most {self.max_bytes} accepted"},
            status_code=413,
        )

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope["headers"]:
            if key == b"content-length":
                size = value.decode("latin-1")
                if not size.isdigit() or int(size) > self.max_bytes:
                    await self._too_large(size)(scope, receive, send)
                    return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(
                        413,
                        f"request body of more than {self.max_bytes} bytes; "
                        f"at most {self.max_bytes} accepted",
                    )
            return message

        await self.app(scope, limited_receive, send)


def create_app(
    model_path: str | os.PathLike,
    *,
    microbatch: bool = True,
    max_wait_ms: float = 2.0,
    max_items: int = 64,
    max_batch: int = 256,
    max_body_bytes: int = 2_000_000,
    replica: str = "cloud",
    delay_ms: float = 0.0,
) -> FastAPI:
    """The FastAPI app serving the checkpoint at ``model_path`` (safetensors + JSON, no pickle).

    ``delay_ms`` adds an asynchronous wait to every request (no CPU): it simulates a replica on a
    slower or farther host for the load-balancing experiments; 0 in normal use.
    """
    torch.set_num_threads(1)
    model, config = load_model(model_path)
    length = int(np.prod(config["input_shape"]))
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")

    @torch.inference_mode()
    def forward(x: torch.Tensor, layer: int) -> torch.Tensor:
        return cnn_tail(model, x, layer) if layer else model(x)

    batcher = MicroBatcher(forward, max_items=max_items, max_wait_s=max_wait_ms / 1000)
    state: dict[str, Any] = {"served": 0, "requests": 0}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if microbatch:
            batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="labsupport hybrid cloud", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        # the default handler echoes the offending input, which fails to encode for NaN/inf (-> 500)
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()[:10]
        ]
        return JSONResponse(
            {
                "detail": errors,
                "expected": f'{{"input": [{length} finite numbers]}} or '
                f'{{"inputs": [[{length} finite numbers], ...]}} (at most {max_batch} inputs)',
            },
            status_code=422,
        )

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    async def run(x: torch.Tensor, layer: int = 0) -> torch.Tensor:
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        state["requests"] += 1
        state["served"] += len(x)
        return await batcher.submit(x, layer) if microbatch else forward(x, layer)

    def answer(
        logits: torch.Tensor, request_id: str | None, started: float, *, one: bool = False
    ) -> JSONResponse:
        # A JSONResponse of plain floats and strings: no FastAPI response validation and
        # jsonable_encoder pass, work per request that micro-batching cannot share.
        out = {
            "request_id": request_id,
            "predictions": logits.argmax(1).tolist(),
            "logits": logits.tolist(),
            "replica": replica,
            "server_ms": (time.perf_counter() - started) * 1000,
        }
        if one:
            out["prediction"] = out["predictions"][0]
        return JSONResponse(out)

    def check_rows(rows: list[list[float]]) -> torch.Tensor:
        if not rows:
            raise HTTPException(422, "inputs is empty; expected at least one input")
        if len(rows) > max_batch:
            raise HTTPException(413, f"{len(rows)} inputs in one request; at most {max_batch}")
        bad = next((i for i, r in enumerate(rows) if len(r) != length), None)
        if bad is not None:
            raise HTTPException(
                422,
                f"input {bad} has {len(rows[bad])} values; expected {length} (shape (N, {length}))",
            )
        return torch.tensor(rows, dtype=torch.float32)

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "replica": replica,
            "pid": os.getpid(),
            "served": state["served"],
            "requests": state["requests"],
            "microbatch": microbatch,
            "input_length": length,
            "max_batch": max_batch,
            "arch": config.get("arch"),
            "mean_forward_batch": (
                sum(batcher.batches) / len(batcher.batches) if batcher.batches else None
            ),
        }

    # The JSON routes parse and validate the raw body in one pass of pydantic-core's JSON parser
    # (``model_validate_json``) instead of FastAPI's json.loads + dependency solving + validation:
    # the same model, the same 422 messages, less work per request. The schema stays documented.
    async def parse(request: Request, model: type[BaseModel]) -> Any:
        try:
            return model.model_validate_json(await request.body())
        except ValidationError as exc:
            errors = exc.errors(include_input=False)
            raise RequestValidationError(  # located in the body, as FastAPI's own errors are
                [{**e, "loc": ("body", *e["loc"])} for e in errors]
            ) from None

    def schema(model: type[BaseModel]) -> dict:
        content = {"application/json": {"schema": model.model_json_schema()}}
        return {"requestBody": {"required": True, "content": content}}

    @app.post("/v1/predict", openapi_extra=schema(PredictOne))
    async def predict(request: Request) -> JSONResponse:
        started = time.perf_counter()
        body = await parse(request, PredictOne)
        return answer(await run(check_rows([body.input])), body.request_id, started, one=True)

    @app.post("/v1/predict_batch", openapi_extra=schema(PredictBatch))
    async def predict_batch(request: Request) -> JSONResponse:
        started = time.perf_counter()
        body = await parse(request, PredictBatch)
        return answer(await run(check_rows(body.inputs)), body.request_id, started)

    @app.post("/v1/predict_binary")
    async def predict_binary(request: Request) -> JSONResponse:
        from safetensors import SafetensorError
        from safetensors.torch import load as st_load

        started = time.perf_counter()
        raw = await request.body()
        try:
            tensors = st_load(raw)
            meta = _safetensors_metadata(raw)
        except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
            raise HTTPException(400, f"body is not a readable safetensors file: {exc}") from exc
        if set(tensors) != {"x"}:
            raise HTTPException(422, f"expected one tensor named 'x', got {sorted(tensors)}")
        x = tensors["x"]
        try:
            layer = int(meta.get("layer", "0"))
            shape = (length,) if layer == 0 else feature_shape(model, layer, length)
        except (TypeError, ValueError) as exc:
            raise HTTPException(422, f"bad 'layer' metadata {meta.get('layer')!r}: {exc}") from exc
        if x.ndim != 1 + len(shape) or tuple(x.shape[1:]) != shape or len(x) == 0:
            raise HTTPException(
                422, f"x has shape {tuple(x.shape)}; expected (N, {', '.join(map(str, shape))})"
            )
        if len(x) > max_batch:
            raise HTTPException(413, f"{len(x)} inputs in one request; at most {max_batch}")
        if x.dtype == torch.int8:
            try:
                scale = float(meta["scale"])
            except (KeyError, ValueError) as exc:
                raise HTTPException(422, "int8 features need a float 'scale' in metadata") from exc
            if not (math.isfinite(scale) and scale > 0):
                raise HTTPException(422, f"scale must be a finite positive number, got {scale}")
            x = x.float() * scale
        elif x.dtype != torch.float32:
            raise HTTPException(422, f"x has dtype {x.dtype}; expected float32 or int8")
        if not torch.isfinite(x).all():
            raise HTTPException(422, "x contains NaN or inf")
        return answer(await run(x, layer), meta.get("request_id"), started)

    return app


def _safetensors_metadata(raw: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors byte string (its JSON header), without pickle."""
    import json
    import struct

    if len(raw) < 8:
        raise ValueError("shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise ValueError("header length exceeds the body")
    header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("__metadata__ is not an object")
    return {str(k): str(v) for k, v in meta.items()}


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in {"1", "true", "yes", "on"}


def app_from_env() -> FastAPI:
    """The app configured from ``HYBRID_*`` environment variables (for ``uvicorn --factory``)."""
    path = os.environ.get("HYBRID_MODEL")
    if not path:
        raise RuntimeError("set HYBRID_MODEL to the cloud checkpoint (.safetensors + .json)")
    return create_app(
        path,
        microbatch=_env_flag("HYBRID_MICROBATCH", True),
        max_wait_ms=float(os.environ.get("HYBRID_MAX_WAIT_MS", "2")),
        max_items=int(os.environ.get("HYBRID_MAX_ITEMS", "64")),
        max_batch=int(os.environ.get("HYBRID_MAX_BATCH", "256")),
        replica=os.environ.get("HYBRID_REPLICA", "cloud"),
        delay_ms=float(os.environ.get("HYBRID_DELAY_MS", "0")),
    )
