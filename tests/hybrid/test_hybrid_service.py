"""The cloud service in-process (FastAPI's TestClient): validation, micro-batching, binary wire."""

from __future__ import annotations

import asyncio

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as st_save

from labsupport.hybrid.client import encode_binary
from labsupport.hybrid.service import MicroBatcher, create_app
from labsupport.models import build_model, save_model

CNN4 = {
    "model_name": "cnn",
    "input_shape": (40,),
    "num_classes": 10,
    "model_kwargs": {"channels": 4},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = build_model("cnn", seed=0, channels=4).eval()
    path = save_model(model, tmp_path_factory.mktemp("svc") / "tiny", **CNN4)[0]
    return model, path


@pytest.fixture(scope="module")
def client(tiny):
    app = create_app(tiny[1], max_batch=8, max_body_bytes=50_000, microbatch=True)
    with TestClient(app) as c:  # runs the lifespan: the micro-batcher's worker
        yield c


def _healthy(client) -> None:
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_single_and_batch_answers_match_the_model(client, tiny):
    model, _ = tiny
    x = torch.randn(3, 40)
    with torch.no_grad():
        ref = model(x)
    one = client.post("/v1/predict", json={"input": x[0].tolist(), "request_id": "r1"}).json()
    assert one["request_id"] == "r1" and one["prediction"] == int(ref[0].argmax())
    batch = client.post("/v1/predict_batch", json={"inputs": x.tolist()}).json()
    assert batch["predictions"] == ref.argmax(1).tolist()
    assert torch.allclose(torch.tensor(batch["logits"]), ref, atol=1e-5)


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/v1/predict", {"input": [0.0] * 39}, 422, "expected 40"),
        ("/v1/predict_batch", {"inputs": [[0.0] * 40, [0.0] * 41]}, 422, "input 1 has 41"),
        ("/v1/predict_batch", {"inputs": []}, 422, "empty"),
        ("/v1/predict", {"input": ["0.5"] * 40}, 422, "valid number"),  # strings are not coerced
        ("/v1/predict", {"input": [True] * 40}, 422, "valid number"),
        ("/v1/predict", {"input": [[0.0] * 40]}, 422, "valid number"),  # a batch sent as one
        ("/v1/predict", {"inputs": [[0.0] * 40]}, 422, "Field required"),  # wrong endpoint
        ("/v1/predict", {"input": [0.0] * 40, "extra": 1}, 422, "Extra inputs"),
        ("/v1/predict", {"input": [0.0] * 40, "request_id": "x" * 500}, 422, "at most 128"),
        ("/v1/predict_batch", {"inputs": [[0.0] * 40] * 9}, 413, "at most 8"),
    ],
)
def test_bad_requests_get_4xx_with_a_message_and_the_server_stays_up(
    client, path, body, status, says
):
    r = client.post(path, json=body)
    assert r.status_code == status
    assert says in r.text
    _healthy(client)


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b"{not json", 422),
        (b'{"input": [NaN' + b", 0.0" * 39 + b"]}", 422),  # Python's json reads NaN: refused
        (b'{"input": [1e999' + b", 0.0" * 39 + b"]}", 422),  # inf
        (b"[" * 100_000, 413),  # over max_body_bytes
    ],
)
def test_malformed_or_non_finite_bodies_are_refused(client, content, status):
    r = client.post("/v1/predict", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status
    _healthy(client)


@pytest.mark.parametrize("path", ["/v1/predict", "/v1/predict_binary"])
def test_a_body_without_content_length_is_cut_off_at_the_limit(client, path):
    # chunked transfer declares no size: the attack the content-length check alone lets through
    def chunks():
        for _ in range(100):  # 100 x 1 kB = twice the 50 kB limit
            yield b"[" * 1000

    r = client.post(path, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "at most 50000" in r.text
    assert "content-length" not in {k.lower() for k in r.request.headers}
    _healthy(client)


def test_binary_wire_raw_and_split_features(client, tiny):
    model, _ = tiny
    x = torch.randn(5, 40)
    with torch.no_grad():
        ref = model(x).argmax(1).tolist()
    r = client.post("/v1/predict_binary", content=encode_binary(x, request_id="b1"))
    assert r.status_code == 200 and r.json()["predictions"] == ref
    assert r.json()["request_id"] == "b1"
    from labsupport.hybrid.models import cnn_head

    feats = cnn_head(model, x, 2)
    r = client.post("/v1/predict_binary", content=encode_binary(feats, layer=2))
    assert r.json()["predictions"] == ref  # split inference gives the full model's answer


@pytest.mark.parametrize(
    ("content", "status", "says"),
    [
        (b"garbage!" * 4, 400, "safetensors"),
        (b"", 400, "safetensors"),
        (encode_binary(torch.randn(2, 39)), 422, "expected (N, 40)"),
        (st_save({"x": torch.randn(2, 40).double()}), 422, "dtype"),
        (st_save({"x": torch.randn(2, 40), "y": torch.zeros(1)}), 422, "one tensor"),
        (st_save({"x": torch.ones(2, 40, dtype=torch.int8)}), 422, "scale"),
        (encode_binary(torch.randn(2, 40), layer=7), 422, "layer"),
        (encode_binary(torch.full((2, 40), float("nan"))), 422, "NaN"),
        (encode_binary(torch.randn(9, 40)), 413, "at most 8"),
    ],
)
def test_bad_binary_bodies_are_refused(client, content, status, says):
    r = client.post("/v1/predict_binary", content=content)
    assert r.status_code == status and says in r.text
    _healthy(client)


def test_microbatcher_runs_one_forward_for_concurrent_requests():
    calls: list[int] = []

    def forward(x: torch.Tensor, layer: int) -> torch.Tensor:
        calls.append(len(x))
        return x * 2 + layer

    async def main():
        mb = MicroBatcher(forward, max_items=64, max_wait_s=0.05)
        mb.start()
        xs = [torch.full((n, 3), float(i)) for i, n in enumerate([1, 2, 3, 1])]
        outs = await asyncio.gather(*(mb.submit(x) for x in xs))
        await mb.stop()
        return xs, outs

    xs, outs = asyncio.run(main())
    assert calls == [7]  # one forward pass for all four requests
    for x, out in zip(xs, outs, strict=True):
        assert torch.equal(out, x * 2)  # each request gets its own rows back


def test_microbatcher_respects_max_items_and_survives_errors():
    calls: list[int] = []

    def forward(x: torch.Tensor, layer: int) -> torch.Tensor:
        calls.append(len(x))
        if (x < 0).any():
            raise ValueError("negative input")
        return x

    async def main():
        mb = MicroBatcher(forward, max_items=2, max_wait_s=0.05)
        mb.start()
        ok = await asyncio.gather(*(mb.submit(torch.ones(1, 1)) for _ in range(5)))
        with pytest.raises(ValueError, match="negative"):
            await mb.submit(-torch.ones(1, 1))
        again = await mb.submit(torch.ones(1, 1))  # the worker is still alive
        await mb.stop()
        return ok, again

    ok, again = asyncio.run(main())
    assert len(ok) == 5 and max(calls) <= 2 and torch.equal(again, torch.ones(1, 1))


def test_microbatching_off_gives_the_same_answers(tiny):
    model, path = tiny
    x = torch.randn(4, 40)
    with TestClient(create_app(path, microbatch=False)) as c:
        r = c.post("/v1/predict_batch", json={"inputs": x.tolist()})
    with torch.no_grad():
        assert r.json()["predictions"] == model(x).argmax(1).tolist()


def test_validation_errors_point_into_the_body_and_the_schema_stays_documented(client):
    r = client.post("/v1/predict", json={"input": [0.0] * 39 + ["x"]})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "input", 39]
    spec = client.get("/openapi.json").json()["paths"]
    for path, model in (("/v1/predict", "input"), ("/v1/predict_batch", "inputs")):
        body = spec[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert model in body["properties"] and body["additionalProperties"] is False
