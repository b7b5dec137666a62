"""Checks for chapter 06's two capstones: hospitals (cross-silo FL) and an IoT edge device.

Capstone 1 (``06_exercises_capstone_healthcare``), cross-silo FL for hospitals:

Four hospitals train one model on scikit-learn's breast-cancer data, each holding a different slice
(feature and label skew). The pieces a student combines, each checked here against the course's own:

* **user-level DP + secure aggregation** in one update pipeline (McMahan et al., ICLR 2018, DP-FedAvg;
  Bonawitz et al., CCS 2017): every hospital's update clipped to norm ``S``
  (:class:`~labsupport.privacy.dpfedavg.ClipUpdate`), the masked sum decoded by the server
  (:class:`~labsupport.privacy.secagg.SecAggTransform`, last in the pipeline: the server sees only
  the sum), Gaussian noise ``σ S / m`` on the average with ``m`` the *expected* hospitals per round
  (:class:`~labsupport.privacy.dpfedavg.ServerGaussianNoise`), each round charged to a
  :class:`~labsupport.privacy.accounting.PrivacyLedger` at ``q = m / K`` *before* its model is
  released;
* **FedProx** clients (Li et al., MLSys 2020; :func:`labsupport.fl.fedprox.fedprox_hooks`): the
  proximal term ``(mu / 2) ||w - w^t||^2`` in each hospital's local objective;
* the **privacy audit**: the user-level ε of the run (q = m/K, one step per round) from a real
  accountant, and the AUC of the loss-threshold membership-inference attack (Yeom et al. 2018;
  :func:`labsupport.privacy.leakage.mia_metrics` with score ``-loss``) on members vs non-members.

Capstone 2 (``06_exercises_capstone_iot``), a one-thread device with a cloud behind it:

* **distillation** (Hinton, Vinyals & Dean 2015): ``alpha T^2 KL(p_teacher^T || p_student^T) +
  (1 - alpha) CE``, the teacher in ``eval()`` mode under ``no_grad``, on batches the check fixes;
* **static INT8 export**: ``torch.onnx.export`` with a dynamic batch dimension, then ONNX Runtime's
  ``quantize_static`` in QDQ format calibrated on held-out inputs; smaller on disk (external data
  counted) and agreeing with PyTorch;
* the **deployment report**: accuracy over *every* answer (degraded ones included), the shares
  answered by the cloud and degraded, latency percentiles in milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from labsupport.fl import DataClient, FedAvgConfig, FedAvgSimulation, RoundContext, TrainConfig
from labsupport.fl.state import clone_state
from labsupport.privacy.accounting import USER_LEVEL, PrivacyLedger, compute_epsilon
from labsupport.privacy.dpfedavg import ServerGaussianNoise
from labsupport.privacy.leakage import example_losses, mia_metrics
from labsupport.privacy.secagg import SecAggTransform

from ._core import CheckFailed, call, close, ensure, passed, rng

__all__ = [
    "check_deployment_report",
    "check_distill",
    "check_export_int8",
    "check_hospital_clients",
    "check_privacy_audit",
    "check_private_secure_transforms",
]


def _hospitals(gen: torch.Generator, num: int, features: int = 5) -> list[DataClient]:
    out = []
    for k in range(num):
        n = 12 + 3 * k
        x = torch.randn(n, features, generator=gen) + k
        out.append(DataClient(x, (x[:, 0] > k).long()))
    return out


def _model(seed: int, features: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(features, 2)


def _delta_norm(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a))


def check_private_secure_transforms(make_transforms: Callable, *, seed: int | None = None) -> None:
    """Step 1: ``make_transforms(clip_norm, noise_multiplier, hospitals_per_round, num_hospitals,
    ledger, seed)`` -> the list of update transforms for :class:`~labsupport.fl.FedAvgSimulation`."""
    gen = rng(seed)
    k, m, clip, sigma = 4, 4, 0.5, 0.7
    ledger = PrivacyLedger(1e9, 1e-5, "opacus_rdp", neighbouring=USER_LEVEL)
    transforms = call(make_transforms, clip, sigma, m, k, ledger, 0, what="4 of 4 hospitals")
    ensure(
        isinstance(transforms, (list, tuple)),
        f"make_transforms returned a {type(transforms).__name__}; expected a list of transforms",
    )
    ensure(
        any(isinstance(t, SecAggTransform) for t in transforms),
        "no SecAggTransform: without secure aggregation the server sees every hospital's update",
    )
    noises = [t for t in transforms if isinstance(t, ServerGaussianNoise)]
    ensure(len(noises) == 1, f"expected one ServerGaussianNoise, found {len(noises)}")
    noise = noises[0]
    want_std = sigma * clip / m
    if not math.isclose(noise.std, want_std, rel_tol=1e-9):
        if math.isclose(noise.std, sigma * clip, rel_tol=1e-9):
            raise CheckFailed(
                f"the noise on the average has std σ·S = {noise.std:g}; the average divides the sum "
                f"by m = {m} hospitals, so its noise is σ·S/m = {want_std:g} (expected_clients = m)"
            )
        raise CheckFailed(
            f"the noise on the average has std {noise.std:g}; expected σ·S/m = {want_std:g} "
            f"(σ={sigma}, S={clip}, m={m} hospitals per round)"
        )
    cfg = FedAvgConfig(num_rounds=1, fraction_train=m / k, batch_size=4, lr=0.1, seed=0)
    try:
        sim = FedAvgSimulation(_model(0), _hospitals(gen, k), None, cfg, transforms=transforms)
    except ValueError as exc:
        raise CheckFailed(f"FedAvgSimulation refused your pipeline: {exc}") from exc
    record = sim.run_round(evaluate_now=False)
    ensure(
        not record.rejected,
        f"hospitals were rejected in a round: {record.rejected} (does every transform agree on S?)",
    )
    events = list(ledger.events)
    ensure(
        events,
        "the round was not charged to the ledger: pass it to ServerGaussianNoise (ledger=, "
        "sample_rate=) so a round the budget cannot afford is refused before release",
    )
    ensure(
        len(events) == 1 and events[0][0] == sigma and events[0][2] == 1,
        f"one round must be charged once, as (σ={sigma}, q, 1 step); the ledger holds {events}",
    )
    ensure(
        math.isclose(events[0][1], m / k),
        f"the round was charged at q = {events[0][1]:g}; the sampling rate of hospitals is "
        f"m / K = {m}/{k}",
    )
    # clipping: with huge local steps and almost no noise, the average may move at most S
    ledger2 = PrivacyLedger(math.inf, 1e-5, "opacus_rdp", neighbouring=USER_LEVEL)
    transforms = call(make_transforms, clip, 1e-3, m, k, ledger2, 1, what="σ = 1e-3")
    cfg = FedAvgConfig(num_rounds=1, fraction_train=1.0, batch_size=4, lr=50.0, seed=0)
    sim = FedAvgSimulation(_model(1), _hospitals(gen, k), None, cfg, transforms=transforms)
    before = clone_state(sim.global_state)
    sim.run_round(evaluate_now=False)
    moved = _delta_norm(sim.global_state, before)
    ensure(
        moved <= clip * 1.01,
        f"with large local steps the global model moved by {moved:.3g} > S = {clip}: the hospitals' "
        "updates are not clipped to S (ClipUpdate(S), and SecAggTransform's clip no larger than S)",
    )
    passed(
        "private, secure pipeline",
        f"updates clipped to S, masked sum, noise σS/m = {want_std:g}, each round charged at q = m/K",
    )


def check_hospital_clients(hospital_clients: Callable, *, seed: int | None = None) -> None:
    """Step 2: ``hospital_clients(parts, mu)`` -> one FedProx client per ``(x, y)`` in ``parts``."""
    from labsupport.fl.fedprox import fedprox_hooks  # chapter 03's reference (imported when used)

    gen = rng(seed)
    parts = [(c.x, c.y) for c in _hospitals(gen, 3)]
    model = _model(2)
    global_state = clone_state(_model(3).state_dict())
    config = TrainConfig(local_epochs=2, batch_size=4, lr=0.5)
    for mu in (0.0, 1.0):
        clients = call(hospital_clients, parts, mu, what=f"mu = {mu}")
        ensure(
            isinstance(clients, (list, tuple)) and len(clients) == len(parts),
            f"expected one client per hospital ({len(parts)}), got {clients!r:.80}",
        )
        for i, (client, (x, y)) in enumerate(zip(clients, parts, strict=True)):
            ensure(
                hasattr(client, "fit"), f"client {i} has no fit(model, global_state, ctx, config)"
            )
            ctx = RoundContext(1, i, 1000 + i)
            got = call(
                client.fit, model, clone_state(global_state), ctx, config, what=f"client {i}"
            )
            want = DataClient(x, y, hooks_for_round=fedprox_hooks(mu)).fit(
                _model(2), clone_state(global_state), ctx, config
            )
            ensure(
                float(got.num_samples) == len(y),
                f"client {i} reports {got.num_samples} samples; it holds {len(y)}",
            )
            if all(close(got.state[k], want.state[k], rtol=1e-4, atol=1e-6) for k in want.state):
                continue
            plain = DataClient(x, y).fit(_model(2), clone_state(global_state), ctx, config)
            if mu > 0 and all(close(got.state[k], plain.state[k], rtol=1e-4) for k in plain.state):
                raise CheckFailed(
                    f"mu = {mu} but client {i} trained plain FedAvg: add the proximal term "
                    "(mu/2)||w - w_global||^2 to its local objective (fedprox_hooks)"
                )
            raise CheckFailed(
                f"client {i} at mu = {mu}: its local model differs from FedProx's (same data, same "
                "batch order): the term is (mu/2) times the squared distance to the global model"
            )
    passed("hospital_clients", "FedProx local objectives, one client per hospital")


def _gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact ε of one Gaussian mechanism of sensitivity 1 and noise σ at δ (Balle & Wang, ICML
    2018, Theorem 8): the smallest ε with Φ(1/(2σ) - εσ) - e^ε Φ(-1/(2σ) - εσ) <= δ."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    def excess(eps: float) -> float:
        a, b = 1 / (2 * sigma) - eps * sigma, -1 / (2 * sigma) - eps * sigma
        return norm.cdf(a) - math.exp(eps) * norm.cdf(b) - delta

    return 0.0 if excess(0.0) <= 0 else brentq(excess, 0.0, 500.0)


def _accepted(sigma: float, q: float, rounds: int, delta: float) -> tuple[float, float]:
    """0.98x the tight ε (exact for q = 1: T Gaussian steps are one with σ/√T; Opacus's PRV, which
    cannot handle q = 1, otherwise) and Opacus's RDP bound."""
    if q == 1.0:
        tight = _gaussian_epsilon(sigma / math.sqrt(rounds), delta)
    else:
        tight = compute_epsilon(sigma, q, rounds, delta, "opacus_prv").value
    rdp = compute_epsilon(sigma, q, rounds, delta, "opacus_rdp").value
    return 0.98 * min(tight, rdp), rdp


def check_privacy_audit(privacy_audit: Callable, *, seed: int | None = None) -> None:
    """Step 3: ``privacy_audit(model, members, non_members, *, noise_multiplier, rounds,
    hospitals_per_round, num_hospitals, delta)`` -> ``{"epsilon": user-level ε, "mia_auc": AUC of
    the loss-threshold attack, score -loss}``; ``members``/``non_members`` are ``(x, y)`` pairs."""
    gen = rng(seed)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x_in, x_out = torch.randn(60, 6, generator=gen), torch.randn(40, 6, generator=gen)
    with torch.no_grad():
        y_in = model(x_in).argmax(1)  # members: the model fits them
    y_out = torch.randint(0, 3, (40,), generator=gen)
    scores = torch.cat([-example_losses(model, x_in, y_in), -example_losses(model, x_out, y_out)])
    member = np.r_[np.ones(60, bool), np.zeros(40, bool)]
    auc = mia_metrics(scores.numpy(), member)["auc"]
    for sigma, m, k, rounds in ((1.0, 4, 4, 20), (0.8, 2, 4, 30)):
        got = call(
            privacy_audit,
            model,
            (x_in, y_in),
            (x_out, y_out),
            noise_multiplier=sigma,
            rounds=rounds,
            hospitals_per_round=m,
            num_hospitals=k,
            delta=1e-5,
            what=f"σ={sigma}, {m} of {k} hospitals, {rounds} rounds",
        )
        ensure(
            isinstance(got, dict) and {"epsilon", "mia_auc"} <= set(got),
            f"privacy_audit returned {type(got).__name__}; expected a dict with epsilon and mia_auc",
        )
        eps = float(got["epsilon"])
        low, high = _accepted(sigma, m / k, rounds, 1e-5)
        if not low <= eps <= 1.01 * high:
            one_low, one_high = _accepted(sigma, m / k, 1, 1e-5)
            if one_low <= eps <= 1.01 * one_high:
                raise CheckFailed("that is the ε of ONE round; the run composes `rounds` of them")
            if math.isclose(eps, sigma * (m / k) * rounds, rel_tol=1e-6):
                raise CheckFailed("ε = σ·q·rounds is the naive running sum; use an accountant")
            if m < k:
                one_hospital = _accepted(sigma, 1 / k, rounds, 1e-5)
                no_sampling = _accepted(sigma, 1.0, rounds, 1e-5)
                if one_hospital[0] <= eps <= 1.01 * one_hospital[1]:
                    raise CheckFailed(
                        "you sampled at q = 1/K; a round takes m of the K hospitals: q = m/K"
                    )
                if no_sampling[0] <= eps <= 1.01 * no_sampling[1]:
                    raise CheckFailed(
                        f"that is ε with q = 1 (every hospital every round); here {m} of {k} take "
                        "part in a round, q = m/K (amplification holds if the sample is secret)"
                    )
            raise CheckFailed(
                f"σ={sigma}, {m} of {k} hospitals, {rounds} rounds: ε = {eps:.4g}; user-level ε "
                f"(q = m/K = {m / k:g}, one step per round) is {high:.4g} (RDP) or a little less (PRV)"
            )
        mia = float(got["mia_auc"])
        if not math.isclose(mia, auc, abs_tol=1e-6):
            if math.isclose(mia, 1 - auc, abs_tol=1e-6):
                raise CheckFailed(
                    f"AUC {mia:.3f} = 1 - {auc:.3f}: the score is upside down. A member has a LOW "
                    "loss, so the attack's score is -loss (higher = member)"
                )
            raise CheckFailed(
                f"membership AUC {mia:.3f}, expected {auc:.3f}: the loss-threshold attack scores "
                "every member and non-member by -loss (leakage.example_losses), then ROC AUC"
            )
    passed("privacy audit", f"user-level ε from an accountant, membership AUC {auc:.3f}")


# ====================================================================================== capstone 2
def _reference_distill(
    student: nn.Module,
    teacher: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    temperature: float,
    alpha: float,
    batch_size: int,
    lr: float,
    seed: int,
    scale: bool = True,
    teacher_mode: str = "eval",
    swap: bool = False,
) -> None:
    """The reference (and, with the keyword flags, its plausible mistakes)."""
    from torch.nn import functional as F

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    teacher.train(teacher_mode == "train")
    student.train()
    torch.manual_seed(seed)  # dropout in a train-mode teacher draws from the global generator
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
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
    teacher.eval()


def _pair_models(seed: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 4))
    student = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    return teacher, student


def check_distill(distill: Callable, *, seed: int | None = None) -> None:
    """Capstone 2, step 1: ``distill(student, teacher, x, y, *, steps, temperature, alpha,
    batch_size, lr, seed)`` trains ``student`` in place: each step the batch
    ``torch.randint(0, n, (batch_size,), generator=g)`` (``g`` seeded with ``seed``), the loss
    ``alpha T^2 KL(p_teacher^T || p_student^T) + (1 - alpha) CE(student, y)`` with the teacher in
    ``eval()`` mode under ``no_grad``, one Adam step at ``lr``."""
    import copy

    gen = rng(seed)
    x, y = torch.randn(64, 6, generator=gen), torch.randint(0, 4, (64,), generator=gen)
    teacher, student = _pair_models(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    teacher.train()  # as a training loop would leave it: dropout on
    teacher_before = copy.deepcopy(teacher.state_dict())
    start = copy.deepcopy(student.state_dict())
    kwargs = {"steps": 5, "temperature": 3.0, "alpha": 0.7, "batch_size": 16, "lr": 1e-2, "seed": 7}
    out = call(distill, student, teacher, x, y, **kwargs, what="5 steps on a small pair")
    ensure(out is None or out is student, "distill trains the student in place (return None or it)")
    ensure(
        all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items()),
        "the teacher's weights changed: only the student trains",
    )
    ensure(
        all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in teacher.parameters()),
        "gradients reached the teacher: compute its logits under torch.no_grad()",
    )
    got = student.state_dict()

    def trained(**flags) -> dict[str, torch.Tensor]:
        s = copy.deepcopy(student)
        s.load_state_dict(start)
        _reference_distill(s, copy.deepcopy(teacher), x, y, **kwargs, **flags)
        return s.state_dict()

    def same(want: dict[str, torch.Tensor]) -> bool:
        return all(close(got[k], want[k], rtol=1e-4, atol=1e-6) for k in want)

    if same(trained()):
        passed("distill", "alpha T^2 KL from the eval-mode teacher + (1 - alpha) CE, Adam")
        return
    ensure(not all(torch.equal(got[k], start[k]) for k in start), "the student did not change")
    for flags, message in (
        (
            {"scale": False},
            "the KL term lacks its T^2 factor (Hinton et al.): soft gradients shrink as 1/T^2",
        ),
        (
            {"teacher_mode": "train"},
            "the teacher ran in train mode (dropout on): call "
            "teacher.eval() before taking its logits",
        ),
        ({"swap": True}, "alpha weights the wrong term: alpha * T^2 * KL + (1 - alpha) * CE"),
    ):
        if same(trained(**flags)):
            raise CheckFailed(message)
    raise CheckFailed(
        "after 5 steps your student differs from the reference distillation (same batches, same "
        "Adam): the loss is alpha * T^2 * KL(teacher || student, batchmean) + (1 - alpha) * CE, "
        "with the teacher in eval() mode under no_grad"
    )


def _onnx_size(path: Path) -> int:
    import onnx

    model = onnx.load(path, load_external_data=False)
    files = {Path(path)}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            files.add(Path(path).parent / {e.key: e.value for e in t.external_data}["location"])
    return sum(f.stat().st_size for f in files)


def check_export_int8(export_int8: Callable, *, seed: int | None = None) -> None:
    """Capstone 2, step 2: ``export_int8(model, x_calib, folder)`` -> ``{"fp32": path, "int8":
    path}``: the model exported to ONNX with a dynamic batch dimension, and a static INT8 (QDQ) copy
    calibrated on ``x_calib``."""
    import tempfile

    import onnx
    import onnxruntime as ort

    from labsupport.models import build_model

    gen = rng(seed)
    model = build_model("cnn", seed=int(torch.randint(0, 1000, (1,), generator=gen)), channels=16)
    model.eval()
    x = torch.randn(200, 40, generator=gen)
    with tempfile.TemporaryDirectory() as tmp:
        out = call(export_int8, model, x[:100], Path(tmp), what="a 16-channel CNN")
        ensure(
            isinstance(out, dict) and {"fp32", "int8"} <= set(out),
            f"export_int8 returned {type(out).__name__}; expected a dict with 'fp32' and 'int8' paths",
        )
        fp32, int8 = Path(out["fp32"]), Path(out["int8"])
        ensure(fp32.is_file() and int8.is_file(), "both ONNX files must exist in `folder`")
        ops = {n.op_type for n in onnx.load(int8, load_external_data=False).graph.node}
        ensure(
            {"QuantizeLinear", "DequantizeLinear"} <= ops,
            f"the int8 file has no QuantizeLinear/DequantizeLinear nodes (ops: {sorted(ops)}): use "
            "quantize_static(..., quant_format=QuantFormat.QDQ) with a calibration reader",
        )
        ensure(
            "DynamicQuantizeLinear" not in ops,
            "that is dynamic quantization (activations quantized at run time); the device wants "
            "static INT8 with ranges calibrated on x_calib",
        )
        sizes = {name: _onnx_size(p) for name, p in (("fp32", fp32), ("int8", int8))}
        ensure(
            sizes["int8"] < sizes["fp32"],
            f"the int8 model ({sizes['int8']} B) is not smaller than the fp32 one ({sizes['fp32']} B, "
            "its .onnx.data included)",
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        with torch.no_grad():
            ref = model(x[100:]).argmax(1).numpy()
        try:
            got = session.run(None, {name: x[100:].numpy()})[0].argmax(1)
            one = session.run(None, {name: x[100:101].numpy()})[0]
        except Exception as exc:
            raise CheckFailed(
                f"the int8 model does not run on batches of 100 and of 1 ({type(exc).__name__}): "
                "export with a dynamic batch dimension (dynamic_shapes)"
            ) from exc
        ensure(one.shape == (1, 10), f"one input gave output shape {one.shape}; expected (1, 10)")
        agree = float((got == ref).mean())
        ensure(
            agree >= 0.9,
            f"the int8 model agrees with PyTorch on {agree:.0%} of held-out inputs; expected >= 90% "
            "(calibrate on x_calib, in eval mode)",
        )
    passed(
        "export_int8",
        f"static QDQ int8, {sizes['fp32'] / sizes['int8']:.1f}x smaller, {agree:.0%} argmax agreement",
    )


def check_deployment_report(deployment_report: Callable, *, seed: int | None = None) -> None:
    """Capstone 2, step 3: ``deployment_report(records, labels)`` -> ``{"accuracy", "cloud",
    "degraded", "p50_ms", "p99_ms"}`` over ``records``: one ``(latency_s, prediction, source,
    degraded)`` per request, ``source`` ``"edge"`` or ``"cloud"``; ``cloud`` and ``degraded`` are
    fractions of all requests; accuracy counts every answer, degraded ones included."""
    gen = rng(seed)
    n = 400
    labels = torch.randint(0, 10, (n,), generator=gen)
    lat = (0.001 + 0.02 * torch.rand(n, generator=gen, dtype=torch.float64)).tolist()
    source = ["cloud" if r < 0.4 else "edge" for r in torch.rand(n, generator=gen).tolist()]
    degraded = [
        s == "edge" and r < 0.2
        for s, r in zip(source, torch.rand(n, generator=gen).tolist(), strict=True)
    ]
    right = torch.rand(n, generator=gen) < torch.tensor([0.3 if d else 0.9 for d in degraded])
    preds = torch.where(right, labels, (labels + 1) % 10).tolist()
    records = list(zip(lat, preds, source, degraded, strict=True))
    got = call(deployment_report, records, labels, what=f"{n} requests")
    keys = {"accuracy", "cloud", "degraded", "p50_ms", "p99_ms"}
    ensure(
        isinstance(got, dict) and keys <= set(got),
        f"deployment_report returned {type(got).__name__}; expected a dict with {sorted(keys)}",
    )
    ms = np.asarray(lat) * 1e3
    want = {
        "accuracy": float(right.double().mean()),
        "cloud": source.count("cloud") / n,
        "degraded": sum(degraded) / n,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }
    for key in ("accuracy", "cloud", "degraded"):
        if abs(float(got[key]) - want[key]) > 1e-9:
            if key == "accuracy":
                kept = [r for r, d in zip(right.tolist(), degraded, strict=True) if not d]
                if abs(float(got[key]) - sum(kept) / len(kept)) < 1e-9:
                    raise CheckFailed(
                        "accuracy left out the degraded answers: the device gave them, so they count"
                    )
            raise CheckFailed(f"{key} is {float(got[key]):.4f}; expected {want[key]:.4f}")
    for key in ("p50_ms", "p99_ms"):
        value = float(got[key])
        if abs(value - want[key]) > 0.02 * want[key]:
            if abs(value * 1e3 - want[key]) <= 0.02 * want[key]:
                raise CheckFailed("latencies are in seconds in the records; report milliseconds")
            if key == "p99_ms" and abs(value - float(ms.mean())) < 1e-6:
                raise CheckFailed("p99_ms is the mean latency; take the 99th percentile")
            raise CheckFailed(f"{key} is {value:.3f} ms; expected {want[key]:.3f} ms")
    passed("deployment_report", "accuracy over every answer, cloud and degraded shares, p50/p99")
