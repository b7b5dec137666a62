"""Capstone 2's checks pass the solutions and name each plausible mistake."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime.quantization as ortq
import pytest
import torch
from torch.nn import functional as F

from labsupport.checks import (
    CheckFailed,
    check_deployment_report,
    check_distill,
    check_export_int8,
)


@pytest.fixture(scope="module")
def sol(solutions):
    return solutions("capstone_iot")


@pytest.mark.slow  # two ONNX exports (about 3 s each)
def test_solutions_pass_every_capstone_check(sol, capsys):
    check_distill(sol["distill"], seed=0)
    check_export_int8(sol["export_int8"], seed=0)
    check_deployment_report(sol["deployment_report"], seed=0)
    assert capsys.readouterr().out.count("passed") == 3


# ------------------------------------------------------------------ step 1: distillation
def _distill(
    student,
    teacher,
    x,
    y,
    *,
    steps,
    temperature,
    alpha,
    batch_size,
    lr,
    seed,
    scale=True,
    eval_teacher=True,
    swap=False,
    grad_teacher=False,
):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    if eval_teacher:
        teacher.eval()
    torch.manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        if grad_teacher:
            t = teacher(x[idx])
        else:
            with torch.no_grad():
                t = teacher(x[idx])
        s = student(x[idx])
        kd = F.kl_div(
            F.log_softmax(s / temperature, 1), F.softmax(t / temperature, 1), reduction="batchmean"
        )
        kd = kd * temperature**2 if scale else kd
        a = 1 - alpha if swap else alpha
        loss = a * kd + (1 - a) * F.cross_entropy(s, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    student.eval()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scale": False}, "T\\^2"),
        ({"eval_teacher": False}, "train mode"),
        ({"swap": True}, "wrong term"),
        ({"grad_teacher": True}, "gradients reached the teacher"),
    ],
)
def test_distill_check_names_the_mistake(options, message):
    with pytest.raises(CheckFailed, match=message):
        check_distill(lambda *a, **kw: _distill(*a, **kw, **options), seed=1)


def test_distill_check_refuses_other_batches():
    def shuffled(student, teacher, x, y, *, seed, **kw):
        _distill(student, teacher, x, y, seed=seed + 1, **kw)

    with pytest.raises(CheckFailed, match="differs from the reference"):
        check_distill(shuffled, seed=1)


# ------------------------------------------------------------------ step 2: export
def _export(model, x_calib, folder, *, dynamic=True, quantize="static"):
    folder = Path(folder)
    fp32, int8 = folder / "m.onnx", folder / "m.int8.onnx"
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    torch.onnx.export(
        model.eval(), (x_calib[:2],), fp32, dynamo=True, dynamic_shapes=shapes, verbose=False
    )
    logging.disable(logging.WARNING)
    try:
        if quantize == "dynamic":
            ortq.quantize_dynamic(fp32, int8, weight_type=ortq.QuantType.QInt8)
        elif quantize == "none":  # a copy of the fp32 graph, weights inlined
            import onnx

            onnx.save_model(onnx.load(fp32), int8)
        else:
            name = "x"
            items = [
                {name: b.numpy().astype(np.float32)} for b in x_calib.split(50 if dynamic else 2)
            ]

            class Reader(ortq.CalibrationDataReader):
                def __init__(self):
                    self.it = iter(items)

                def get_next(self):
                    return next(self.it, None)

            ortq.quantize_static(fp32, int8, Reader(), quant_format=ortq.QuantFormat.QDQ)
    finally:
        logging.disable(logging.NOTSET)
    return {"fp32": fp32, "int8": int8}


@pytest.mark.slow  # an ONNX export each (about 3 s)
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"quantize": "dynamic"}, "dynamic quantization|no QuantizeLinear"),
        ({"quantize": "none"}, "no QuantizeLinear"),
        ({"dynamic": False}, "dynamic batch"),
    ],
)
def test_export_check_names_the_mistake(options, message):
    with pytest.raises(CheckFailed, match=message):
        check_export_int8(lambda m, x, f: _export(m, x, f, **options), seed=2)


# ------------------------------------------------------------------ step 3: report
def _report(records, labels, *, skip_degraded=False, seconds=False, mean_p99=False):
    ms = np.array([r[0] for r in records]) * (1.0 if seconds else 1e3)
    keep = [i for i, r in enumerate(records) if not (skip_degraded and r[3])]
    preds = torch.tensor([records[i][1] for i in keep])
    n = len(records)
    return {
        "accuracy": float((preds == labels[keep]).double().mean()),
        "cloud": sum(r[2] == "cloud" for r in records) / n,
        "degraded": sum(r[3] for r in records) / n,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(ms.mean()) if mean_p99 else float(np.percentile(ms, 99)),
    }


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"skip_degraded": True}, "left out the degraded"),
        ({"seconds": True}, "milliseconds"),
        ({"mean_p99": True}, "mean latency"),
    ],
)
def test_report_check_names_the_mistake(options, message):
    with pytest.raises(CheckFailed, match=message):
        check_deployment_report(lambda r, y: _report(r, y, **options), seed=3)


def test_report_check_refuses_degraded_counted_as_cloud():
    def degraded_as_cloud(records, labels):
        out = _report(records, labels)
        return {**out, "cloud": sum(r[2] == "cloud" or r[3] for r in records) / len(records)}

    with pytest.raises(CheckFailed, match="cloud is"):
        check_deployment_report(degraded_as_cloud, seed=3)
