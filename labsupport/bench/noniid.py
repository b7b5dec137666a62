"""Chapter 03 benchmarks: non-IID skew and its fixes, robust aggregation under attack, and its cost.

All on MNIST-1D with the reference MLP (Greydanus & Kobak 2024), every client a
:class:`~labsupport.fl.clients.DataClient` of a partition (:mod:`labsupport.partitions`), run by
:class:`~labsupport.fl.server.FedAvgSimulation`. Accuracies are test accuracies in percent, means over
seeds; every run of a comparison uses the same seeds, partitions and initial model.

* ``noniid_sweep`` -- FedAvg, FedProx, SCAFFOLD and FedAvgM across Dirichlet label skew
  ``alpha in {100, 1, 0.3, 0.1}`` (figures ``<method>_alpha_<a>``), and FedAvg under 2-class shards,
  quantity skew, feature skew and temporal skew, beside local-only and centralized references and
  the client drift (spread of the updates around their mean, relative to the mean's norm). Targets:
  FedAvg at alpha 0.1 below FedAvg at alpha 100, and the best fix at alpha 0.1 >= 3 points above
  FedAvg.
* ``robust_attacks`` -- final accuracy of each aggregator x attack at 10% and 30% malicious clients
  beside the clean run (figures ``<aggregator>_<attack>_<pct>``). Target: under 30% sign-flip and
  scaled-update attackers the best robust aggregator within 5 points of clean FedAvg, while the plain
  mean falls by more than 20 points.
* ``aggregator_speed`` -- wall time of each aggregator on 100 clients x 1M parameters as a ratio to
  the plain weighted mean (both from the same replies to a new global state, side by side). Target:
  median and trimmed mean <= 10x. Krum costs O(n^2 d): all n(n-1)/2 pairwise distances of
  d-dimensional updates (a float64 Gram matrix), against O(n d) for the mean.

The notebook ``03_non_iid`` calls :func:`run_method`, :func:`attack_table` and
:func:`selection_experiment` from here.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from labsupport.data import load_dataset
from labsupport.fl.aggregators import Aggregator, WeightedMean
from labsupport.fl.attacks import make_attackers
from labsupport.fl.client_selection import (
    bind,
    global_losses,
    most_diverse,
    participation_counts,
    power_of_choice,
    uniform,
)
from labsupport.fl.clients import DataClient, FitReply
from labsupport.fl.fedprox import fedprox_hooks
from labsupport.fl.robust import (
    CenteredClipping,
    DriftMeter,
    GeometricMedian,
    Krum,
    Median,
    MultiKrum,
    TrimmedMean,
)
from labsupport.fl.scaffold import Scaffold, ScaffoldClient
from labsupport.fl.server import FedAvgConfig, FedAvgSimulation
from labsupport.fl.server_opt import FedAvgM
from labsupport.models import build_model
from labsupport.temporal_skew import drifting_clients
from labsupport.train import evaluate, train

from . import Result, Target, benchmark

try:  # the partitions moved from labsupport.noniid to labsupport.partitions
    from labsupport.partitions import feature_skew, label_counts, partition
except ImportError:  # pragma: no cover
    from labsupport.noniid import feature_skew, label_counts, partition

__all__ = [
    "METHODS",
    "Federation",
    "aggregator_speed",
    "attack_table",
    "federation",
    "local_only_accuracy",
    "noniid_sweep",
    "robust_attacks",
    "run_method",
    "selection_experiment",
]

METHODS = ("fedavg", "fedprox", "scaffold", "fedavgm")
FEDPROX_MU = 0.1
FEDAVGM = {"server_lr": 1.0, "momentum": 0.5}
Split = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Federation:
    """MNIST-1D split over clients: the clients, the test set and the partition's index arrays."""

    clients: list[DataClient]
    test: Split
    parts: list[np.ndarray]
    x: torch.Tensor
    y: torch.Tensor


def federation(
    num_clients: int, scheme: str = "dirichlet", *, seed: int = 0, **kwargs: Any
) -> Federation:
    """MNIST-1D's training set split by ``scheme`` (a partition scheme, ``"feature"`` -- IID parts
    with per-client feature skew -- or ``"temporal"``, Dirichlet(0.3) redrawn every 5 rounds)."""
    ds = load_dataset("mnist1d")
    x, y = ds.x_train, ds.y_train
    if scheme == "temporal":
        clients = drifting_clients(
            x, y, num_clients, kwargs.get("num_phases", 4), kwargs.get("rounds_per_phase", 5),
            alpha=kwargs.get("alpha", 0.3), seed=seed,
        )  # fmt: skip
        return Federation(clients, (ds.x_test, ds.y_test), [], x, y)
    if scheme == "feature":
        parts = partition(y, num_clients, "iid", seed=seed)
        x = feature_skew(x, parts, seed=seed, **kwargs)
    else:
        if scheme == "dirichlet":
            kwargs.setdefault("min_partition_size", 0)
        parts = partition(y, num_clients, scheme, seed=seed, **kwargs)
    parts = [p for p in parts if len(p) > 0]
    clients = [DataClient(x[torch.as_tensor(p)], y[torch.as_tensor(p)]) for p in parts]
    return Federation(clients, (ds.x_test, ds.y_test), parts, x, y)


def run_method(
    method: str,
    clients: Sequence[Any],
    test: Split,
    cfg: FedAvgConfig,
    *,
    aggregator: Aggregator | None = None,
    mu: float = FEDPROX_MU,
    model: str = "mlp",
) -> tuple[FedAvgSimulation, DriftMeter]:
    """Run ``method`` (fedavg | fedprox | scaffold | fedavgm) on ``clients``; returns the finished
    simulation and the drift meter that wrapped its aggregator."""
    clients = list(clients)
    if method == "fedprox":
        clients = [
            replace(c, hooks_for_round=fedprox_hooks(mu, form="gradient"))
            if isinstance(c, DataClient)
            else c
            for c in clients
        ]
        agg = aggregator or WeightedMean()
    elif method == "scaffold":
        clients = [ScaffoldClient(c) for c in clients]
        agg = Scaffold(num_clients=len(clients), local_lr=cfg.lr)
    elif method == "fedavgm":
        agg = FedAvgM(**FEDAVGM)
    elif method == "fedavg":
        agg = aggregator or WeightedMean()
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    meter = DriftMeter(agg)
    sim = FedAvgSimulation(build_model(model, seed=cfg.seed), clients, test, cfg, aggregator=meter)
    fl_logger = logging.getLogger("labsupport.fl")
    level = fl_logger.level
    fl_logger.setLevel(
        logging.ERROR
    )  # a diverged run rejects every client every round: no log flood
    try:
        sim.run(progress=False)
    finally:
        fl_logger.setLevel(level)
    return sim, meter


def local_only_accuracy(fed: Federation, cfg: FedAvgConfig, *, model: str = "mlp") -> float:
    """Mean test accuracy of models each trained on one client's data alone (same local budget)."""
    accs = []
    for i, c in enumerate(fed.clients):
        m = build_model(model, seed=cfg.seed)
        train(
            m, c.x, c.y, epochs=cfg.num_rounds * cfg.local_epochs, batch_size=cfg.batch_size,
            lr=cfg.lr, generator=torch.Generator().manual_seed(cfg.seed * 1000 + i),
        )  # fmt: skip
        accs.append(evaluate(m, *fed.test)["accuracy"])
    return float(np.mean(accs))


def centralized_accuracy(fed: Federation, cfg: FedAvgConfig, *, model: str = "mlp") -> float:
    """Test accuracy of one model trained on the pooled data with the same number of epochs."""
    m = build_model(model, seed=cfg.seed)
    train(
        m, fed.x, fed.y, epochs=cfg.num_rounds * cfg.local_epochs, batch_size=cfg.batch_size,
        lr=cfg.lr, generator=torch.Generator().manual_seed(cfg.seed),
    )  # fmt: skip
    return evaluate(m, *fed.test)["accuracy"]


def _pct(x: float | None) -> float:
    return float("nan") if x is None else round(100.0 * x, 2)


def _mean(values: Sequence[float]) -> float:
    return round(statistics.fmean(values), 2)


def _fmt_alpha(a: float) -> str:
    return f"{a:g}"


# ------------------------------------------------------------------------------------ noniid_sweep


def _sweep_config(smoke: bool) -> tuple[FedAvgConfig, list[int], list[float], int]:
    if smoke:
        cfg = FedAvgConfig(num_rounds=2, fraction_train=1.0, local_epochs=1, batch_size=20, lr=0.05)
        return cfg, [0], [100.0, 0.1], 10
    cfg = FedAvgConfig(num_rounds=30, fraction_train=1.0, local_epochs=2, batch_size=10, lr=0.05)
    return cfg, [0, 1], [100.0, 1.0, 0.3, 0.1], 10


@benchmark(
    "noniid_sweep",
    "FedAvg/FedProx/SCAFFOLD/FedAvgM test accuracy across Dirichlet label skew and other skews",
    chapter="03",
)
def noniid_sweep(smoke: bool) -> Result:
    cfg, seeds, alphas, num_clients = _sweep_config(smoke)
    per_seed: dict[str, list[float]] = {}
    curves: dict[str, list[list[float]]] = {}
    drift: dict[str, list[float]] = {}

    def record(name: str, sim: FedAvgSimulation, meter: DriftMeter | None = None) -> None:
        per_seed.setdefault(name, []).append(_pct(sim.history.final_accuracy))
        curves.setdefault(name, []).append([_pct(a) for a in sim.history.column("accuracy")])
        if meter is not None and meter.drift:
            drift.setdefault(name, []).append(statistics.fmean(d["relative"] for d in meter.drift))

    for seed in seeds:
        scfg = replace(cfg, seed=seed)
        for alpha in alphas:
            fed = federation(num_clients, "dirichlet", alpha=alpha, seed=seed)
            for method in METHODS:
                sim, meter = run_method(method, fed.clients, fed.test, scfg)
                record(f"{method}_alpha_{_fmt_alpha(alpha)}", sim, meter)
            per_seed.setdefault(f"local_only_alpha_{_fmt_alpha(alpha)}", []).append(
                _pct(local_only_accuracy(fed, scfg))
            )
        for scheme, kwargs in (
            ("shards", {"shards_per_client": 2}),
            ("quantity", {"kind": "exponential"}),
            ("feature", {}),
            ("temporal", {"rounds_per_phase": max(1, cfg.num_rounds // 4)}),
        ):
            fed = federation(num_clients, scheme, seed=seed, **kwargs)
            sim, meter = run_method("fedavg", fed.clients, fed.test, scfg)
            record(f"fedavg_{scheme}", sim, meter)
        iid = federation(num_clients, "iid", seed=seed)
        per_seed.setdefault("centralized", []).append(_pct(centralized_accuracy(iid, scfg)))

    figures = {name: _mean(v) for name, v in per_seed.items()}
    figures.update({f"drift_{k}": round(statistics.fmean(v), 3) for k, v in drift.items()})
    low, high = _fmt_alpha(min(alphas)), _fmt_alpha(max(alphas))
    fixes = {m: figures[f"{m}_alpha_{low}"] for m in METHODS if m != "fedavg"}
    best = max(fixes, key=fixes.get)
    figures[f"fedavg_drop_alpha_{low}"] = round(
        figures[f"fedavg_alpha_{high}"] - figures[f"fedavg_alpha_{low}"], 2
    )
    figures[f"best_fix_gain_alpha_{low}"] = round(fixes[best] - figures[f"fedavg_alpha_{low}"], 2)
    targets = {
        "skew_hurts": Target(
            f"fedavg_drop_alpha_{low}", min=0.0,
            note=f"FedAvg at alpha={low} below FedAvg at alpha={high} (points, mean over seeds)",
        ),
        "best_fix": Target(
            f"best_fix_gain_alpha_{low}", min=3.0,
            note=f"best of FedProx/SCAFFOLD/FedAvgM ({best}) minus FedAvg at alpha={low}, points",
        ),
    }  # fmt: skip
    return Result(
        figures,
        targets,
        details={
            "seeds": seeds,
            "config": {k: v for k, v in vars(cfg).items()},
            "num_clients": num_clients,
            "fedprox_mu": FEDPROX_MU,
            "fedavgm": FEDAVGM,
            "best_fix": best,
            "per_seed": per_seed,
            "accuracy_per_round": curves,
        },
    )


# --------------------------------------------------------------------------------- robust_attacks

# Each factory gets (n clients, f attackers). Multi-Krum averages the n - f best-scored updates
# (Blanchard et al. 2017's m = n - f); Krum's f is the number of attackers actually present.
ROBUST: dict[str, Callable[[int, int], Aggregator]] = {
    "mean": lambda n, f: WeightedMean(),
    "median": lambda n, f: Median(),
    "trimmed_mean": lambda n, f: TrimmedMean(0.3),
    "krum": lambda n, f: Krum(num_malicious=f),
    "multi_krum": lambda n, f: MultiKrum(num_malicious=f, num_selected=max(1, n - f)),
    "geometric_median": lambda n, f: GeometricMedian(),
    "centered_clipping": lambda n, f: CenteredClipping(),
}
ATTACK_NAMES = ("sign_flip", "scaled_update", "gaussian", "label_flip", "free_rider")


def attack_table(
    fed: Federation,
    cfg: FedAvgConfig,
    *,
    aggregators: Sequence[str] = tuple(ROBUST),
    attacks: Sequence[str] = ATTACK_NAMES,
    fractions: Sequence[float] = (0.1, 0.3),
    seed: int = 0,
) -> dict[str, float]:
    """Final test accuracy (%) of every aggregator x attack x fraction, plus ``<agg>_clean``."""
    out: dict[str, float] = {}
    n = len(fed.clients)
    for name in aggregators:
        sim, _ = run_method("fedavg", fed.clients, fed.test, cfg, aggregator=ROBUST[name](n, 0))
        out[f"{name}_clean"] = _pct(sim.history.final_accuracy)
        for attack in attacks:
            for frac in fractions:
                clients, bad = make_attackers(fed.clients, attack, frac, seed=seed)
                agg = ROBUST[name](n, len(bad))
                sim, _ = run_method("fedavg", clients, fed.test, cfg, aggregator=agg)
                out[f"{name}_{attack}_{round(100 * frac)}"] = _pct(sim.history.final_accuracy)
    return out


@benchmark(
    "robust_attacks",
    "final accuracy of each aggregator under sign-flip/scaled/noise/label-flip/free-rider attackers",
    chapter="03",
)
def robust_attacks(smoke: bool) -> Result:
    if smoke:
        cfg = FedAvgConfig(num_rounds=2, fraction_train=1.0, local_epochs=1, batch_size=20, lr=0.05)
        seeds, aggs, attacks = [0], ("mean", "median"), ("sign_flip", "scaled_update")
        fractions: tuple[float, ...] = (0.3,)
    else:
        cfg = FedAvgConfig(num_rounds=20, fraction_train=1.0, local_epochs=2, batch_size=10, lr=0.1)
        seeds, aggs, attacks = [0, 1], tuple(ROBUST), ATTACK_NAMES
        fractions = (0.1, 0.3)
    per_seed: dict[str, list[float]] = {}
    for seed in seeds:
        fed = federation(20, "iid", seed=seed)
        table = attack_table(
            fed, replace(cfg, seed=seed), aggregators=aggs, attacks=attacks,
            fractions=fractions, seed=seed,
        )  # fmt: skip
        for k, v in table.items():
            per_seed.setdefault(k, []).append(v)
    figures = {k: _mean(v) for k, v in per_seed.items()}
    clean = figures["mean_clean"]
    targets = {}
    for attack in ("sign_flip", "scaled_update"):
        robust = {a: figures[f"{a}_{attack}_30"] for a in aggs if a != "mean"}
        best = max(robust, key=robust.get)
        figures[f"best_robust_gap_{attack}_30"] = round(clean - robust[best], 2)
        figures[f"mean_drop_{attack}_30"] = round(clean - figures[f"mean_{attack}_30"], 2)
        targets[f"robust_{attack}"] = Target(
            f"best_robust_gap_{attack}_30", max=5.0,
            note=f"clean FedAvg minus the best robust aggregator ({best}) under 30% {attack}",
        )  # fmt: skip
        targets[f"mean_falls_{attack}"] = Target(
            f"mean_drop_{attack}_30",
            min=20.0,
            note=f"clean FedAvg minus the mean under 30% {attack}",
        )
    return Result(
        figures,
        targets,
        details={"seeds": seeds, "clients": 20, "config": vars(cfg), "per_seed": per_seed},
    )


# ------------------------------------------------------------------------------- aggregator_speed


def _speed_replies(num_clients: int, numel: int, seed: int = 0) -> tuple[dict, list[FitReply]]:
    gen = torch.Generator().manual_seed(seed)
    side = int(numel**0.5)
    glob = {"w": torch.zeros(side, numel // side), "b": torch.zeros(numel - side * (numel // side))}
    replies = [
        FitReply({k: torch.randn(v.shape, generator=gen) for k, v in glob.items()}, 10.0 + i, {}, i)
        for i in range(num_clients)
    ]
    return glob, replies


@benchmark(
    "aggregator_speed",
    "time of each robust aggregator on 100 clients x 1M parameters, as a ratio to the weighted mean",
    chapter="03",
)
def aggregator_speed(smoke: bool) -> Result:
    n, d = (20, 50_000) if smoke else (100, 1_000_000)
    glob, replies = _speed_replies(n, d)
    f = n // 5
    aggs: dict[str, Aggregator] = {
        "mean": WeightedMean(),
        "median": Median(),
        "trimmed_mean": TrimmedMean(0.2),
        "krum": Krum(f),
        "multi_krum": MultiKrum(f, n // 2),
        "geometric_median": GeometricMedian(max_iter=20),
        "centered_clipping": CenteredClipping(iterations=3),
    }
    times: dict[str, list[float]] = {k: [] for k in aggs}
    for _ in range(1 if not smoke else 2):  # interleaved: machine load hits every aggregator alike
        for name, agg in aggs.items():
            start = time.perf_counter()
            agg.aggregate(glob, replies)
            times[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    figures = {f"{k}_ratio": round(v / best["mean"], 2) for k, v in best.items() if k != "mean"}
    figures.update({f"{k}_s": round(v, 3) for k, v in best.items()})
    return Result(
        figures,
        {
            "median": Target("median_ratio", max=10.0, note="median / weighted mean, same replies"),
            "trimmed_mean": Target(
                "trimmed_mean_ratio", max=10.0, note="trimmed mean / weighted mean"
            ),
        },
        details={
            "clients": n,
            "parameters": d,
            "krum_cost": "O(n^2 d): the n x n Gram matrix of the d-dim updates (float64), vs O(n d)",
        },
    )


# ---------------------------------------------------------------------------- client selection


def selection_experiment(
    fed: Federation, cfg: FedAvgConfig, *, d: int | None = None
) -> dict[str, dict[str, Any]]:
    """FedAvg with uniform, power-of-choice and "most diverse" selection: final accuracy (%),
    accuracy per round and the participation histogram of each."""
    out: dict[str, dict[str, Any]] = {}
    counts = label_counts(fed.y, fed.parts, num_classes=10)
    sizes = [c.num_samples for c in fed.clients]
    for name in ("uniform", "power_of_choice", "most_diverse"):
        sim = FedAvgSimulation(build_model("mlp", seed=cfg.seed), fed.clients, fed.test, cfg)
        if name == "uniform":
            rule = uniform
        elif name == "power_of_choice":

            def ask(candidates: list[int], sim: FedAvgSimulation = sim) -> list[float]:
                return global_losses(sim.global_model(), fed.clients, candidates)

            rule = bind(power_of_choice, losses=ask, sizes=sizes, d=d)
        else:
            rule = bind(most_diverse, label_counts=counts)
        sim.selector = rule
        sim.run(progress=False)
        sel = sim.history.column("clients")
        out[name] = {
            "accuracy": _pct(sim.history.final_accuracy),
            "curve": [_pct(a) for a in sim.history.column("accuracy")],
            "participation": participation_counts(sel, len(fed.clients)).tolist(),
        }
    return out
