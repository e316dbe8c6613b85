"""A bounded in-process LRU of validated item records, one per embedding version.

Values are the record bytes after validation (exact size, finite), so a request can
join cached and fetched records and still decode them all with one ``np.frombuffer``.
At most ``max_versions`` versions are kept (the current one and the one in-flight
requests may still read); making room drops the least recently used version whole.
Single-threaded use (one event loop); counters are plain ints.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from itertools import compress


class RecordCache:
    """Per-version LRU of ``item_id -> record bytes`` with hit/miss counters.
    ``max_items`` bounds each version; 0 disables caching (every lookup misses)."""

    def __init__(self, max_items: int = 100_000, max_versions: int = 2) -> None:
        if max_items < 0 or max_versions < 1:
            raise ValueError("max_items must be >= 0 and max_versions >= 1")
        self.max_items = max_items
        self.max_versions = max_versions
        self._versions: OrderedDict[str, OrderedDict[str, bytes]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def _lru(self, version: str) -> OrderedDict[str, bytes]:
        lru = self._versions.get(version)
        if lru is None:
            lru = self._versions[version] = OrderedDict()
            while len(self._versions) > self.max_versions:
                self._versions.popitem(last=False)
        else:
            self._versions.move_to_end(version)
        return lru

    def get_many(self, version: str, ids: Sequence[str]) -> list[bytes | None]:
        """Cached record of each id (None where absent); counts hits and misses.
        Lookups and recency updates run as C-level ``map``s (no per-id Python frame)."""
        if not self.max_items:
            self.misses += len(ids)
            return [None] * len(ids)
        lru = self._lru(version)
        out = list(map(lru.get, ids))
        misses = out.count(None)
        if misses == 0:
            deque(map(lru.move_to_end, ids), maxlen=0)  # every id: most recent, in order
        elif misses < len(ids):
            # the hits, in order (cached values are whole records: never empty, so truthy)
            deque(map(lru.move_to_end, compress(ids, out)), maxlen=0)
        self.hits += len(ids) - misses
        self.misses += misses
        return out

    def put_many(self, version: str, items: Sequence[tuple[str, bytes]]) -> None:
        """Insert validated records, evicting the least recently used beyond the bound."""
        if not self.max_items:
            return
        lru = self._lru(version)
        lru.update(items)  # new ids go last; ids already cached keep their place...
        deque(map(lru.move_to_end, (i for i, _ in items)), maxlen=0)  # ...until moved
        over = len(lru) - self.max_items
        for _ in range(max(0, over)):
            lru.popitem(last=False)
        self.evictions += max(0, over)

    def clear(self) -> None:
        self._versions.clear()

    def __len__(self) -> int:
        return sum(len(v) for v in self._versions.values())

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "entries": len(self),
        }
