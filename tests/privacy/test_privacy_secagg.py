"""Secure aggregation: the unmasked sum against numpy, dropouts at every stage, and hostile input."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from scipy import stats

from labsupport.privacy import secagg_wire as wire
from labsupport.privacy.secagg import (
    MalformedMessage,
    SecAggAbort,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    client_seed,
    run_protocol,
)
from labsupport.privacy.secagg_masking import (
    check_wraparound,
    clip_to_norm,
    decode_sum,
    encode_fixed,
    harary_graph,
    quantization_bound,
)


def _inputs(n: int, length: int, seed: int = 0, scale: float = 0.1) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=scale, size=(n, length))


def _plain_sum(x: np.ndarray, rows, clip: float, weights=None) -> np.ndarray:
    w = np.ones(len(x)) if weights is None else np.asarray(weights)
    return sum(w[i] * clip_to_norm(x[i], clip) for i in rows)


# --- encoding -----------------------------------------------------------------------------------


def test_fixed_point_round_trip_is_within_one_unit_and_unbiased():
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.5, 0.5, size=20_000)
    enc = encode_fixed(x, 1.0, clip=1e9, frac_bits=4, bits=32, rng=rng)
    back = decode_sum(enc, 4, 32)
    assert np.abs(back[:-1] - x).max() < 1 / 16
    assert back[-1] == 1.0  # the weight coordinate
    assert abs(float((back[:-1] - x).mean())) < 3 * (1 / 16) / np.sqrt(
        len(x)
    )  # stochastic rounding


def test_negative_values_are_twos_complement_mod_2_to_the_bits():
    enc = encode_fixed(
        np.array([-1.0]), 1.0, clip=10, frac_bits=0, bits=16, rng=np.random.default_rng(0)
    )
    assert enc.tolist() == [2**16 - 1, 1]
    assert decode_sum(enc, 0, 16).tolist() == [-1.0, 1.0]


def test_clipping_bounds_the_l2_norm():
    x = np.array([3.0, 4.0])
    assert np.allclose(clip_to_norm(x, 1.0), [0.6, 0.8])
    assert np.array_equal(clip_to_norm(x, 10.0), x)


def test_wraparound_guard_raises_when_n_clip_2f_would_overflow():
    check_wraparound(1000, 1.0, 16, 32)  # 1000 * 2^16 ~ 2^26 fits below 2^31
    with pytest.raises(ValueError, match="wrap around"):
        check_wraparound(2**15, 1.0, 16, 32)
    with pytest.raises(ValueError, match="wrap around"):
        check_wraparound(1000, 1.0, 54, 64)
    with pytest.raises(ValueError, match="wrap around"):
        SecAggParams(100, 4, clip=2.0**20, frac_bits=16, bits=32)
    with pytest.raises(ValueError, match="wrap around"):
        SecAggParams(10, 4, clip=1.0, max_weight=2.0**50, frac_bits=16, bits=64)


def test_the_guard_is_tight_a_sum_at_the_bound_still_decodes():
    # bits 8, 2 fractional bits, clip 1: 25 clients * (4 + 1) = 125 < 128 is allowed, 26 are not.
    with pytest.raises(ValueError, match="wrap around"):
        SecAggParams(26, 1, clip=1.0, frac_bits=2, bits=8, threshold=14)
    params = SecAggParams(25, 1, clip=1.0, frac_bits=2, bits=8, threshold=13)
    out = run_protocol(np.ones((25, 1)), params)
    assert out.total.tolist() == [25.0]
    assert out.weight_sum == 25.0


# --- the protocol ---------------------------------------------------------------------------------


@pytest.mark.parametrize("degree", [None, 4])
def test_unmasked_sum_equals_the_plain_sum_without_dropouts(degree):
    n, length = 8, 50
    x = _inputs(n, length)
    params = SecAggParams(n, length, clip=0.5, degree=degree, frac_bits=20)
    out = run_protocol(x, params, seed=3)
    assert out.survivors == tuple(range(n)) and out.dropped == ()
    assert np.abs(out.total - _plain_sum(x, range(n), 0.5)).max() <= quantization_bound(n, 20)
    assert out.weight_sum == n


@pytest.mark.parametrize("degree", [None, 6])
@pytest.mark.parametrize("stage", ["advertise", "shares", "masked"])
def test_unmasked_sum_is_right_with_dropouts_at_each_stage(stage, degree):
    n, length = 10, 40
    x = _inputs(n, length, seed=1)
    params = SecAggParams(n, length, clip=1.0, degree=degree, threshold=5 if degree else 6)
    gone = [2, 7]
    out = run_protocol(x, params, dropouts={stage: gone}, seed=4)
    included = [u for u in range(n) if stage == "masked" or u not in gone]
    assert list(out.survivors) == included
    assert list(out.dropped) == (gone if stage == "shares" else [])
    assert np.abs(out.total - _plain_sum(x, included, 1.0)).max() <= quantization_bound(n, 16)


def test_dropouts_at_every_stage_at_once_with_32_bit_arithmetic():
    n, length = 12, 30
    x = _inputs(n, length, seed=2)
    params = SecAggParams(n, length, clip=1.0, bits=32, frac_bits=12, threshold=7)
    out = run_protocol(x, params, dropouts={"advertise": [0], "shares": [5, 6], "masked": [11]})
    included = [u for u in range(n) if u not in (0, 5, 6)]
    assert np.abs(out.total - _plain_sum(x, included, 1.0)).max() <= quantization_bound(n, 12)


def test_weighted_sum_gives_fedavgs_weighted_mean():
    n, length = 6, 20
    x = _inputs(n, length, seed=5)
    w = np.array([10.0, 200.0, 35.0, 1.0, 50.0, 80.0])
    params = SecAggParams(n, length, clip=1.0, max_weight=200.0, frac_bits=20)
    out = run_protocol(x, params, weights=w, dropouts={"shares": [3]})
    keep = [0, 1, 2, 4, 5]
    expected = np.average(
        np.stack([clip_to_norm(x[i], 1.0) for i in keep]), axis=0, weights=w[keep]
    )
    assert out.weight_sum == pytest.approx(w[keep].sum(), abs=1e-5)
    assert np.abs(out.mean - expected).max() < 1e-5


def test_a_weight_above_max_weight_is_refused():
    params = SecAggParams(3, 2, max_weight=10.0)
    with pytest.raises(ValueError, match="max_weight"):
        run_protocol(np.zeros((3, 2)), params, weights=[1.0, 11.0, 1.0])


def test_fewer_than_t_survivors_fails_clearly_instead_of_a_wrong_sum():
    n = 6
    params = SecAggParams(n, 5, threshold=4)
    with pytest.raises(SecAggAbort, match="threshold t = 4"):
        run_protocol(_inputs(n, 5), params, dropouts={"shares": [0, 1, 2]})
    with pytest.raises(SecAggAbort, match="threshold t = 4"):
        run_protocol(_inputs(n, 5), params, dropouts={"masked": [0, 1, 2]})
    with pytest.raises(SecAggAbort, match="threshold t = 4"):
        run_protocol(_inputs(n, 5), params, dropouts={"advertise": [0, 1, 2]})


def test_secagg_plus_aborts_when_one_neighbourhood_loses_too_many_shareholders():
    n = 10
    params = SecAggParams(n, 5, degree=4, threshold=4)  # groups of 5, 4 shares needed
    victim = 0
    neighbours = list(params.graph[victim])
    with pytest.raises(SecAggAbort, match="threshold t = 4"):
        run_protocol(_inputs(n, 5), params, dropouts={"masked": neighbours[:2]})


def test_single_masked_vector_is_indistinguishable_from_uniform():
    # Client 0's message for x = 0: chi-square on the top 8 bits, and KS on the residues / 2^64.
    n, length = 3, 4096
    params = SecAggParams(n, length, clip=1.0)
    clients = [SecAggClient(u, params, client_seed(11, 0, u)) for u in range(n)]
    server = SecAggServer(params)
    key_list = server.key_list({u: c.advertise() for u, c in enumerate(clients)})
    forwards = server.forward_shares({u: c.share_keys(key_list) for u, c in enumerate(clients)})
    _, body = wire.unpack(clients[0].masked_input(forwards[0], np.zeros(length)), 5, 0, n)
    y = wire.parse_masked(body, 64, length + 1)
    counts = np.bincount((y >> np.uint64(56)).astype(np.int64), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-3  # false alarm rate 0.1%, fixed seed
    assert stats.kstest(y.astype(np.float64) / 2.0**64, "uniform").pvalue > 1e-3
    # the same tests do detect the unmasked encoding
    plain = encode_fixed(
        np.zeros(length), 1.0, clip=1.0, frac_bits=16, bits=64, rng=np.random.default_rng(0)
    )
    plain_counts = np.bincount((plain >> np.uint64(56)).astype(np.int64), minlength=256)
    assert stats.chisquare(plain_counts).pvalue < 1e-10


def test_threshold_above_n_or_not_above_half_is_refused():
    with pytest.raises(ValueError, match="above the group size"):
        SecAggParams(5, 3, threshold=6)
    with pytest.raises(ValueError, match="more than half"):
        SecAggParams(6, 3, threshold=3)
    with pytest.raises(ValueError, match="more than half"):
        SecAggParams(6, 3, threshold=2)
    with pytest.raises(ValueError, match="more than half"):
        SecAggParams(20, 3, degree=4, threshold=2)  # per neighbourhood of 5
    assert SecAggParams(6, 3, threshold=4).t == 4
    assert SecAggParams(6, 3).t == 4  # default max(floor(m/2) + 1, ceil(2m/3))
    with pytest.raises(ValueError, match="at least 2 clients"):
        SecAggParams(1, 3)


def test_mismatched_vector_lengths_are_refused():
    n = 3
    params = SecAggParams(n, 4)
    with pytest.raises(ValueError, match="shape"):
        run_protocol(np.zeros((n, 5)), params)
    clients = [SecAggClient(u, params, client_seed(0, 0, u)) for u in range(n)]
    server = SecAggServer(params)
    kl = server.key_list({u: c.advertise() for u, c in enumerate(clients)})
    fw = server.forward_shares({u: c.share_keys(kl) for u, c in enumerate(clients)})
    with pytest.raises(ValueError, match="has 5 entries"):
        clients[0].masked_input(fw[0], np.zeros(5))
    longer = SecAggClient(1, SecAggParams(n, 5), client_seed(0, 0, 1))  # same keys, other length
    longer._keys, longer._held = clients[1]._keys, clients[1]._held
    other = longer.masked_input(fw[1], np.zeros(5))
    good = {
        0: clients[0].masked_input(fw[0], np.zeros(4)),
        2: clients[2].masked_input(fw[2], np.zeros(4)),
    }
    with pytest.raises(MalformedMessage, match="vector length 6"):
        server.unmask_request({**good, 1: other})


def test_harary_graph_is_regular_symmetric_and_seeded():
    g = harary_graph(20, 6, seed=3)
    assert all(len(nb) == 6 for nb in g)
    assert all(u in g[v] for u in range(20) for v in g[u])
    assert all(u not in g[u] for u in range(20))
    assert g == harary_graph(20, 6, seed=3) and g != harary_graph(20, 6, seed=4)
    assert harary_graph(5, None, 0) == [tuple(v for v in range(5) if v != u) for u in range(5)]
    with pytest.raises(ValueError, match="even"):
        harary_graph(10, 3, 0)


# --- hostile messages -----------------------------------------------------------------------------


class _Round:
    """A round stopped after the masked inputs, for tampering with messages."""

    def __init__(self, n: int = 4, length: int = 6) -> None:
        self.params = SecAggParams(n, length, bits=32, frac_bits=8, threshold=3)
        self.clients = [SecAggClient(u, self.params, client_seed(5, 0, u)) for u in range(n)]
        self.server = SecAggServer(self.params)
        self.ads = {u: c.advertise() for u, c in enumerate(self.clients)}
        self.key_list = self.server.key_list(self.ads)
        self.shares = {u: c.share_keys(self.key_list) for u, c in enumerate(self.clients)}
        self.forwards = self.server.forward_shares(self.shares)
        x = np.zeros(length)
        self.masked = {u: c.masked_input(self.forwards[u], x) for u, c in enumerate(self.clients)}


def _request(params: SecAggParams, alive: list[int], dropped: list[int]) -> bytes:
    return wire.pack(
        wire.MsgType.UNMASK_REQ, 0, wire.SERVER, wire.unmask_request_body(alive, dropped)
    )


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda m: m[:10], "shorter than the 16-byte header"),
        (lambda m: b"XX" + m[2:], "bad magic"),
        (lambda m: m[:2] + b"\x02" + m[3:], "version 2"),
        (lambda m: m[:3] + b"\x07" + m[4:], "expected a ADVERTISE message, got UNMASK"),
        (lambda m: m[:4] + struct.pack("<I", 9) + m[8:], "for round 9"),
        (lambda m: m + b"\x00", "header declares a 64-byte body, but 65"),
        (lambda m: m[:-1], "header declares a 64-byte body, but 63"),
        (lambda m: m[:12] + struct.pack("<I", 63) + m[16:-1], "two 32-byte public keys"),
        (
            lambda m: m[:8] + struct.pack("<I", 3) + m[12:],
            "arrived from client 0 but names client 3",
        ),
        (lambda m: m[:8] + struct.pack("<I", 99) + m[12:], "sender 99 is not a client"),
        (lambda m: "not bytes", "expected bytes"),
    ],
)
def test_malformed_advertisements_are_rejected(tamper, message):
    params = SecAggParams(4, 3, threshold=3)
    good = SecAggClient(0, params, b"k").advertise()
    with pytest.raises(MalformedMessage, match=message):
        SecAggServer(params).key_list({0: tamper(good)})


def test_tampered_share_ciphertext_fails_authentication():
    r = _Round()
    fw = bytearray(r.forwards[1])
    fw[-5] ^= 1
    with pytest.raises(MalformedMessage, match="fail authentication"):
        r.clients[1].masked_input(bytes(fw), np.zeros(6))


def test_share_counts_and_ids_are_checked():
    r = _Round()
    body = wire.ciphertexts_body({1: bytes(wire.CIPHERTEXT_BYTES)})
    too_many = body[:0] + struct.pack("<I", 2) + body[4:]
    with pytest.raises(MalformedMessage, match="2 entries"):
        wire.parse_ciphertexts(too_many, 4, "SHARES")
    dup = struct.pack("<I", 2) + body[4:] + body[4:]
    with pytest.raises(MalformedMessage, match="appears twice"):
        wire.parse_ciphertexts(dup, 4, "SHARES")
    out_of_range = struct.pack("<I", 1) + struct.pack("<I", 7) + bytes(wire.CIPHERTEXT_BYTES)
    with pytest.raises(MalformedMessage, match="out of range"):
        wire.parse_ciphertexts(out_of_range, 4, "SHARES")
    with pytest.raises(MalformedMessage, match="never advertised"):
        SecAggServer(r.params).forward_shares({0: r.shares[0]})


def test_masked_values_outside_the_ring_are_rejected():
    r = _Round()
    top = wire.masked_body(np.full(7, 2**20 - 1, dtype=np.uint64), 20)  # 20-bit ring, 4-byte width
    assert wire.parse_masked(top, 20, 7).tolist() == [2**20 - 1] * 7
    over = top[:8] + struct.pack("<I", 2**20) + top[12:]
    with pytest.raises(MalformedMessage, match="not below 2\\^20"):
        wire.parse_masked(over, 20, 7)
    wide = wire.masked_body(np.full(7, 2**40, dtype=np.uint64), 64)
    with pytest.raises(MalformedMessage, match="this round uses 2\\^32"):
        wire.parse_masked(wide, 32, 7)
    with pytest.raises(MalformedMessage, match="did not share"):
        SecAggServer(r.params).unmask_request(r.masked)


def test_a_client_refuses_to_reveal_both_secrets_of_one_client():
    r = _Round()
    r.server.unmask_request(r.masked)
    with pytest.raises(MalformedMessage, match="appears twice"):  # one request naming 3 twice
        r.clients[0].unmask(_request(r.params, [0, 1, 2, 3], [3]))
    r.clients[0].unmask(_request(r.params, [0, 1, 2, 3], []))  # b-share of 3 revealed
    with pytest.raises(SecAggAbort, match="already revealed the other secret of client 3"):
        r.clients[0].unmask(_request(r.params, [0, 1, 2], [3]))  # now asks for s_sk of 3


def test_unmask_request_with_too_few_survivors_is_refused_by_the_client():
    r = _Round()
    with pytest.raises(SecAggAbort, match="only 2 survivors"):
        r.clients[0].unmask(_request(r.params, [0, 1], [2, 3]))


def test_a_forged_unmask_share_cannot_pass_as_another_clients():
    r = _Round()
    request = r.server.unmask_request(r.masked)
    responses = {u: c.unmask(request) for u, c in enumerate(r.clients)}
    forged = (
        responses[1][: wire.HEADER.size + 4 + 5]
        + struct.pack("<H", 3)
        + responses[1][wire.HEADER.size + 11 :]
    )
    with pytest.raises(MalformedMessage, match="share for point 3"):
        r.server.aggregate({**responses, 1: forged})


def test_a_corrupted_key_share_is_caught_by_the_public_key_check():
    r = _Round()
    request = r.server.unmask_request({u: r.masked[u] for u in (0, 1, 2)})  # client 3 dropped
    responses = {u: r.clients[u].unmask(request) for u in (0, 1, 2)}
    body = bytearray(responses[0])
    body[-1] ^= 1  # last byte of client 0's share of 3's mask key
    with pytest.raises(SecAggAbort, match="client 3"):
        r.server.aggregate({**responses, 0: bytes(body)})
