"""Checks for exercise 3, quantize, export and measure on the local CPU (``06_exercises_edge``).

The local CPU plays the device: one thread, ONNX Runtime's CPU provider. What is checked is what
chapter 04's measurements get wrong when done by hand:

* **size** -- ``torch.onnx.export`` (the dynamo exporter, torch >= 2.9) writes the weights to a
  separate ``<name>.onnx.data`` file; a model's size is the ``.onnx`` file *plus* every external data
  file its tensors point to (``onnx.external_data_helper``), and nothing else in the folder;
* **provider** -- asking ONNX Runtime for a provider it does not have only *warns* and runs on the CPU
  (:func:`onnxruntime.get_available_providers`, ``InferenceSession.get_providers``): a session must
  be refused, not silently moved;
* **latency** -- per-call percentiles (p50, p90, p99, in milliseconds) after warm-up calls that are
  not timed: the first calls of a fresh session allocate and are slow;
* **accuracy** -- of the *deployed* model's outputs, on the *test* split, with its argmax agreement
  against the PyTorch model in ``eval()`` mode;
* **calibration** -- a ``CalibrationDataReader`` for ``onnxruntime.quantization.quantize_static`` that
  yields ``{input name: float32 array}`` batches, ends with ``None`` and can rewind.

The fakes here (a clock that advances by a known duration per call, a session with known outputs)
make the latency and accuracy checks exact and independent of the machine's load.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from ._core import CheckFailed, call, ensure, passed, rng

__all__ = [
    "check_calibration_reader",
    "check_evaluate_deployment",
    "check_latency_ms",
    "check_make_session",
    "check_model_size",
]

#: ONNX Runtime providers a CPU-only wheel does not have; the check uses the first one missing.
_OTHER_PROVIDERS = (
    "CUDAExecutionProvider",
    "TensorrtExecutionProvider",
    "CoreMLExecutionProvider",
    "ROCMExecutionProvider",
    "DmlExecutionProvider",
)


def tiny_onnx(folder: Path, name: str, *, external: str | None, width: int = 64) -> Path:
    """A ``MatMul`` + ``Add`` ONNX model with float32 weights, saved with its weights in
    ``external`` (a file name next to it) or inside the ``.onnx`` file (``external=None``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    gen = np.random.default_rng(0)
    w = numpy_helper.from_array(gen.standard_normal((width, 10)).astype(np.float32), "w")
    b = numpy_helper.from_array(gen.standard_normal(10).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = Path(folder) / name
    if external is None:
        onnx.save_model(model, path)
    else:
        onnx.save_model(
            model,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=external,
            size_threshold=0,
        )
    return path


def check_model_size(model_size_bytes: Callable) -> None:
    """Step 1: ``model_size_bytes(path)`` -> bytes of the ``.onnx`` file plus its external data."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "notes.txt").write_bytes(b"x" * 50_000)  # not part of any model
        inline = tiny_onnx(folder, "inline.onnx", external=None)
        got = call(model_size_bytes, inline, what="a model without external data")
        ensure(
            isinstance(got, (int, np.integer)) and not isinstance(got, bool),
            f"model_size_bytes returned a {type(got).__name__}; expected a number of bytes (int)",
        )
        ensure(
            got == inline.stat().st_size,
            f"a model with its weights inside the .onnx file has {inline.stat().st_size} bytes; "
            f"you returned {got} (count only the model's own files, not the folder)",
        )
        for name, external in (("torch.onnx", "torch.onnx.data"), ("other.onnx", "weights.bin")):
            path = tiny_onnx(folder, name, external=external, width=256)
            data = folder / external
            want = path.stat().st_size + data.stat().st_size
            got = call(model_size_bytes, path, what=f"a model whose weights are in {external}")
            if got == want:
                continue
            if got == path.stat().st_size:
                raise CheckFailed(
                    f"you counted {path.name} ({got} bytes) without its external data file "
                    f"{external} ({data.stat().st_size} bytes): torch.onnx.export writes the weights "
                    "there. Read the locations from the model (onnx.external_data_helper)"
                )
            raise CheckFailed(
                f"{path.name} with weights in {external}: {got} bytes, expected {want} (the .onnx "
                "file plus the external data files its tensors point to, nothing else)"
            )
    passed("model_size_bytes", "the .onnx file plus its external data, whatever the file is called")


def check_make_session(make_session: Callable) -> None:
    """Step 2: ``make_session(path, provider, threads)`` -> an ``InferenceSession`` that runs on
    ``provider`` with ``threads`` intra-op threads, or ``RuntimeError`` when that provider is not
    available (never a silent fallback to another)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    missing = next((p for p in _OTHER_PROVIDERS if p not in available), None)
    with tempfile.TemporaryDirectory() as tmp:
        path = tiny_onnx(Path(tmp), "m.onnx", external="m.onnx.data")
        session = call(make_session, path, "CPUExecutionProvider", 1, what="the CPU provider")
        ensure(
            isinstance(session, ort.InferenceSession),
            f"make_session returned a {type(session).__name__}; expected an InferenceSession",
        )
        ensure(
            session.get_providers()[0] == "CPUExecutionProvider",
            f"asked for the CPU provider, the session runs on {session.get_providers()}",
        )
        threads = session.get_session_options().intra_op_num_threads
        ensure(
            threads == 1,
            f"the device has one thread: set SessionOptions.intra_op_num_threads = threads "
            f"(the session has {threads})",
        )
        out = session.run(None, {"x": np.ones((2, 64), np.float32)})[0]
        ensure(out.shape == (2, 10), "the session does not run the model")
        if missing is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                try:
                    fallback = make_session(path, missing, 1)
                except NotImplementedError:
                    raise
                except (RuntimeError, ValueError):
                    fallback = None
                except Exception as exc:
                    raise CheckFailed(
                        f"asking for {missing} raised {type(exc).__name__}; raise RuntimeError "
                        "that names the provider and the available ones"
                    ) from exc
            ensure(
                fallback is None,
                f"asked for {missing}, which this ONNX Runtime does not have; your session runs on "
                f"{fallback.get_providers() if fallback is not None else ''} instead -- a silent "
                "fallback. Check onnxruntime.get_available_providers() (and the session's "
                "get_providers()) and raise RuntimeError",
            )
    passed("make_session", f"one thread, the provider asked for, {missing or 'no other'} refused")


class _FakeClock:
    """A clock that a fake ``run`` advances by a known duration per call (seconds)."""

    def __init__(self, durations: list[float]) -> None:
        self.now, self.durations, self.calls = 100.0, durations, 0

    def __call__(self) -> float:
        return self.now

    def run(self, *args, **kwargs) -> None:
        self.now += self.durations[min(self.calls, len(self.durations) - 1)]
        self.calls += 1


def check_latency_ms(latency_ms: Callable, *, seed: int | None = None) -> None:
    """Step 3: ``latency_ms(run, *, warmup, repeats, clock=time.perf_counter)`` -> ``{"p50", "p90",
    "p99"}`` in milliseconds over ``repeats`` timed calls of ``run()`` after ``warmup`` untimed ones."""
    gen = rng(seed)
    warmup, repeats = 5, 200
    cold = [0.080, 0.040, 0.020, 0.010, 0.005]  # a fresh session's first calls
    warm = (1e-3 + 2e-3 * torch.rand(repeats, generator=gen, dtype=torch.float64)).tolist()
    clock = _FakeClock(cold + warm)
    got = call(latency_ms, clock.run, warmup=warmup, repeats=repeats, clock=clock, what="a run")
    ensure(
        isinstance(got, dict) and {"p50", "p90", "p99"} <= set(got),
        f"latency_ms returned {type(got).__name__}; expected a dict with keys p50, p90, p99",
    )
    ensure(
        clock.calls == warmup + repeats,
        f"run() was called {clock.calls} times; expected warmup + repeats = {warmup + repeats}",
    )
    want = {f"p{q}": float(np.percentile(np.array(warm) * 1e3, q)) for q in (50, 90, 99)}
    values = {k: float(got[k]) for k in want}
    if all(abs(values[k] - want[k]) <= 0.02 * want[k] for k in want):
        passed(
            "latency_ms",
            f"warm-up untimed, per-call percentiles in ms (p99 {values['p99']:.2f} ms)",
        )
        return
    with_cold = np.array((cold + warm)[:repeats]) * 1e3
    if abs(values["p99"] - float(np.percentile(with_cold, 99))) <= 0.05 * values["p99"]:
        raise CheckFailed(
            f"p99 = {values['p99']:.1f} ms: the timed calls include the cold first ones (no "
            "warm-up). Call run() `warmup` times untimed, then time `repeats` calls"
        )
    if abs(values["p50"] * 1e3 - want["p50"]) <= 0.02 * want["p50"]:
        raise CheckFailed("the percentiles are in seconds; report milliseconds")
    if len({round(v, 9) for v in values.values()}) == 1:
        raise CheckFailed(
            "p50 = p90 = p99: you timed the whole loop and divided. Time every call on its own and "
            "take percentiles (np.percentile) of those times"
        )
    raise CheckFailed(
        "percentiles differ from those of the timed calls: "
        + ", ".join(f"{k} {values[k]:.3f} vs {want[k]:.3f} ms" for k in want)
    )


class _FakeSession:
    """An ONNX Runtime-like session with known outputs (a few rows differ from the PyTorch model)."""

    def __init__(self, model: nn.Module, flip: set[int], x_test: torch.Tensor) -> None:
        self.model, self.flip, self.x_test = copy.deepcopy(model).eval(), flip, x_test

    def get_inputs(self):
        return [SimpleNamespace(name="input", shape=["batch", 6], type="tensor(float)")]

    def get_providers(self):
        return ["CPUExecutionProvider"]

    def run(self, output_names, feeds):
        ensure(set(feeds) == {"input"}, f"feed the session by its input name 'input', got {feeds}")
        x = feeds["input"]
        ensure(isinstance(x, np.ndarray), "feed ONNX Runtime numpy arrays, not tensors")
        ensure(x.dtype == np.float32, f"the model takes float32 inputs, got {x.dtype}")
        with torch.no_grad():
            logits = self.model(torch.from_numpy(x)).numpy().copy()
        for i in range(len(x)):
            row = x[i]
            hits = np.where(np.all(np.isclose(self.x_test.numpy(), row), axis=1))[0]
            if len(hits) and int(hits[0]) in self.flip:  # a quantization error on this input
                logits[i] = np.roll(logits[i], 1)
        return [logits]


def check_evaluate_deployment(evaluate_deployment: Callable, *, seed: int | None = None) -> None:
    """Step 4: ``evaluate_deployment(session, model, data)`` -> ``{"accuracy", "agreement"}``: the
    deployed model's accuracy on ``data.x_test``/``y_test`` and the fraction of test inputs on which
    its argmax equals the PyTorch model's (in ``eval()`` mode)."""
    gen = rng(seed)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4))
    x_train = torch.randn(80, 6, generator=gen)
    x_test = torch.randn(50, 6, generator=gen)
    model.eval()
    with torch.no_grad():
        y_train = model(x_train).argmax(1)  # the model is perfect on its training set
        torch_test = model(x_test).argmax(1)
    y_test = torch_test.clone()
    wrong = torch.randperm(50, generator=gen)[:15]
    y_test[wrong] = (y_test[wrong] + 1) % 4  # 70% right on the test set
    flip = set(torch.randperm(50, generator=gen)[:10].tolist())
    session = _FakeSession(model, flip, x_test)
    data = SimpleNamespace(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    model.train()  # as a training loop leaves it
    got = call(evaluate_deployment, session, model, data, what="a deployed model")
    ensure(
        isinstance(got, dict) and {"accuracy", "agreement"} <= set(got),
        f"evaluate_deployment returned {type(got).__name__}; expected a dict with accuracy and "
        "agreement",
    )
    with torch.no_grad():
        deployed = session.run(None, {"input": x_test.numpy()})[0].argmax(1)
    accuracy = float((deployed == y_test.numpy()).mean())
    agreement = float((deployed == torch_test.numpy()).mean())
    acc, agr = float(got["accuracy"]), float(got["agreement"])
    if abs(acc - accuracy) > 1e-9:
        if abs(acc - 1.0) < 0.05:
            raise CheckFailed(
                f"accuracy {acc:.3f}: that is the training set (the model has seen it); report "
                f"the test split's ({accuracy:.3f})"
            )
        if abs(acc - float((torch_test == y_test).double().mean())) < 1e-9:
            raise CheckFailed(
                "that is the PyTorch model's accuracy; the deployed one is the ONNX Runtime "
                "session's (its outputs differ on some inputs)"
            )
        raise CheckFailed(
            f"accuracy {acc:.3f}; the deployed model's test accuracy is {accuracy:.3f}"
        )
    if abs(agr - agreement) > 1e-9:
        if abs(agr - accuracy) < 1e-9:
            raise CheckFailed(
                "agreement compares the deployed model's argmax with PyTorch's, not with the labels"
            )
        raise CheckFailed(
            f"agreement {agr:.3f}, expected {agreement:.3f}: compare with the PyTorch model in "
            "eval() mode (dropout off) under torch.no_grad()"
        )
    passed("evaluate_deployment", f"test accuracy {accuracy:.2f}, agreement {agreement:.2f}")


def check_calibration_reader(make_reader: Callable, *, seed: int | None = None) -> None:
    """Step 5: ``make_reader(x_calib, input_name, batch_size)`` -> a
    ``onnxruntime.quantization.CalibrationDataReader`` over ``x_calib`` (a float tensor)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    gen = rng(seed)
    x = torch.randn(45, 64, generator=gen)
    reader = call(make_reader, x, "x", 10, what="45 examples in batches of 10")
    ensure(
        isinstance(reader, CalibrationDataReader),
        f"expected an onnxruntime.quantization.CalibrationDataReader, got {type(reader).__name__}",
    )

    def drain(
        what: str, empty: str = "get_next returned None at once: no calibration data"
    ) -> np.ndarray:
        batches = []
        for _ in range(100):
            item = call(reader.get_next, what=what)
            if item is None:
                break
            ensure(
                isinstance(item, dict) and set(item) == {"x"},
                f"get_next must return {{input name: batch}}, got {type(item).__name__} "
                f"{list(item) if isinstance(item, dict) else ''}",
            )
            batch = item["x"]
            ensure(
                isinstance(batch, np.ndarray),
                f"a batch is a {type(batch).__name__}; ONNX Runtime needs numpy arrays",
            )
            ensure(batch.dtype == np.float32, f"a batch has dtype {batch.dtype}; expected float32")
            ensure(
                batch.ndim == 2 and batch.shape[1] == 64 and 1 <= len(batch) <= 10,
                f"a batch has shape {batch.shape}; expected up to 10 rows of 64 features",
            )
            batches.append(batch)
        else:
            raise CheckFailed("get_next never returned None: the calibration loop would not end")
        ensure(batches, empty)
        return np.concatenate(batches)

    seen = drain("the first pass")
    ensure(
        len(seen) == len(x) and np.allclose(np.sort(seen, axis=0), np.sort(x.numpy(), axis=0)),
        f"the reader yielded {len(seen)} rows; expected every one of the {len(x)} calibration "
        "examples once",
    )
    ensure(reader.get_next() is None, "after the end, get_next must keep returning None")
    call(reader.rewind, what="rewind")
    again = drain("after rewind", "after rewind() the reader must start over; it gave nothing")
    ensure(len(again) == len(x), "after rewind() the reader must start over")
    call(reader.rewind, what="rewind")
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = tiny_onnx(Path(tmp), "fp32.onnx", external=None)
        logging.disable(
            logging.WARNING
        )  # ORT's "consider pre-processing" notice on the root logger
        try:
            quantize_static(
                str(fp32), str(Path(tmp) / "int8.onnx"), reader, quant_format=QuantFormat.QDQ
            )
        finally:
            logging.disable(logging.NOTSET)
    passed(
        "CalibrationDataReader", "float32 batches, ends with None, rewinds, quantize_static runs"
    )
