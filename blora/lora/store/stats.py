"""What the store reports: ``Residency`` (cheap, read after every engine step) and ``StoreStats`` (every
counter, with load/install latency percentiles)."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Residency:
    """Where adapters' weights are now. ``active``: installed in slots (least recently used first);
    ``cached``: in the host cache (least recently used first); ``pinned``: installed in slots of their own."""

    active: tuple[str, ...]
    cached: tuple[str, ...]
    pinned: tuple[str, ...]

    @property
    def resident(self) -> tuple[str, ...]:
        """Adapters whose weights are in memory (host cache or a slot)."""
        return tuple(dict.fromkeys(self.cached + self.active))


@dataclass(frozen=True)
class StoreStats:
    """Counters since the store was created, tiers and memory (bytes); ``*_ms``: latency percentiles."""

    registered: int
    roots: list[str]
    cached: list[str]
    active: list[str]
    pinned: list[str]
    arrivals: dict[str, int]  # requests by the tier their adapter was in when they arrived
    requests_waited_for_load: int  # requests not admitted at least once because their adapter was loading
    activations: dict[str, int]  # "slot_hit" / "install"
    loads: int
    load_failures: int
    cache_evictions: int
    slot_evictions: int
    load_ms: dict[str, float]
    install_ms: dict[str, float]
    install_total_ms: float
    cache_bytes: int
    cache_peak_bytes: int
    cache_budget_bytes: int
    slot_bytes: int
    resident_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class LoadCounters:
    """Reads of adapter files (any thread, under the store's lock) and requests that waited for one."""

    loads: int = 0
    seconds: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=100_000))
    arrivals: collections.Counter[str] = field(default_factory=collections.Counter)
    waited: int = 0


def percentiles(values: Iterable[float]) -> dict[str, float]:
    """p50 / p99 / max in ms of ``values`` in seconds (``{"n": 0}`` when empty)."""
    data = sorted(values)
    if not data:
        return {"n": 0}

    def pick(q: float) -> float:
        return round(1000 * data[min(len(data) - 1, int(q * len(data)))], 3)

    return {"n": len(data), "p50": pick(0.5), "p99": pick(0.99), "max": round(1000 * data[-1], 3)}
