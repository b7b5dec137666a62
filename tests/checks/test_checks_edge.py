"""The edge exercise's checks pass the solutions and name each plausible mistake."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnxruntime.quantization import CalibrationDataReader

from labsupport.checks import (
    CheckFailed,
    check_calibration_reader,
    check_evaluate_deployment,
    check_latency_ms,
    check_make_session,
    check_model_size,
)


@pytest.fixture(scope="module")
def sol(solutions):
    return solutions("edge")


def test_solutions_pass_every_edge_check(sol, capsys):
    check_model_size(sol["model_size_bytes"])
    check_make_session(sol["make_session"])
    check_latency_ms(sol["latency_ms"], seed=0)
    check_evaluate_deployment(sol["evaluate_deployment"], seed=0)
    check_calibration_reader(sol["CalibrationReader"], seed=0)
    assert capsys.readouterr().out.count("passed") == 5


# ------------------------------------------------------------------ step 1: size
def onnx_file_only(path):
    return Path(path).stat().st_size


def guessed_data_name(path):
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def whole_folder(path):
    return sum(p.stat().st_size for p in Path(path).parent.iterdir())


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (onnx_file_only, "without its external data"),
        (guessed_data_name, "weights.bin"),
        (whole_folder, "not the folder"),
    ],
)
def test_size_check_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_model_size(wrong)


# ------------------------------------------------------------------ step 2: provider
def by_name_only(path, provider, threads=1):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=[provider])


def default_threads(path, provider, threads=1):
    if provider not in ort.get_available_providers():
        raise RuntimeError(provider)
    return ort.InferenceSession(str(path), providers=[provider])


def wrong_error(path, provider, threads=1):
    if provider not in ort.get_available_providers():
        raise KeyError(provider)
    return by_name_only(path, provider, threads)


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers()
    and "TensorrtExecutionProvider" in ort.get_available_providers(),
    reason="every provider the check tries is available",
)
@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (by_name_only, "silent fallback"),
        (default_threads, "one thread"),
        (wrong_error, "raise RuntimeError"),
    ],
)
def test_session_check_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_make_session(wrong)


# ------------------------------------------------------------------ step 3: latency
def _percentiles(times):
    ms = np.asarray(times) * 1e3
    return {f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 99)}


def no_warmup(run, *, warmup, repeats, clock=time.perf_counter):
    times = []
    for _ in range(warmup + repeats):
        start = clock()
        run()
        times.append(clock() - start)
    return _percentiles(times[:repeats])


def loop_average(run, *, warmup, repeats, clock=time.perf_counter):
    for _ in range(warmup):
        run()
    start = clock()
    for _ in range(repeats):
        run()
    mean = (clock() - start) / repeats * 1e3
    return {"p50": mean, "p90": mean, "p99": mean}


def in_seconds(run, *, warmup, repeats, clock=time.perf_counter):
    out = _warm(run, warmup, repeats, clock)
    return {k: v / 1e3 for k, v in out.items()}


def _warm(run, warmup, repeats, clock):
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = clock()
        run()
        times.append(clock() - start)
    return _percentiles(times)


def warmup_skipped(run, *, warmup, repeats, clock=time.perf_counter):
    return _warm(run, 0, repeats, clock)


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (no_warmup, "no warm-up"),
        (loop_average, "whole loop"),
        (in_seconds, "seconds"),
        (warmup_skipped, "warmup \\+ repeats"),
    ],
)
def test_latency_check_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_latency_ms(wrong, seed=1)


# ------------------------------------------------------------------ step 4: accuracy
def _deployed(session, x):
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0].argmax(1)


def on_training_set(session, model, data):
    deployed = _deployed(session, data.x_train)
    model.eval()
    with torch.no_grad():
        ref = model(data.x_train).argmax(1).numpy()
    return {
        "accuracy": float((deployed == data.y_train.numpy()).mean()),
        "agreement": float((deployed == ref).mean()),
    }


def pytorch_accuracy(session, model, data):
    model.eval()
    with torch.no_grad():
        ref = model(data.x_test).argmax(1).numpy()
    deployed = _deployed(session, data.x_test)
    return {
        "accuracy": float((ref == data.y_test.numpy()).mean()),
        "agreement": float((deployed == ref).mean()),
    }


def no_eval(session, model, data):
    deployed = _deployed(session, data.x_test)
    with torch.no_grad():
        ref = model(data.x_test).argmax(1).numpy()  # dropout still on
    return {
        "accuracy": float((deployed == data.y_test.numpy()).mean()),
        "agreement": float((deployed == ref).mean()),
    }


def agreement_with_labels(session, model, data):
    deployed = _deployed(session, data.x_test)
    acc = float((deployed == data.y_test.numpy()).mean())
    return {"accuracy": acc, "agreement": acc}


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (on_training_set, "training set"),
        (pytorch_accuracy, "PyTorch model's accuracy"),
        (no_eval, "eval\\(\\)"),
        (agreement_with_labels, "not with the labels"),
    ],
)
def test_deployment_check_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_evaluate_deployment(wrong, seed=2)


# ------------------------------------------------------------------ step 5: calibration
class _Reader(CalibrationDataReader):
    def __init__(self, x, name, batch_size=64, *, as_tensor=False, endless=False, dtype=np.float32):
        self.x, self.name, self.bs = x, name, batch_size
        self.as_tensor, self.endless, self.dtype = as_tensor, endless, dtype
        self.pos = 0

    def get_next(self):
        if self.pos >= len(self.x):
            if not self.endless:
                return None
            self.pos = 0
        batch = self.x[self.pos : self.pos + self.bs]
        self.pos += self.bs
        return {self.name: batch if self.as_tensor else batch.numpy().astype(self.dtype)}

    def rewind(self):
        self.pos = 0


class _NoRewind(_Reader):
    def rewind(self):
        pass


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"as_tensor": True}, "numpy arrays"),
        ({"endless": True}, "never returned None"),
        ({"dtype": np.float64}, "float32"),
    ],
)
def test_calibration_check_names_the_mistake(options, message):
    with pytest.raises(CheckFailed, match=message):
        check_calibration_reader(lambda x, n, b: _Reader(x, n, b, **options), seed=3)


def test_calibration_check_needs_rewind():
    with pytest.raises(CheckFailed, match="start over"):
        check_calibration_reader(_NoRewind, seed=3)
