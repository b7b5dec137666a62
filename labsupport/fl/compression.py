"""Update compression: top-k sparsification with error feedback, stochastic quantization, and both.

Chapter 01 ("communication efficiency") asks how few bytes a client can upload per round and still
train. What is compressed is the client's *update* ``Δ = w_local - w_global``, not its weights: the
update is small and mostly noise-like, the weights are not. Every compressor is an
:class:`~labsupport.fl.transforms.UpdateTransform` in the server's update pipeline
(:class:`~labsupport.fl.server.FedAvgSimulation`'s ``transforms``): for each selected client
``encode`` calls ``compress(Δ, client)``, the payload is serialized
(:func:`~labsupport.fl.serialize.serialize`, whose length is the bytes counted as uploaded) and
deserialized on the server, and ``decode`` calls ``decompress(payload, global_state)`` to get the
estimate ``Ĉ(Δ)`` that is averaged. An update that cannot be compressed (a range that overflows
float32 in quantization) or a payload that does not decode raises ``ValueError``: the server rejects
that client and the round goes on.

* **Top-k sparsification** (Aji & Heafield 2017, "Sparse Communication for Distributed Gradient
  Descent"; Lin et al. 2018, "Deep Gradient Compression"): per tensor, send only the ``k = round(
  fraction * numel)`` entries of largest magnitude (at least one), as (index, value) pairs.
* **Error feedback** (Stich, Cordonnier & Jaggi 2018, "Sparsified SGD with Memory"; also the
  residual accumulation of DGC): what a client did not send is not lost but added to its next update,

      p_t = e_t + Δ_t,      send C(p_t),      e_{t+1} = p_t - C(p_t)  (= e_t + Δ_t - C(e_t + Δ_t))

  so after T rounds ``sum_t C(p_t) + e_T = sum_t Δ_t``: every coordinate is delivered eventually.
  ``e`` is kept per client across rounds (a client that is not selected keeps a stale residual).
* **Stochastic quantization** (Alistarh et al. 2017, QSGD, with per-tensor min/max levels as in
  TernGrad/"stochastic rounding"): with ``L = 2^bits - 1`` levels between ``lo = min x`` and
  ``hi = max x``, ``s = (hi - lo) / L`` and ``v = (x - lo) / s``, send the code ``q = floor(v + u)``
  with ``u ~ U[0, 1)``, i.e. ``ceil(v)`` with probability ``v - floor(v)``. Then
  ``E[lo + s q] = lo + s v = x``: unbiased, with error below one step ``s``.
* **Both**: top-k first, then the kept values are quantized (the indices are sent exactly).

Wire format: one payload entry per tensor *part*, named ``"<tensor>/<part>"``:

==================  =====================================================================
compressor          parts of a floating entry
==================  =====================================================================
NoCompression       ``dense`` (the delta as float32, in the tensor's shape)
TopK                ``idx`` (flat indices, strictly increasing), ``val`` (float32)
StochasticQuantizer ``codes`` (in the tensor's shape), ``lo_scale`` (float32 ``[lo, s]``)
TopKQuantized       ``idx``, ``codes`` (one per index), ``lo_scale``
==================  =====================================================================

Integer and boolean entries (BatchNorm's ``num_batches_tracked``) are sent unchanged as ``"<tensor>/raw"``
in their own dtype. The dtypes are chosen for honest byte counts: indices in the smallest unsigned
type that holds ``numel - 1`` (uint8 up to 256 entries, uint16 up to 65,536, then uint32);
codes as uint8 for ``bits <= 8`` and uint16 up to 16 bits (no bit packing: 4-bit codes still take a
byte -- packing them is an exercise); values and ``lo, s`` as float32 (float16 values would halve
the values again but add their own rounding error; 16-bit models send 16-bit values). ``lo`` and
``s`` share one array because every entry costs header bytes in the safetensors JSON header (its
dtype, shape, byte range, and its name in the metadata), on top of the payload's fixed header with
its SHA-256 digest: at 1% density on the MNIST-1D MLP the headers, not the values, are most of the
payload -- a point the chapter makes with the measured numbers.

Randomness: the stochastic rounding of client ``c``'s ``n``-th call uses a ``torch.Generator``
seeded from ``(seed, c, n)``, and ``state_dict`` holds the call counts and the residuals, so a
simulation resumed from a checkpoint sends exactly the payloads of an uninterrupted one.
The small functions (:func:`topk_sparsify`, :func:`densify`, :func:`quantize_stochastic`,
:func:`dequantize`) are the ones the notebook shows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .clients import RoundContext
from .state import StateDict
from .transforms import UpdateTransform

__all__ = [
    "COMPRESSORS",
    "NoCompression",
    "StochasticQuantizer",
    "TopK",
    "TopKQuantized",
    "code_dtype",
    "densify",
    "dequantize",
    "index_dtype",
    "make_compressor",
    "num_kept",
    "quantize_stochastic",
    "topk_sparsify",
]

MAX_BITS = 16  # codes are stored as uint8 (bits <= 8) or uint16 (bits <= 16)


# ------------------------------------------------------------------------------ small functions


def _check_fraction(fraction: object) -> float:
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float, np.integer, np.floating))
        or not 0.0 < float(fraction) <= 1.0  # also rejects NaN
    ):
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    return float(fraction)


def _check_bits(bits: object) -> int:
    if (
        isinstance(bits, bool)
        or not isinstance(bits, (int, np.integer))
        or not 1 <= bits <= MAX_BITS
    ):
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}")
    return int(bits)


def _check_seed(seed: object, what: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {seed!r}")
    return int(seed)


def num_kept(numel: int, fraction: float) -> int:
    """``k`` for a tensor of ``numel`` entries: ``round(fraction * numel)``, at least 1 (0 if empty)."""
    fraction = _check_fraction(fraction)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return min(numel, max(1, round(fraction * numel)))


def index_dtype(numel: int) -> torch.dtype:
    """The smallest integer dtype that holds every flat index ``0 .. numel - 1``."""
    if numel <= 2**8:
        return torch.uint8
    if numel <= 2**16:
        return torch.uint16
    if numel <= 2**32:
        return torch.uint32
    return torch.int64


def code_dtype(bits: int) -> torch.dtype:
    """Codes of ``bits`` bits are stored one per byte (uint8) or per two bytes (uint16)."""
    return torch.uint8 if _check_bits(bits) <= 8 else torch.uint16


def topk_sparsify(t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` entries of ``t`` of largest magnitude, as (flat indices ascending, values).

    Ties in magnitude go to the lower flat index (a stable sort), so the result is deterministic.
    Indices are int64 here; the compressors store them in :func:`index_dtype` on the wire.
    """
    flat = t.detach().reshape(-1)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= flat.numel():
        raise ValueError(
            f"k must be an integer in 0..{flat.numel()} (the tensor's size), got {k!r}"
        )
    order = torch.sort(flat.abs(), descending=True, stable=True).indices[: int(k)]
    indices = torch.sort(order).values
    return indices, flat[indices]


def densify(indices: torch.Tensor, values: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The tensor of ``shape`` (and ``values``' dtype) that is zero except ``values`` at flat ``indices``."""
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    idx = indices.reshape(-1).to(torch.int64)
    vals = values.reshape(-1)
    if idx.numel() != vals.numel():
        raise ValueError(f"got {idx.numel()} indices but {vals.numel()} values")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
        raise ValueError(
            f"indices must lie in 0..{numel - 1} for shape {shape}, got {int(idx.min())}..{int(idx.max())}"
        )
    out = torch.zeros(numel, dtype=vals.dtype)
    out[idx] = vals
    return out.reshape(shape)


def quantize_stochastic(
    t: torch.Tensor, bits: int = 8, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stochastic rounding of ``t`` to ``2^bits`` levels between its min and max.

    Returns ``(codes, lo, scale)``: ``codes`` in ``t``'s shape (:func:`code_dtype`), ``lo`` and
    ``scale`` as float32 scalars, with ``dequantize(codes, lo, scale)`` an unbiased estimate of ``t``
    whose error is below ``scale`` per entry. A constant tensor gets ``scale = 0`` and is exact.
    """
    bits = _check_bits(bits)
    levels = 2**bits - 1
    x = t.detach().reshape(-1).to(torch.float32)
    if x.numel() == 0:
        lo = hi = torch.tensor(0.0)
    else:
        lo, hi = x.min(), x.max()
    scale = (hi - lo) / levels  # float32: exactly the lo/scale the receiver gets
    if not bool(torch.isfinite(scale)):
        raise ValueError(
            f"cannot quantize values in [{float(lo):.3g}, {float(hi):.3g}]: their range overflows "
            "float32, so no finite step between levels exists"
        )
    # v in float64 so that 16-bit codes are not limited by float32's 24-bit mantissa
    v = (
        (x.double() - lo.double()) / scale.double()
        if scale > 0
        else torch.zeros_like(x, dtype=torch.float64)
    )
    u = torch.rand(x.shape, generator=generator, dtype=torch.float64)
    codes = torch.floor(v + u).clamp_(0, levels)  # clamp: only float rounding at hi can exceed L
    return codes.to(code_dtype(bits)).reshape(t.shape), lo, scale


def dequantize(
    codes: torch.Tensor, lo: torch.Tensor | float, scale: torch.Tensor | float
) -> torch.Tensor:
    """``lo + scale * codes`` in float32: the receiver's estimate of the quantized tensor."""
    lo = torch.as_tensor(lo, dtype=torch.float32)
    scale = torch.as_tensor(scale, dtype=torch.float32)
    return lo + scale * codes.to(torch.float32)


def _stream_seed(seed: int, client: int, call: int) -> int:
    """The seed of client ``client``'s ``call``-th compression: derived, so any call can be replayed."""
    return int(np.random.SeedSequence([seed, client, call]).generate_state(1, dtype=np.uint64)[0])


def _wire_float(dtype: torch.dtype) -> torch.dtype:
    """Values go out as float32, or in the model's own 16-bit dtype (never wider than the model)."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def _work_float(dtype: torch.dtype) -> torch.dtype:
    """Residuals and sums are kept in at least float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------- compressors


class _EntryCompressor(UpdateTransform):
    """The shared loop: entry by entry, raw integer entries, error feedback, call counts, checks.

    A subclass names its ``parts`` and implements ``_encode`` (client side) and ``_decode`` (server
    side, which validates what it is given). The client computes what the server will decode with
    the same ``_decode``, so the residual is exactly ``p - C(p)``.
    """

    parts: tuple[str, ...] = ()

    def __init__(self, *, error_feedback: bool = False, seed: int = 0) -> None:
        self.error_feedback = bool(error_feedback)
        self.seed = _check_seed(seed)
        self.residuals: dict[int, StateDict] = {}  # client -> name -> e (error feedback)
        self.calls: dict[int, int] = {}  # client -> number of compress() calls so far

    # ---- to implement
    def _encode(
        self, x: torch.Tensor, wire: torch.dtype, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _decode(
        self, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], name: str
    ) -> torch.Tensor:
        raise NotImplementedError

    def _config(self) -> dict:
        return {"error_feedback": self.error_feedback, "seed": self.seed}

    def config(self) -> dict:
        return {"name": type(self).__name__, **self._config()}

    # ---- the update pipeline (labsupport.fl.transforms): compressors are transforms
    def encode(
        self, delta: Mapping[str, torch.Tensor], ctx: RoundContext
    ) -> dict[str, torch.Tensor]:
        return self.compress(delta, ctx.client_id)

    def decode(
        self, payload: Mapping[str, torch.Tensor], ctx: RoundContext, global_state: StateDict
    ) -> dict[str, torch.Tensor]:
        return self.decompress(payload, global_state)

    # ---- client side
    def compress(self, delta: Mapping[str, torch.Tensor], client: int) -> dict[str, torch.Tensor]:
        """Client ``client``'s payload for ``delta`` (plus its residual, with error feedback)."""
        client = _check_seed(client, "client")
        if not isinstance(delta, Mapping):
            raise TypeError(
                f"delta is a {type(delta).__name__}; expected a mapping of names to tensors"
            )
        call = self.calls.get(client, 0)
        generator = torch.Generator().manual_seed(_stream_seed(self.seed, client, call))
        residual = self.residuals.get(client, {})
        payload: dict[str, torch.Tensor] = {}
        new_residual: StateDict = {}
        for name, d in delta.items():
            if not isinstance(name, str):
                raise TypeError(f"delta key {name!r} is not a string")
            if not isinstance(d, torch.Tensor):
                raise TypeError(f"delta[{name!r}] is a {type(d).__name__}; expected a tensor")
            d = d.detach().cpu()
            if not d.is_floating_point():
                payload[f"{name}/raw"] = d.clone()  # integer/bool buffers: unchanged, own dtype
                continue
            if not bool(torch.isfinite(d).all()):
                raise ValueError(
                    f"delta[{name!r}] holds {int((~torch.isfinite(d)).sum())} non-finite value(s)"
                )
            p = d.to(_work_float(d.dtype))
            if self.error_feedback and name in residual:
                e = residual[name]
                if e.shape != p.shape:
                    raise ValueError(
                        f"client {client}'s residual for {name!r} has shape {tuple(e.shape)}; "
                        f"the delta has {tuple(p.shape)}"
                    )
                p = p + e.to(p.dtype)
            parts = self._encode(p, _wire_float(d.dtype), generator)
            if self.error_feedback:
                sent = self._decode(parts, tuple(p.shape), name).to(p.dtype)
                new_residual[name] = p - sent  # e_{t+1} = e_t + Δ_t - C(e_t + Δ_t)
            payload.update({f"{name}/{part}": value for part, value in parts.items()})
        # state changes only once the whole payload is built: a failed call leaves it as it was
        self.calls[client] = call + 1
        if self.error_feedback:
            self.residuals[client] = new_residual
        return payload

    # ---- server side
    def decompress(
        self, payload: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]
    ) -> StateDict:
        """The delta estimate from ``payload``: same keys, shapes, dtypes and devices as ``like``."""
        if not isinstance(payload, Mapping):
            raise TypeError(
                f"payload is a {type(payload).__name__}; expected a mapping of names to tensors"
            )
        wanted = {
            name: [f"{name}/{p}" for p in (self.parts if ref.is_floating_point() else ("raw",))]
            for name, ref in like.items()
        }
        missing = [k for keys in wanted.values() for k in keys if k not in payload]
        extra = sorted(set(payload) - {k for keys in wanted.values() for k in keys})
        if missing or extra:
            raise ValueError(
                f"payload does not match the model for {type(self).__name__} (parts {list(self.parts)} per "
                f"floating entry, 'raw' per integer entry): missing {missing}, unexpected {extra}"
            )
        out: StateDict = {}
        for name, ref in like.items():
            shape = tuple(ref.shape)
            if ref.is_floating_point():
                parts = {p: _as_tensor(payload[f"{name}/{p}"], f"{name}/{p}") for p in self.parts}
                value = self._decode(parts, shape, name)
            else:
                value = _as_tensor(payload[f"{name}/raw"], f"{name}/raw")
                if tuple(value.shape) != shape:
                    raise ValueError(
                        f"payload has shape {tuple(value.shape)} for {name!r}; the global model has {shape}"
                    )
            out[name] = value.reshape(shape).to(dtype=ref.dtype, device=ref.device)
        return out

    # ---- checkpoints
    def state_dict(self) -> dict:
        """Config, per-client call counts and residuals (copies), for exact checkpoint/resume."""
        return {
            "kind": type(self).__name__,
            "config": self._config(),
            "calls": {str(c): n for c, n in self.calls.items()},
            "residuals": {
                str(c): {k: v.clone() for k, v in r.items()} for c, r in self.residuals.items()
            },
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a :meth:`state_dict` written by a compressor of the same kind and config."""
        required = {"kind", "config", "calls", "residuals"}
        if not isinstance(state, Mapping) or not required <= set(state):
            raise ValueError(
                f"not a compressor state: expected a mapping with the keys {sorted(required)}"
            )
        mine = (type(self).__name__, self._config())
        saved = (state["kind"], dict(state["config"]))
        if not isinstance(state["calls"], Mapping) or not isinstance(state["residuals"], Mapping):
            raise ValueError("compressor state: 'calls' and 'residuals' must be mappings")
        if saved != mine:
            raise ValueError(
                f"compressor state was saved by {saved[0]}{saved[1]}; this is {mine[0]}{mine[1]}"
            )
        self.calls = {int(c): int(n) for c, n in state["calls"].items()}
        self.residuals = {
            int(c): {k: v.detach().clone() for k, v in r.items()}
            for c, r in state["residuals"].items()
        }

    def reset(self) -> None:
        """Forget residuals and call counts (a fresh run)."""
        self.residuals.clear()
        self.calls.clear()


def _as_tensor(value: object, key: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (np.ndarray, np.generic)):
        return torch.from_numpy(np.array(value))
    raise TypeError(
        f"payload entry {key!r} is a {type(value).__name__}; expected a tensor or array"
    )


def _check_floating(t: torch.Tensor, key: str) -> None:
    if not t.is_floating_point():
        raise ValueError(f"payload entry {key!r} has dtype {t.dtype}; expected a floating dtype")


def _decode_indices(idx: torch.Tensor, numel: int, name: str) -> torch.Tensor:
    """Check a top-k index array (1-D, integer, strictly increasing, in range); return it as int64."""
    key = f"{name}/idx"
    if idx.is_floating_point() or idx.dtype == torch.bool or idx.dim() != 1:
        raise ValueError(
            f"payload entry {key!r} must be a 1-D integer array, got {idx.dtype} {tuple(idx.shape)}"
        )
    idx = idx.to(torch.int64)  # uint16/uint32 support few torch ops
    if idx.numel() > numel:
        raise ValueError(
            f"payload entry {key!r} has {idx.numel()} indices for a tensor of {numel} entries"
        )
    if idx.numel() and (
        int(idx[0]) < 0 or int(idx[-1]) >= numel or not bool((idx[1:] > idx[:-1]).all())
    ):
        raise ValueError(
            f"payload entry {key!r} must be strictly increasing indices in 0..{numel - 1}"
        )
    return idx


def _decode_codes(
    codes: torch.Tensor, lo_scale: torch.Tensor, bits: int, name: str
) -> torch.Tensor:
    """Check codes and ``[lo, scale]``; return the dequantized values (float32, codes' shape)."""
    if codes.is_floating_point() or codes.dtype == torch.bool:
        raise ValueError(
            f"payload entry '{name}/codes' has dtype {codes.dtype}; expected unsigned integer codes"
        )
    codes = codes.to(torch.int64)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 2**bits - 1):
        raise ValueError(
            f"payload entry '{name}/codes' holds values outside 0..{2**bits - 1} ({bits}-bit codes)"
        )
    _check_floating(lo_scale, f"{name}/lo_scale")
    if tuple(lo_scale.shape) != (2,):
        raise ValueError(
            f"payload entry '{name}/lo_scale' has shape {tuple(lo_scale.shape)}; expected (2,)"
        )
    return dequantize(codes, lo_scale[0], lo_scale[1])


class NoCompression(_EntryCompressor):
    """The baseline: the dense delta as float32 (16-bit models: their own dtype). No residual."""

    parts = ("dense",)

    def __init__(self) -> None:
        super().__init__(error_feedback=False, seed=0)

    def _config(self) -> dict:
        return {}

    def _encode(
        self, x: torch.Tensor, wire: torch.dtype, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        return {"dense": x.to(wire)}

    def _decode(
        self, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], name: str
    ) -> torch.Tensor:
        dense = parts["dense"]
        _check_floating(dense, f"{name}/dense")
        if tuple(dense.shape) != shape:
            raise ValueError(
                f"payload has shape {tuple(dense.shape)} for {name!r}; the global model has {shape}"
            )
        return dense


class TopK(_EntryCompressor):
    """Per tensor, the ``round(fraction * numel)`` (>= 1) largest-magnitude entries of ``e + Δ``.

    With ``error_feedback`` (the default) the rest is kept as the client's residual ``e`` and added to
    its next update (Stich et al. 2018); without it, it is dropped.
    """

    parts = ("idx", "val")

    def __init__(self, fraction: float, error_feedback: bool = True) -> None:
        super().__init__(error_feedback=error_feedback, seed=0)
        self.fraction = _check_fraction(fraction)

    def _config(self) -> dict:
        return {"fraction": self.fraction, "error_feedback": self.error_feedback}

    def _encode(
        self, x: torch.Tensor, wire: torch.dtype, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        idx, val = topk_sparsify(x, num_kept(x.numel(), self.fraction))
        return {"idx": idx.to(index_dtype(x.numel())), "val": val.to(wire)}

    def _decode(
        self, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], name: str
    ) -> torch.Tensor:
        idx = _decode_indices(parts["idx"], math.prod(shape), name)
        val = parts["val"]
        _check_floating(val, f"{name}/val")
        if tuple(val.shape) != tuple(idx.shape):
            raise ValueError(
                f"payload has {idx.numel()} indices but values of shape {tuple(val.shape)} for {name!r}"
            )
        return densify(idx, val, shape)


class StochasticQuantizer(_EntryCompressor):
    """Every entry, stochastically rounded to ``2^bits`` levels between the tensor's min and max.

    Unbiased (``E[Ĉ(Δ)] = Δ``), so it needs no error feedback; ``error_feedback=True`` is offered for
    comparison. The rounding of client ``c``'s ``n``-th call is seeded by ``(seed, c, n)``.
    """

    parts = ("codes", "lo_scale")

    def __init__(self, bits: int = 8, seed: int = 0, *, error_feedback: bool = False) -> None:
        super().__init__(error_feedback=error_feedback, seed=seed)
        self.bits = _check_bits(bits)

    def _config(self) -> dict:
        return {"bits": self.bits, "error_feedback": self.error_feedback, "seed": self.seed}

    def _encode(
        self, x: torch.Tensor, wire: torch.dtype, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        codes, lo, scale = quantize_stochastic(x, self.bits, generator)
        return {"codes": codes, "lo_scale": torch.stack([lo, scale])}

    def _decode(
        self, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], name: str
    ) -> torch.Tensor:
        codes = parts["codes"]
        if tuple(codes.shape) != shape:
            raise ValueError(
                f"payload has codes of shape {tuple(codes.shape)} for {name!r}; the global model has {shape}"
            )
        return _decode_codes(codes, parts["lo_scale"], self.bits, name)


class TopKQuantized(_EntryCompressor):
    """Top-k (with error feedback by default), then the kept values stochastically quantized.

    The residual holds both what top-k dropped and the quantization error of what it kept.
    """

    parts = ("idx", "codes", "lo_scale")

    def __init__(
        self, fraction: float, bits: int = 8, error_feedback: bool = True, seed: int = 0
    ) -> None:
        super().__init__(error_feedback=error_feedback, seed=seed)
        self.fraction = _check_fraction(fraction)
        self.bits = _check_bits(bits)

    def _config(self) -> dict:
        return {
            "fraction": self.fraction,
            "bits": self.bits,
            "error_feedback": self.error_feedback,
            "seed": self.seed,
        }

    def _encode(
        self, x: torch.Tensor, wire: torch.dtype, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        idx, val = topk_sparsify(x, num_kept(x.numel(), self.fraction))
        codes, lo, scale = quantize_stochastic(val, self.bits, generator)
        return {
            "idx": idx.to(index_dtype(x.numel())),
            "codes": codes,
            "lo_scale": torch.stack([lo, scale]),
        }

    def _decode(
        self, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], name: str
    ) -> torch.Tensor:
        idx = _decode_indices(parts["idx"], math.prod(shape), name)
        codes = parts["codes"]
        if tuple(codes.shape) != tuple(idx.shape):
            raise ValueError(
                f"payload has {idx.numel()} indices but codes of shape {tuple(codes.shape)} for {name!r}"
            )
        return densify(idx, _decode_codes(codes, parts["lo_scale"], self.bits, name), shape)


COMPRESSORS: dict[str, str] = {
    "none": "NoCompression(): dense float32 deltas (the baseline)",
    "topk": "TopK(fraction, error_feedback=True): top-k per tensor with error feedback",
    "quant8": "StochasticQuantizer(bits=8, seed=0): unbiased 8-bit stochastic rounding",
    "topk+quant8": "TopKQuantized(fraction, bits=8, error_feedback=True, seed=0): both",
}


def make_compressor(name: str, **kw: object) -> UpdateTransform:
    """A compressor by name (see :data:`COMPRESSORS`); ``kw`` go to its constructor.

    ``make_compressor("topk", fraction=0.01)``, ``make_compressor("quant8", seed=1)``.
    """
    if name not in COMPRESSORS:
        raise ValueError(f"unknown compressor {name!r}; expected one of {sorted(COMPRESSORS)}")
    if name in ("quant8", "topk+quant8"):
        bits = kw.pop("bits", 8)
        if bits != 8:
            raise ValueError(
                f"{name!r} is 8-bit, got bits={bits!r}; build StochasticQuantizer/TopKQuantized directly"
            )
        kw["bits"] = 8
    builders = {
        "none": NoCompression,
        "topk": TopK,
        "quant8": StochasticQuantizer,
        "topk+quant8": TopKQuantized,
    }
    return builders[name](**kw)
