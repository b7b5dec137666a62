"""Caching cloud answers at the edge: a true LRU cache, the count-based "LRU" it is often confused
with, and prefetching for temporally correlated sensor streams (chapter 05, section 5).

* :func:`input_key` -- the cache key of one input: SHA-256 over its dtype, shape and raw bytes, so two
  arrays with the same bytes but another shape or dtype never collide.
* :class:`LRUCache` -- least-recently-used eviction over an ``OrderedDict``: ``get`` and ``put`` are
  O(1) (``move_to_end`` / ``popitem(last=False)``), bounded by ``capacity``, with hit/miss/eviction
  counters. LRU is the policy analysed by Sleator & Tarjan (1985, "Amortized efficiency of list update
  and paging rules"): within a factor ``capacity`` of the optimal offline policy.
* :class:`NaiveCountCache` -- the naive pattern the chapter corrects: an "LRU" that evicts the key with
  the lowest access *count* (that is LFU, least-frequently used, without ageing). A new key starts at
  count 0, so the freshest entry is the next one evicted; re-putting a present key still evicts another
  entry; eviction scans every key (O(n)).
* :func:`zipf_stream` -- a skewed request stream (Zipf's law, P(rank k) ∝ 1/k^s) whose popular keys
  change over time (``phases``), the workload on which the two caches differ.
* :class:`MarkovPrefetcher` -- prefetching for a sensor whose windows follow each other: it learns
  first-order successor counts (key -> next key) online and, after each request, fetches the most
  likely next key(s) into the cache before they are asked for. :func:`simulate_cache` replays a stream
  and reports the hit rate and the *wasted* prefetches (fetched, then evicted or never used).
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np

__all__ = [
    "CacheStats",
    "LRUCache",
    "MarkovPrefetcher",
    "NaiveCountCache",
    "input_key",
    "sensor_stream",
    "simulate_cache",
    "zipf_stream",
]


def input_key(x: Any) -> str:
    """SHA-256 (hex) of an input's dtype, shape and bytes (numpy array or torch tensor)."""
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"input_key takes a numpy array or torch tensor, got {type(x).__name__}")
    arr = np.ascontiguousarray(x)
    h = hashlib.sha256()
    h.update(arr.dtype.str.encode())
    h.update(repr(arr.shape).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


@dataclass
class CacheStats:
    """Counters of a cache: hits, misses, evictions; ``hit_rate`` = hits / (hits + misses)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def _check_capacity(capacity: int) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
    return capacity


class LRUCache:
    """A bounded least-recently-used cache; every operation is O(1).

    ``get(key)`` returns the value (and marks it most recently used) or ``default`` on a miss;
    ``put(key, value)`` inserts or refreshes, evicting the least recently used key when full.
    ``keys()`` lists keys from least to most recently used.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = _check_capacity(capacity)
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:  # a peek: counts nothing, changes no order
        return key in self._data

    def get(self, key: Hashable, default: Any = None) -> Any:
        if key in self._data:
            self._data.move_to_end(key)
            self.stats.hits += 1
            return self._data[key]
        self.stats.misses += 1
        return default

    def put(self, key: Hashable, value: Any) -> Hashable | None:
        """Insert or refresh ``key``; returns the evicted key, if any."""
        if key in self._data:
            self._data.move_to_end(key)
            self._data[key] = value
            return None
        self._data[key] = value
        if len(self._data) > self.capacity:
            evicted, _ = self._data.popitem(last=False)
            self.stats.evictions += 1
            return evicted
        return None

    def keys(self) -> list[Hashable]:
        return list(self._data)


class NaiveCountCache:
    """The naive "LRU" (really LFU without ageing), kept to show how it fails.

    It counts accesses per key and, when full, evicts the key with the lowest count -- found by a scan
    over all keys (O(n)). A new key enters with count 0, so it is the next victim; ``put`` of a key
    that is already cached evicts another key first (the check for presence comes after eviction).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = _check_capacity(capacity)
        self._data: dict[Hashable, Any] = {}
        self._counts: dict[Hashable, int] = {}
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def get(self, key: Hashable, default: Any = None) -> Any:
        if key in self._data:
            self._counts[key] += 1
            self.stats.hits += 1
            return self._data[key]
        self.stats.misses += 1
        return default

    def put(self, key: Hashable, value: Any) -> Hashable | None:
        evicted = None
        if len(self._data) >= self.capacity:  # the bug: evicts even when `key` is already here
            evicted = min(self._counts, key=self._counts.__getitem__)  # O(n) scan
            del self._data[evicted], self._counts[evicted]
            self.stats.evictions += 1
        self._data[key] = value
        self._counts.setdefault(key, 0)  # a fresh key starts at 0: the next one evicted
        return evicted

    def keys(self) -> list[Hashable]:
        return list(self._data)


def zipf_stream(
    num_requests: int,
    num_keys: int,
    *,
    s: float = 1.1,
    phases: int = 4,
    seed: int = 0,
) -> np.ndarray:
    """``num_requests`` key ids drawn from a Zipf(s) law over ``num_keys`` keys.

    The stream has ``phases`` equal parts; each part ranks the keys by a fresh random permutation, so
    yesterday's popular inputs go cold (a new sensor placement, a new day). Returns int64 ids.
    """
    if num_requests < 0 or num_keys < 1 or phases < 1:
        raise ValueError(
            f"need num_requests >= 0, num_keys >= 1, phases >= 1; got {num_requests}, "
            f"{num_keys}, {phases}"
        )
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, num_keys + 1) ** s
    p /= p.sum()
    bounds = np.linspace(0, num_requests, phases + 1).astype(int)
    out = np.empty(num_requests, dtype=np.int64)
    for a, b in pairwise(bounds):
        ranks = rng.choice(num_keys, size=b - a, p=p)
        out[a:b] = rng.permutation(num_keys)[ranks]
    return out


def sensor_stream(
    num_requests: int,
    cycle: int,
    *,
    p_next: float = 0.9,
    seed: int = 0,
) -> np.ndarray:
    """Window ids of a sensor that walks a periodic cycle of ``cycle`` distinct windows.

    With probability ``p_next`` the next window is the next one on the cycle; otherwise the sensor
    jumps to a uniformly random window (an event, a restart). Temporally correlated, but not a replay.
    """
    if not 0.0 <= p_next <= 1.0 or cycle < 1 or num_requests < 0:
        raise ValueError(
            f"need 0 <= p_next <= 1, cycle >= 1, num_requests >= 0; got {p_next}, {cycle}, "
            f"{num_requests}"
        )
    rng = np.random.default_rng(seed)
    out = np.empty(num_requests, dtype=np.int64)
    state = 0
    jumps = rng.random(num_requests) >= p_next
    targets = rng.integers(0, cycle, num_requests)
    for i in range(num_requests):
        state = int(targets[i]) if jumps[i] else (state + 1) % cycle
        out[i] = state
    return out


class MarkovPrefetcher:
    """Predicts the next keys from first-order successor counts learned online.

    ``observe(key)`` records the transition from the previous key; ``predict(key, k)`` returns the up
    to ``k`` most frequent successors of ``key`` seen so far (none for an unseen key).
    """

    def __init__(self) -> None:
        self._next: dict[Hashable, Counter] = defaultdict(Counter)
        self._last: Hashable | None = None

    def observe(self, key: Hashable) -> None:
        if self._last is not None:
            self._next[self._last][key] += 1
        self._last = key

    def predict(self, key: Hashable, k: int = 1) -> list[Hashable]:
        if key not in self._next:
            return []
        return [nxt for nxt, _ in self._next[key].most_common(k)]


def simulate_cache(
    stream: Sequence[Hashable] | Iterable[Hashable],
    cache: LRUCache | NaiveCountCache,
    *,
    prefetcher: MarkovPrefetcher | None = None,
    prefetch_k: int = 1,
) -> dict[str, float]:
    """Replay ``stream`` through ``cache`` (a miss fetches from the cloud and stores the answer).

    With a ``prefetcher``, after each request the predicted next keys that are not cached are fetched
    too. Returns ``hit_rate``, ``cloud_requests`` (misses + prefetches), ``prefetches`` and
    ``wasted_prefetches`` (prefetched entries evicted or left unused at the end, never hit).
    """
    pending: set[Hashable] = set()  # prefetched and not yet used
    prefetches = wasted = 0
    for key in stream:
        if cache.get(key) is None:
            evicted = cache.put(key, True)
        else:
            evicted = None
            pending.discard(key)
        if evicted in pending:
            pending.discard(evicted)
            wasted += 1
        if prefetcher is not None:
            prefetcher.observe(key)
            for nxt in prefetcher.predict(key, prefetch_k):
                if nxt in cache:
                    continue
                prefetches += 1
                evicted = cache.put(nxt, True)
                pending.add(nxt)
                if evicted in pending:
                    pending.discard(evicted)
                    wasted += 1
    wasted += len(pending)
    return {
        "hit_rate": cache.stats.hit_rate,
        "cloud_requests": cache.stats.misses + prefetches,
        "prefetches": prefetches,
        "wasted_prefetches": wasted,
    }
