"""What every check shares: the failure type, calling the student's code, and the success line.

A check (:mod:`labsupport.checks`) runs a student's function against the reference on fresh random
inputs and stops at the *first* thing that is wrong, with a message that names it ("unweighted
average", "clipping after noise") without showing the reference code. It raises
:class:`CheckFailed` -- an ``AssertionError``, so nbgrader and plain ``assert``-minded readers treat
it as a failed test -- and prints one short line when everything held (the only printing in
``labsupport``: a check's output *is* its result in a notebook).

``NotImplementedError`` from a stub is never wrapped: the student sees that the step is not done
yet, and the tests of the generated notebooks rely on it propagating.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["CheckFailed", "call", "close", "ensure", "passed", "rng"]


class CheckFailed(AssertionError):
    """A step's check failed; the message says what was wrong and on which input."""


def ensure(condition: object, message: str) -> None:
    """Raise :class:`CheckFailed` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise CheckFailed(message)


def call(fn: Callable, *args: Any, what: str = "", **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``; an exception other than ``NotImplementedError`` becomes a
    :class:`CheckFailed` that says on which input (``what``) the student's code raised."""
    if not callable(fn):
        raise CheckFailed(f"expected a function, got a {type(fn).__name__}")
    try:
        return fn(*args, **kwargs)
    except (NotImplementedError, CheckFailed):
        raise
    except Exception as exc:
        where = f" on {what}" if what else ""
        name = getattr(fn, "__name__", "your function")
        raise CheckFailed(f"{name} raised {type(exc).__name__}: {exc}{where}") from exc


def close(a: torch.Tensor, b: torch.Tensor, *, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    """``a`` and ``b`` equal within tolerance, compared in float64."""
    return bool(torch.allclose(a.detach().double(), b.detach().double(), rtol=rtol, atol=atol))


def rng(seed: int | None) -> torch.Generator:
    """A generator for a check's fresh inputs: ``seed=None`` draws a new seed every call."""
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    return torch.Generator().manual_seed(seed)


def passed(step: str, detail: str = "") -> None:
    """Print the success line of a check."""
    print(f"\N{CHECK MARK} {step} passed" + (f": {detail}" if detail else ""))


def as_state(value: object, what: str) -> Mapping[str, torch.Tensor]:
    """``value`` if it is a mapping of names to tensors, else :class:`CheckFailed`."""
    ensure(
        isinstance(value, Mapping),
        f"{what} returned a {type(value).__name__}; expected a dict of tensors (a state dict)",
    )
    for k, v in value.items():
        ensure(
            isinstance(v, torch.Tensor),
            f"{what}: entry {k!r} is a {type(v).__name__}, not a tensor",
        )
    return value
