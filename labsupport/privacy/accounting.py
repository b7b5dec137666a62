"""Privacy accounting for the subsampled Gaussian mechanism, and a budget ledger that refuses to overspend.

DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016) and DP-FedAvg (McMahan et
al., ICLR 2018) release, at every step, a sum of clipped contributions plus Gaussian noise of standard
deviation ``noise_multiplier * clip``, on a batch (of examples, or of clients) drawn by Poisson
sampling with rate ``q``. The privacy loss of ``T`` such steps is an (ε, δ) pair computed by an
*accountant*:

* :func:`naive_epsilon` -- the counter-example chapter 02 runs first: ``ε += σ·q`` per step. It runs
  backwards (more noise, more ε), has no δ, and composes linearly; it is labelled as wrong wherever it
  is shown.
* Rényi DP (Mironov 2017; Mironov, Talwar & Zhang 2019, "Rényi Differential Privacy of the Sampled
  Gaussian Mechanism"): ``"opacus_rdp"`` (Opacus's ``RDPAccountant``) and ``"dpa_rdp"`` (Google's
  ``dp_accounting.rdp.RdpAccountant``). An upper bound, slightly loose.
* Privacy loss distributions: ``"opacus_prv"`` (Gopi, Lee & Wutschitz 2021, "Numerical Composition of
  Differential Privacy", Opacus's ``PRVAccountant``) and ``"dpa_pld"`` (Koskela et al. 2020;
  ``dp_accounting.pld.PLDAccountant``). Numerically tight; PRV ≤ RDP is what the ``accountants``
  benchmark checks.

Every ε is returned as an :class:`Epsilon`, whose ``str()`` says the δ, the accountant, the sampling
scheme and the neighbouring relation it holds for -- an ε without those is not a privacy claim.
``inf`` (an accountant that cannot bound the loss, as PRV at σ = 0.5, q = 1, 1,000 steps) stays
``inf``: it is shown as such, never replaced by a number.

:class:`PrivacyLedger` is the budget tracker of the chapter's "privacy budget tracking" section: it
keeps the *events* (σ, q, steps) -- never a running ε sum --, recomputes ε from all of them with the
accountant it wraps, refuses a step that would exceed the budget *before* it is taken
(:class:`BudgetExceeded`), and saves/restores itself as JSON data for checkpoints.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ACCOUNTANTS",
    "BudgetExceeded",
    "Epsilon",
    "PrivacyLedger",
    "calibrate_noise",
    "check_delta",
    "compare_accountants",
    "compute_epsilon",
    "naive_epsilon",
]

#: Accountant names and how they are printed.
ACCOUNTANTS: dict[str, str] = {
    "naive": "naive running sum ε += σ·q (WRONG)",
    "opacus_rdp": "Opacus RDP",
    "opacus_prv": "Opacus PRV",
    "dpa_rdp": "dp_accounting RDP",
    "dpa_pld": "dp_accounting PLD",
}

EXAMPLE_LEVEL = "add/remove one example"
USER_LEVEL = "add/remove one client (user-level)"

Event = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


class BudgetExceeded(RuntimeError):
    """A step was refused because it would take ε past the budget (nothing was spent)."""


@dataclass(frozen=True)
class Epsilon:
    """An ε that carries everything needed to read it: δ, accountant, sampling and neighbours."""

    value: float
    delta: float
    accountant: str
    sampling: str = "Poisson"
    neighbouring: str = EXAMPLE_LEVEL
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None

    @property
    def finite(self) -> bool:
        return math.isfinite(self.value)

    def __float__(self) -> float:
        return float(self.value)

    def __str__(self) -> str:
        value = "inf (no finite bound)" if math.isinf(self.value) else f"{self.value:.3g}"
        mech = ""
        if self.noise_multiplier is not None:
            mech = f", σ={self.noise_multiplier:g}, q={self.sample_rate:g}, {self.steps} steps"
        delta = "no δ" if self.accountant == "naive" else f"δ={self.delta:g}"
        return (
            f"ε={value} at {delta} ({ACCOUNTANTS.get(self.accountant, self.accountant)}, "
            f"{self.sampling} sampling{mech}, {self.neighbouring} neighbours)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "epsilon": self.value,
            "delta": self.delta,
            "accountant": self.accountant,
            "sampling": self.sampling,
            "neighbouring": self.neighbouring,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
        }


# ------------------------------------------------------------------------------------- validation


def _check_noise(noise_multiplier: float) -> float:
    if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, (int, float)):
        raise TypeError(f"noise_multiplier must be a number, got {type(noise_multiplier).__name__}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(
            f"noise_multiplier (σ) must be a finite number > 0, got {noise_multiplier}; "
            "σ = 0 is no noise and gives no differential privacy at all"
        )
    return float(noise_multiplier)


def _check_rate(sample_rate: float) -> float:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)):
        raise TypeError(f"sample_rate must be a number, got {type(sample_rate).__name__}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate (q) must be in (0, 1], got {sample_rate}")
    return float(sample_rate)


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    return steps


def _check_delta_range(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)):
        raise TypeError(f"delta must be a number, got {type(delta).__name__}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return float(delta)


def check_delta(delta: float, num_samples: int, *, strict: bool = True) -> float:
    """Refuse (``strict``) or warn about a δ that is not much smaller than ``1 / num_samples``.

    (ε, δ)-DP with δ ≥ 1/N allows a mechanism that publishes one randomly chosen record in full; the
    usual advice is δ ≪ 1/N. ``num_samples`` is the number of examples (example-level DP) or of
    clients (user-level DP).
    """
    _check_delta_range(delta)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if delta >= 1.0 / num_samples:
        msg = (
            f"delta={delta:g} >= 1/N = {1.0 / num_samples:g} (N={num_samples}): such a δ allows "
            "releasing one whole record in the clear; choose δ well below 1/N (e.g. 1e-5)"
        )
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=2)
    return float(delta)


# -------------------------------------------------------------------------------------- accountants


def naive_epsilon(noise_multiplier: float, sample_rate: float, steps: int) -> Epsilon:
    """THE COUNTER-EXAMPLE: ``ε = Σ_steps σ·q``. Grows with the noise, has no δ, composes linearly.

    Kept only so that chapter 02 can show it running backwards; never use it as a privacy claim.
    """
    s, q, t = _check_noise(noise_multiplier), _check_rate(sample_rate), _check_steps(steps)
    eps = 0.0
    for _ in range(t):  # the running sum, as naive teaching code writes it
        eps += s * q
    return Epsilon(eps, float("nan"), "naive", "any", EXAMPLE_LEVEL, s, q, t)


def _opacus_accountant(kind: str, events: Sequence[Event]):
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = RDPAccountant() if kind == "opacus_rdp" else PRVAccountant()
    acc.history = [(float(s), float(q), int(t)) for s, q, t in events]
    return acc


def _dpa_event(events: Sequence[Event]):
    import dp_accounting

    parts = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), t
        )
        for s, q, t in events
    ]
    return parts[0] if len(parts) == 1 else dp_accounting.ComposedDpEvent(parts)


def _events_epsilon(events: Sequence[Event], delta: float, accountant: str) -> float:
    """ε of the composition of ``events`` at ``delta`` with ``accountant`` (``inf`` if unbounded)."""
    events = [(s, q, t) for s, q, t in events if t > 0]
    if not events:
        return 0.0
    if accountant == "naive":
        return sum(s * q * t for s, q, t in events)
    with warnings.catch_warnings():
        # Opacus warns when the best Rényi order is at the edge of its grid, and PRV's numpy overflows
        # on hopeless settings; the value (or inf) is what the caller sees.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        if accountant in ("opacus_rdp", "opacus_prv"):
            try:
                eps = float(_opacus_accountant(accountant, events).get_epsilon(delta))
            except (ValueError, OverflowError, FloatingPointError, IndexError):
                return float("inf")  # PRV's domain cannot hold the loss: no finite bound
        elif accountant in ("dpa_rdp", "dpa_pld"):
            from dp_accounting import pld, rdp

            acc = rdp.RdpAccountant() if accountant == "dpa_rdp" else pld.PLDAccountant()
            acc.compose(_dpa_event(events))
            eps = float(acc.get_epsilon(delta))
        else:
            raise ValueError(
                f"unknown accountant {accountant!r}; expected one of {list(ACCOUNTANTS)}"
            )
    return float("inf") if math.isnan(eps) else eps


def compute_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "opacus_prv",
    *,
    neighbouring: str = EXAMPLE_LEVEL,
) -> Epsilon:
    """ε of ``steps`` Poisson-subsampled Gaussian steps (σ = ``noise_multiplier``, q = ``sample_rate``)."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; expected one of {list(ACCOUNTANTS)}")
    if accountant == "naive":
        return naive_epsilon(noise_multiplier, sample_rate, steps)
    s, q, t = _check_noise(noise_multiplier), _check_rate(sample_rate), _check_steps(steps)
    d = _check_delta_range(delta)
    eps = _events_epsilon([(s, q, t)], d, accountant)
    return Epsilon(eps, d, accountant, "Poisson", neighbouring, s, q, t)


def compare_accountants(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountants: Sequence[str] = tuple(ACCOUNTANTS),
) -> list[Epsilon]:
    """The same (σ, q, steps, δ) through every accountant: one :class:`Epsilon` each."""
    return [compute_epsilon(noise_multiplier, sample_rate, steps, delta, a) for a in accountants]


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "opacus_prv",
    *,
    epsilon_tolerance: float = 0.01,
) -> float:
    """The smallest σ whose ε after ``steps`` steps at rate ``sample_rate`` is at most ``target_epsilon``.

    Opacus's ``get_noise_multiplier`` (accountant ``"opacus_prv"`` or ``"opacus_rdp"``), or
    ``dp_accounting.calibrate_dp_mechanism`` (``"dpa_pld"``, ``"dpa_rdp"``).
    """
    if not (isinstance(target_epsilon, (int, float)) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    if math.isinf(target_epsilon):
        raise ValueError("target_epsilon = inf needs no noise: train without DP instead")
    d, q, t = _check_delta_range(delta), _check_rate(sample_rate), _check_steps(steps)
    if t == 0:
        raise ValueError("steps must be >= 1 to calibrate noise")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        if accountant in ("opacus_prv", "opacus_rdp"):
            from opacus.accountants.utils import get_noise_multiplier

            return float(
                get_noise_multiplier(
                    target_epsilon=float(target_epsilon),
                    target_delta=d,
                    sample_rate=q,
                    steps=t,
                    accountant=accountant.split("_")[1],
                    epsilon_tolerance=epsilon_tolerance,
                )
            )
        if accountant in ("dpa_pld", "dpa_rdp"):
            import dp_accounting

            def make_accountant():
                from dp_accounting import pld, rdp

                return rdp.RdpAccountant() if accountant == "dpa_rdp" else pld.PLDAccountant()

            return float(
                dp_accounting.calibrate_dp_mechanism(
                    make_accountant,
                    lambda s: _dpa_event([(s, q, t)]),
                    float(target_epsilon),
                    d,
                    dp_accounting.ExplicitBracketInterval(0.05, 100.0),
                    tol=epsilon_tolerance,
                )
            )
    raise ValueError(
        f"cannot calibrate with accountant {accountant!r}; expected 'opacus_prv', 'opacus_rdp', "
        "'dpa_pld' or 'dpa_rdp'"
    )


# --------------------------------------------------------------------------------------- the ledger


@dataclass
class PrivacyLedger:
    """A privacy budget: the list of mechanism events, the accountant that reads them, and a limit.

    ``spend(σ, q, steps)`` records an event only if ε of *all* events including it stays at or below
    ``target_epsilon``; otherwise it raises :class:`BudgetExceeded` and records nothing. ε is always
    recomputed from the events (composition is not additive). ``num_samples`` (examples, or clients for
    user-level DP) makes the ledger refuse a δ ≥ 1/N.
    """

    target_epsilon: float
    delta: float
    accountant: str = "opacus_prv"
    neighbouring: str = EXAMPLE_LEVEL
    sampling: str = "Poisson"
    num_samples: int | None = None
    events: list[Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.target_epsilon, (int, float)) or not self.target_epsilon > 0:
            raise ValueError(f"target_epsilon must be > 0, got {self.target_epsilon!r}")
        if self.accountant not in ACCOUNTANTS or self.accountant == "naive":
            raise ValueError(
                f"accountant must be one of {[a for a in ACCOUNTANTS if a != 'naive']}, "
                f"got {self.accountant!r}"
            )
        if self.num_samples is not None:
            check_delta(self.delta, self.num_samples)
        else:
            _check_delta_range(self.delta)
        self.events = [self._event(*e) for e in self.events]

    @staticmethod
    def _event(noise_multiplier: float, sample_rate: float, steps: int = 1) -> Event:
        return (_check_noise(noise_multiplier), _check_rate(sample_rate), _check_steps(steps))

    def _merged(self, extra: Sequence[Event] = ()) -> list[Event]:
        merged: list[list] = []
        for s, q, t in [*self.events, *extra]:
            if merged and merged[-1][0] == s and merged[-1][1] == q:
                merged[-1][2] += t  # same mechanism again: one self-composed event
            else:
                merged.append([s, q, t])
        return [(s, q, t) for s, q, t in merged]

    def _epsilon_of(self, events: Sequence[Event]) -> Epsilon:
        eps = _events_epsilon(events, self.delta, self.accountant)
        steps = sum(t for _, _, t in events)
        one = len(events) == 1
        return Epsilon(
            eps,
            self.delta,
            self.accountant,
            self.sampling,
            self.neighbouring,
            events[0][0] if one else None,
            events[0][1] if one else None,
            steps,
        )

    def epsilon(self) -> Epsilon:
        """ε spent so far (0 before any event)."""
        return self._epsilon_of(self._merged())

    def would_spend(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> Epsilon:
        """ε after the given steps, without recording them."""
        return self._epsilon_of(self._merged([self._event(noise_multiplier, sample_rate, steps)]))

    def can_spend(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> bool:
        return self.would_spend(noise_multiplier, sample_rate, steps).value <= self.target_epsilon

    def spend(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> Epsilon:
        """Record ``steps`` steps if the budget allows them; raise :class:`BudgetExceeded` first if not."""
        after = self.would_spend(noise_multiplier, sample_rate, steps)
        if not after.value <= self.target_epsilon:
            spent = self.epsilon()
            raise BudgetExceeded(
                f"refused before spending: {steps} more step(s) at σ={noise_multiplier:g}, "
                f"q={sample_rate:g} would reach ε={after.value:.4g} > budget "
                f"{self.target_epsilon:g} (δ={self.delta:g}, {ACCOUNTANTS[self.accountant]}); "
                f"spent so far: ε={spent.value:.4g} over {spent.steps} steps"
            )
        self.events = self._merged([self._event(noise_multiplier, sample_rate, steps)])
        return after

    def remaining_steps(
        self, noise_multiplier: float, sample_rate: float, limit: int = 10**6
    ) -> int:
        """How many more steps at (σ, q) fit in the budget (binary search over the accountant)."""
        if not self.can_spend(noise_multiplier, sample_rate, 1):
            return 0
        lo, hi = 1, 2
        while hi <= limit and self.can_spend(noise_multiplier, sample_rate, hi):
            lo, hi = hi, hi * 2
        hi = min(hi, limit + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.can_spend(noise_multiplier, sample_rate, mid) else (lo, mid)
        return lo

    def state_dict(self) -> dict[str, Any]:
        """JSON data (for a checkpoint): the configuration and every event."""
        return {
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
            "neighbouring": self.neighbouring,
            "sampling": self.sampling,
            "num_samples": self.num_samples,
            "events": [[s, q, t] for s, q, t in self.events],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`; the configuration must match this ledger's."""
        for key in ("target_epsilon", "delta", "accountant", "neighbouring", "sampling"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"checkpointed ledger has {key}={state.get(key)!r}; this ledger has "
                    f"{getattr(self, key)!r}"
                )
        events = state.get("events")
        if not isinstance(events, list):
            raise ValueError(f"ledger state 'events' must be a list, got {type(events).__name__}")
        parsed = []
        for i, e in enumerate(events):
            if not (isinstance(e, (list, tuple)) and len(e) == 3):
                raise ValueError(f"ledger event {i} is {e!r}; expected [σ, q, steps]")
            parsed.append(self._event(e[0], e[1], e[2]))
        self.events = parsed

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> PrivacyLedger:
        ledger = cls(
            state["target_epsilon"],
            state["delta"],
            state["accountant"],
            state["neighbouring"],
            state["sampling"],
            state.get("num_samples"),
        )
        ledger.load_state_dict(state)
        return ledger
