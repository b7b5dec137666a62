"""User-level DP for federated learning: DP-FedAvg (McMahan, Ramage, Talwar & Zhang, ICLR 2018).

DP-SGD protects one *example*; in FL the unit to protect is one *client* (all its data). DP-FedAvg
(Algorithm 1 of the paper, the "fixed-size federation" estimator f̃_f) does, each round:

    Δ_k  ← Δ_k · min(1, S / ‖Δ_k‖₂)                       client k clips its update to norm S
    Δ    ← Σ_{k ∈ C_t} Δ_k / m                              sum over the round's clients, divided by
                                                            the EXPECTED number m = qK, not |C_t|
    w   ← w + Δ + N(0, (σ S / m)² I)                        Gaussian noise on the average

with clients sampled independently with probability q = m / K. One client then moves the average by
at most S/m, the noise is σ times that, and the accountant for the subsampled Gaussian mechanism
(:mod:`labsupport.privacy.accounting`) gives a *user-level* (ε, δ) with q = clients per round / total.

The pieces, as core :class:`~labsupport.fl.transforms.UpdateTransform` objects and an
:class:`~labsupport.fl.aggregators.Aggregator`:

* :class:`ClipUpdate` -- client side (``encode``): clip the update to norm S; server side (``decode``)
  rejects a payload whose norm exceeds S (a client that skipped the clipping).
* :class:`FixedDenominatorMean` -- the aggregator: ``Σ Δ_k / m``. FedAvg's sample-weighted mean would
  let a client's weight ``n_k / n`` (and its claimed ``n_k``) scale its influence; with clipping the
  sensitivity bound S/m needs bounded, equal weights and a fixed denominator.
* :class:`ServerGaussianNoise` -- server side (``finalize``): add N(0, (σS/m)²) to the new global
  model, after charging the round to a :class:`~labsupport.privacy.accounting.PrivacyLedger` (a round
  that would exceed the budget is refused before its model is released).
* :class:`ClientClipAndNoise` -- the client-side-noise variant (distributed DP): each client clips
  and adds N(0, σ²S²/m) itself, so the sum of m honest clients carries σS of noise. It needs no
  trusted server for the noise, but only holds if m clients really take part; with fewer, less noise
  (secure aggregation, the next section, is what keeps the server from seeing each noisy update).
* :func:`user_level_epsilon` -- ε after a number of rounds, with client sampling amplification
  (Poisson: q = m/K) or for the server's fixed-size sampling without replacement
  (:func:`labsupport.fl.selection.select_clients`), which dp_accounting's RDP bounds under the
  replace-one relation. Amplification by sampling assumes the sample is *secret and random*: if the
  adversary knows who took part (a public seed, a predictable schedule), only the unamplified ε
  holds (:func:`flower_epsilon` is that number, the only one Flower 1.42's accountant gives).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from labsupport.fl.aggregators import Aggregator
from labsupport.fl.clients import FitReply, RoundContext
from labsupport.fl.state import StateDict, aggregate
from labsupport.fl.transforms import UpdateTransform

from .accounting import (
    USER_LEVEL,
    BudgetExceeded,
    Epsilon,
    PrivacyLedger,
    _check_delta_range,
    _check_noise,
    compute_epsilon,
)

__all__ = [
    "ClientClipAndNoise",
    "ClipUpdate",
    "FixedDenominatorMean",
    "ServerGaussianNoise",
    "clip_update",
    "flower_epsilon",
    "update_norm",
    "user_level_epsilon",
]


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def update_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """L2 norm over every floating entry of an update (integer buffers are values, not differences)."""
    total = sum(float(v.double().pow(2).sum()) for v in delta.values() if v.is_floating_point())
    return math.sqrt(total)


def clip_update(
    delta: Mapping[str, torch.Tensor], clip_norm: float
) -> tuple[dict[str, torch.Tensor], float]:
    """``Δ · min(1, S / ‖Δ‖)`` over the floating entries; returns the clipped update and ‖Δ‖."""
    s = _positive("clip_norm", clip_norm)
    norm = update_norm(delta)
    factor = min(1.0, s / norm) if norm > 0 else 1.0
    out = {
        k: (v * factor).to(v.dtype) if v.is_floating_point() else v.clone()
        for k, v in delta.items()
    }
    return out, norm


class ClipUpdate(UpdateTransform):
    """Client: clip the update to norm S. Server: reject a payload whose norm exceeds S (+ tolerance)."""

    def __init__(self, clip_norm: float, *, tolerance: float = 1e-4) -> None:
        self.clip_norm = _positive("clip_norm", clip_norm)
        self.tolerance = float(tolerance)

    def encode(
        self, delta: Mapping[str, torch.Tensor], ctx: RoundContext
    ) -> dict[str, torch.Tensor]:
        return clip_update(delta, self.clip_norm)[0]

    def decode(
        self, payload: Mapping[str, torch.Tensor], ctx: RoundContext, global_state: StateDict
    ) -> dict[str, torch.Tensor]:
        norm = update_norm(payload)
        if norm > self.clip_norm * (1 + self.tolerance):
            raise ValueError(
                f"update norm {norm:.4g} exceeds the clip norm S={self.clip_norm:g}: the client did "
                "not clip, and its update would break the sensitivity bound"
            )
        return dict(payload)

    def config(self) -> dict[str, Any]:
        return {"name": "ClipUpdate", "clip_norm": self.clip_norm, "tolerance": self.tolerance}


class FixedDenominatorMean(Aggregator):
    """``w + Σ_k Δ_k / m`` with m = the *expected* clients per round (McMahan et al. 2018, f̃_f).

    Every client has weight 1 whatever its claimed sample count, and the denominator does not depend
    on who replied: one client moves the result by at most S/m. Integer buffers take the unweighted
    mean of the replies. With a ``ledger`` (and ``noise_multiplier``/``sample_rate``), a round that
    the budget cannot afford is refused in :meth:`instructions`, before any client trains.
    """

    def __init__(
        self,
        expected_clients: float,
        *,
        ledger: PrivacyLedger | None = None,
        noise_multiplier: float | None = None,
        sample_rate: float | None = None,
    ) -> None:
        self.expected_clients = _positive("expected_clients", expected_clients)
        if ledger is not None and (noise_multiplier is None or sample_rate is None):
            raise ValueError("a ledger needs noise_multiplier and sample_rate to price a round")
        self.ledger = ledger
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate

    def instructions(self, server_round: int, global_state: StateDict) -> dict[str, Any]:
        if self.ledger is not None and not self.ledger.can_spend(
            self.noise_multiplier, self.sample_rate, 1
        ):
            after = self.ledger.would_spend(self.noise_multiplier, self.sample_rate, 1)
            raise BudgetExceeded(
                f"round {server_round} refused before it started: it would reach "
                f"ε={after.value:.4g} > budget {self.ledger.target_epsilon:g}"
            )
        return {}

    def aggregate(self, global_state: StateDict, replies: Sequence[FitReply]) -> StateDict:
        if not replies:
            raise ValueError("cannot aggregate an empty round")
        out: StateDict = {}
        ints = aggregate([r.state for r in replies], [1.0] * len(replies))
        for key, ref in global_state.items():
            if ref.is_floating_point():
                total = sum(
                    (r.state[key].double() - ref.double() for r in replies),
                    torch.zeros_like(ref, dtype=torch.float64),
                )
                out[key] = (ref.double() + total / self.expected_clients).to(ref.dtype)
            else:
                out[key] = ints[key]
        return out

    def config(self) -> dict[str, Any]:
        return {
            "name": "FixedDenominatorMean",
            "expected_clients": self.expected_clients,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "ledger": None
            if self.ledger is None
            else {k: v for k, v in self.ledger.state_dict().items() if k != "events"},
        }


class ServerGaussianNoise(UpdateTransform):
    """Server: add N(0, (σ S / m)²) to every floating entry of the aggregated model (``finalize``).

    The noise of round t comes from a generator seeded with ``(seed, t)``: a resumed run draws the
    same noise. With a ``ledger`` the round is charged (σ, q = ``sample_rate``, 1 step) *before* the
    noise is added; if the budget cannot afford it, :class:`BudgetExceeded` is raised and nothing is
    released. The ledger's events travel in :meth:`state_dict` (JSON), so checkpoints keep them.
    """

    def __init__(
        self,
        noise_multiplier: float,
        clip_norm: float,
        expected_clients: float,
        *,
        seed: int = 0,
        ledger: PrivacyLedger | None = None,
        sample_rate: float | None = None,
    ) -> None:
        self.noise_multiplier = _check_noise(noise_multiplier)
        self.clip_norm = _positive("clip_norm", clip_norm)
        self.expected_clients = _positive("expected_clients", expected_clients)
        if ledger is not None and sample_rate is None:
            raise ValueError("a ledger needs the client sample_rate q to price a round")
        self.seed = int(seed)
        self.ledger = ledger
        self.sample_rate = sample_rate
        self.rounds_noised: list[int] = []

    @property
    def std(self) -> float:
        """σ S / m: the noise on the average."""
        return self.noise_multiplier * self.clip_norm / self.expected_clients

    def finalize(
        self, global_state: StateDict, new_state: StateDict, server_round: int
    ) -> StateDict:
        if self.ledger is not None:
            self.ledger.spend(self.noise_multiplier, self.sample_rate, 1)  # raises before release
        gen = torch.Generator().manual_seed(hash((self.seed, int(server_round))) % 2**63)
        out = {}
        for k, v in new_state.items():
            if v.is_floating_point():
                noise = torch.normal(0.0, self.std, v.shape, generator=gen, dtype=torch.float64)
                out[k] = (v.double() + noise).to(v.dtype)
            else:
                out[k] = v
        self.rounds_noised.append(int(server_round))
        return out

    def config(self) -> dict[str, Any]:
        return {
            "name": "ServerGaussianNoise",
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "expected_clients": self.expected_clients,
            "seed": self.seed,
            "sample_rate": self.sample_rate,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "rounds_noised": list(self.rounds_noised),
            "ledger": None if self.ledger is None else self.ledger.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        rounds = state.get("rounds_noised", [])
        if not isinstance(rounds, list) or not all(isinstance(r, int) for r in rounds):
            raise ValueError(f"rounds_noised must be a list of ints, got {rounds!r}")
        self.rounds_noised = list(rounds)
        if state.get("ledger") is not None:
            if self.ledger is None:
                raise ValueError(
                    "the checkpoint holds a privacy ledger but this transform has none"
                )
            self.ledger.load_state_dict(state["ledger"])


class ClientClipAndNoise(UpdateTransform):
    """The client-side-noise variant: clip to S, add N(0, σ² S² / m) on the client (``encode``).

    Summed over m clients the noise is N(0, σ² S²), so the fixed-denominator mean carries σS/m as in
    :class:`ServerGaussianNoise` -- if m honest clients take part. The server never adds noise, so it
    need not be trusted to; but it sees each noisy update, whose own noise is only σS/√m.
    The noise generator is seeded from the round's ``ctx.seed``.
    """

    def __init__(self, noise_multiplier: float, clip_norm: float, expected_clients: float) -> None:
        self.noise_multiplier = _check_noise(noise_multiplier)
        self.clip_norm = _positive("clip_norm", clip_norm)
        self.expected_clients = _positive("expected_clients", expected_clients)

    @property
    def std(self) -> float:
        """σ S / √m: each client's own noise."""
        return self.noise_multiplier * self.clip_norm / math.sqrt(self.expected_clients)

    def encode(
        self, delta: Mapping[str, torch.Tensor], ctx: RoundContext
    ) -> dict[str, torch.Tensor]:
        clipped, _ = clip_update(delta, self.clip_norm)
        gen = torch.Generator().manual_seed((int(ctx.seed) ^ 0xD1FF) % 2**63)
        return {
            k: (
                v.double()
                + torch.normal(0.0, self.std, v.shape, generator=gen, dtype=torch.float64)
            ).to(v.dtype)
            if v.is_floating_point()
            else v
            for k, v in clipped.items()
        }

    def config(self) -> dict[str, Any]:
        return {
            "name": "ClientClipAndNoise",
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "expected_clients": self.expected_clients,
        }


# -------------------------------------------------------------------------------------- accounting


def user_level_epsilon(
    noise_multiplier: float,
    clients_per_round: int,
    num_clients: int,
    rounds: int,
    delta: float,
    *,
    sampling: str = "poisson",
    accountant: str = "opacus_prv",
) -> Epsilon:
    """User-level ε of ``rounds`` DP-FedAvg rounds with q = ``clients_per_round / num_clients``.

    ``sampling="poisson"``: each client joins independently with probability q (what the paper and
    the Opacus/dp_accounting accountants assume; add/remove-one-client neighbours).
    ``sampling="fixed_size"``: exactly m of K without replacement, as
    :func:`labsupport.fl.selection.select_clients` does; dp_accounting's RDP bounds this for
    replace-one-client neighbours (``accountant`` is then always ``dpa_rdp``).
    ``sampling="none"``: no amplification (every round counted as if all clients' data were used,
    what holds when the sample is not secret).
    """
    if not (isinstance(num_clients, int) and num_clients >= 1):
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if not (isinstance(clients_per_round, int) and 1 <= clients_per_round <= num_clients):
        raise ValueError(
            f"clients_per_round must be an integer in [1, num_clients={num_clients}], got "
            f"{clients_per_round!r}"
        )
    s = _check_noise(noise_multiplier)
    d = _check_delta_range(delta)
    q = clients_per_round / num_clients
    if sampling == "poisson":
        eps = compute_epsilon(s, q, rounds, d, accountant, neighbouring=USER_LEVEL)
        return Epsilon(
            eps.value, d, accountant, f"Poisson client (q={q:g})", USER_LEVEL, s, q, rounds
        )
    if sampling == "none":
        eps = compute_epsilon(s, 1.0, rounds, d, accountant, neighbouring=USER_LEVEL)
        return Epsilon(
            eps.value,
            d,
            accountant,
            "no amplification (sample not secret)",
            USER_LEVEL,
            s,
            1.0,
            rounds,
        )
    if sampling == "fixed_size":
        import dp_accounting
        from dp_accounting import rdp

        acc = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        event = dp_accounting.SampledWithoutReplacementDpEvent(
            num_clients, clients_per_round, dp_accounting.GaussianDpEvent(s)
        )
        acc.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
        return Epsilon(
            float(acc.get_epsilon(d)),
            d,
            "dpa_rdp",
            f"fixed-size client ({clients_per_round} of {num_clients}, without replacement)",
            "replace one client (user-level)",
            s,
            q,
            rounds,
        )
    raise ValueError(f"sampling must be 'poisson', 'fixed_size' or 'none', got {sampling!r}")


def flower_epsilon(
    noise_multiplier: float, clients_per_round: int, num_clients: int, rounds: int, delta: float
) -> Epsilon:
    """ε from Flower 1.42's own ``RdpAccountant`` as its DP strategy wrappers accept it.

    The fixed-clipping wrappers accept only ``sampling_method='no-amplification'``: the ε carries no
    client-sampling amplification, whatever fraction of clients a round uses.
    """
    from flwr.serverapp import PrivacyConfig, RdpAccountant, SamplingMethod
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, NeighboringRelation

    config = PrivacyConfig(
        target_delta=_check_delta_range(delta),
        population_size=num_clients,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
    )
    acc = RdpAccountant(config)
    s = _check_noise(noise_multiplier)
    if rounds > 0:
        acc.compose(GaussianPrivacyEvent(s, clients_per_round, num_clients), count=rounds)
    eps = acc.get_privacy_spent().epsilon if rounds > 0 else 0.0
    return Epsilon(
        float(eps),
        float(delta),
        "Flower 1.42 RdpAccountant",
        "no amplification (Flower accepts nothing else)",
        USER_LEVEL,
        s,
        clients_per_round / num_clients,
        rounds,
    )
