"""``baselines``: centralized MNIST-1D baselines against the paper's figures.

Greydanus & Kobak (2024), Table 1: test accuracy 32% (logistic regression), 68% (MLP), 94% (CNN) on
the default 4,000/1,000 split. We train each model with the paper's recipe (Adam, lr 1e-2, batch
100, 6,000 steps) and judge each figure to be within 4 points of the paper's.
"""

from __future__ import annotations

from labsupport.data import load_dataset
from labsupport.models import build_model
from labsupport.train import fit

from . import Result, Target, benchmark

PAPER = {"logistic": 32.0, "mlp": 68.0, "cnn": 94.0}
TOLERANCE = 4.0


def train_baselines(steps: int = 6000, seed: int = 0, progress: bool = True) -> dict[str, dict]:
    """Train logistic/MLP/CNN on MNIST-1D with the paper's recipe; final test accuracy in percent."""
    ds = load_dataset("mnist1d")
    out = {}
    for name in PAPER:
        model = build_model(name, ds.input_shape, ds.num_classes, seed=seed)
        hist = fit(
            model,
            ds.x_train,
            ds.y_train,
            ds.x_test,
            ds.y_test,
            steps=steps,
            eval_every=min(250, steps),
            seed=seed,
            progress=progress,
            desc=name,
        )
        out[name] = {"accuracy": 100.0 * hist["test_accuracy"][-1], "history": hist}
    return out


@benchmark(
    "baselines", "MNIST-1D centralized logistic/MLP/CNN vs the paper's accuracy", chapter="00"
)
def run(smoke: bool) -> Result:
    runs = train_baselines(steps=300 if smoke else 6000, progress=False)
    figures = {name: round(r["accuracy"], 2) for name, r in runs.items()}
    targets = {
        name: Target(
            name, PAPER[name] - TOLERANCE, PAPER[name] + TOLERANCE, f"paper: {PAPER[name]:g}%"
        )
        for name in PAPER
    }
    return Result(figures, targets, details={"paper": PAPER, "steps": 300 if smoke else 6000})
