"""LRU cache, the naive count-based cache, and prefetching (labsupport.hybrid.cache)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labsupport.hybrid.cache import (
    LRUCache,
    MarkovPrefetcher,
    NaiveCountCache,
    input_key,
    sensor_stream,
    simulate_cache,
    zipf_stream,
)


def _reference_lru(stream, capacity):
    """An independent LRU: a plain list, most recent last; returns hits and final order."""
    order, hits = [], 0
    for k in stream:
        if k in order:
            hits += 1
            order.remove(k)
        elif len(order) == capacity:
            order.pop(0)
        order.append(k)
    return hits, order


def test_lru_evicts_least_recently_used_in_order():
    c = LRUCache(3)
    for k in "abc":
        assert c.put(k, k.upper()) is None
    assert c.get("a") == "A"  # a is now most recent: order b, c, a
    assert c.put("d", "D") == "b"
    assert c.put("e", "E") == "c"
    assert c.keys() == ["a", "d", "e"]
    assert len(c) == 3
    assert (c.stats.hits, c.stats.misses, c.stats.evictions) == (1, 0, 2)


def test_lru_put_of_present_key_refreshes_and_evicts_nothing():
    c = LRUCache(2)
    c.put("a", 1)
    c.put("b", 2)
    assert c.put("a", 10) is None
    assert c.keys() == ["b", "a"]
    assert c.get("a") == 10
    assert c.put("c", 3) == "b"


def test_lru_matches_reference_on_random_stream():
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 12, 2000).tolist()
    c = LRUCache(5)
    for k in stream:
        if c.get(k) is None:
            c.put(k, k)
        assert len(c) <= 5
    hits, order = _reference_lru(stream, 5)
    assert c.stats.hits == hits
    assert c.keys() == order


def test_lru_miss_returns_default_and_capacity_is_validated():
    c = LRUCache(1)
    assert c.get("x", "none") == "none"
    assert c.stats.misses == 1
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="capacity"):
            LRUCache(bad)


def test_naive_count_cache_evicts_the_fresh_key():
    c = NaiveCountCache(2)
    c.put("a", 1)
    c.put("b", 2)
    c.get("a")
    c.get("b")
    c.put("fresh", 3)  # evicts a or b (count 1), and 'fresh' enters with count 0
    assert c.put("next", 4) == "fresh"  # the newest entry is the next victim
    lru = LRUCache(2)
    for k in ("a", "b"):
        lru.put(k, 1)
        lru.get(k)
    lru.put("fresh", 3)
    assert lru.put("next", 4) != "fresh"


def test_naive_count_cache_reput_evicts_another_key():
    c = NaiveCountCache(2)
    c.put("a", 1)
    c.put("b", 2)
    c.get("b")
    assert c.put("b", 20) == "a"  # b was already cached, yet a is thrown out
    assert c.keys() == ["b"]


def test_lru_beats_naive_on_a_skewed_stream_whose_popular_keys_change():
    stream = zipf_stream(4000, 200, s=1.1, phases=4, seed=1)
    lru = simulate_cache(stream, LRUCache(20))
    naive = simulate_cache(stream, NaiveCountCache(20))
    assert lru["hit_rate"] > naive["hit_rate"] + 0.05


def test_input_key_depends_on_dtype_shape_and_bytes():
    x = np.arange(6, dtype=np.float32)
    assert input_key(x) == input_key(x.copy())
    assert input_key(x) == input_key(torch.from_numpy(x))
    assert input_key(x) != input_key(x.reshape(2, 3))  # same bytes, other shape
    assert input_key(x) != input_key(x.view(np.int32))  # same bytes, other dtype
    y = x.copy()
    y[3] += 1e-3
    assert input_key(x) != input_key(y)
    with pytest.raises(TypeError):
        input_key([1.0, 2.0])


def test_prefetch_raises_hit_rate_on_a_correlated_stream_and_counts_waste():
    stream = sensor_stream(3000, cycle=50, p_next=0.9, seed=0)
    plain = simulate_cache(stream, LRUCache(10))
    pre = simulate_cache(stream, LRUCache(10), prefetcher=MarkovPrefetcher())
    assert pre["hit_rate"] > plain["hit_rate"] + 0.3
    assert plain["prefetches"] == plain["wasted_prefetches"] == 0
    assert 0 < pre["wasted_prefetches"] <= pre["prefetches"]
    assert pre["cloud_requests"] == round((1 - pre["hit_rate"]) * len(stream)) + pre["prefetches"]


def test_prefetch_on_a_random_stream_is_mostly_waste():
    stream = np.random.default_rng(0).integers(0, 200, 2000)
    pre = simulate_cache(stream, LRUCache(10), prefetcher=MarkovPrefetcher())
    assert pre["wasted_prefetches"] > 0.9 * pre["prefetches"]


def test_markov_prefetcher_predicts_most_frequent_successor():
    p = MarkovPrefetcher()
    for k in [1, 2, 1, 2, 1, 3]:
        p.observe(k)
    assert p.predict(1, 1) == [2]
    assert p.predict(1, 2) == [2, 3]
    assert p.predict(99) == []


def test_streams_are_seeded_and_validated():
    assert np.array_equal(zipf_stream(100, 10, seed=3), zipf_stream(100, 10, seed=3))
    s = sensor_stream(100, 7, p_next=1.0)
    assert s.tolist() == [(i + 1) % 7 for i in range(100)]
    with pytest.raises(ValueError):
        zipf_stream(10, 0)
    with pytest.raises(ValueError):
        sensor_stream(10, 5, p_next=1.5)
