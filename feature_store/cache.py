"""A bounded in-process cache of validated item records, one table per embedding version.

A version's table is a structured numpy array of decoded records (its layout), an
``item id -> row`` dict, and a reference bit per row. A request's cached records are
copied out with one fancy index (:meth:`RecordCache.fill`), so a cache hit costs no
join, no ``np.frombuffer`` and no re-validation: only records that passed validation
(exact size, finite) are ever put in. Eviction is CLOCK (second chance), an
approximation of LRU whose hits cost one vectorised bit write instead of a per-id
move in a linked list: rows are taken in hand order, a row used since the hand last
passed it is spared once.

At most ``max_versions`` versions are kept (the current one and the one in-flight
requests may still read); making room drops the least recently used version whole.
Single-threaded use (one event loop); :meth:`fill` does not yield, so a row cannot be
evicted between its lookup and its copy.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from itertools import repeat

import numpy as np


class _Table:
    """One version's records: ``rec[row]`` is the record of ``ids[row]``."""

    def __init__(self, dtype: np.dtype, capacity: int) -> None:
        self.rec = np.zeros(capacity, dtype)  # (C,) structured
        self.used = np.zeros(capacity, bool)  # (C,) reference bits
        self.ids: list[str] = []  # row -> item id, for rows in use
        self.index: dict[str, int] = {}  # item id -> row
        self.hand = 0

    def grow(self, capacity: int) -> None:
        rec = np.zeros(capacity, self.rec.dtype)
        rec[: len(self.rec)] = self.rec
        used = np.zeros(capacity, bool)
        used[: len(self.used)] = self.used
        self.rec, self.used = rec, used

    def victims(self, m: int, keep: np.ndarray) -> np.ndarray:
        """``m`` rows to reuse, by CLOCK from the hand, never a row of ``keep``
        (``m`` <= rows in use - ``len(keep)``)."""
        n = len(self.ids)
        order = (np.arange(n) + self.hand) % n  # rows from the hand on
        order = order[~np.isin(order, keep)]
        spared = self.used[order]
        free = order[~spared]
        if len(free) >= m:
            last = int(np.flatnonzero(~spared)[m - 1])  # the sweep stops at the m-th victim
            self.used[order[: last + 1]] = False  # and clears the bits it passed
            self.hand = (int(order[last]) + 1) % n
            return free[:m]
        # a whole turn clears every bit: the unused rows first, then in hand order
        rows = np.concatenate([free, order[spared]])[:m]
        self.used[order] = False
        self.hand = (int(rows[-1]) + 1) % n
        return rows


class RecordCache:
    """Per-version record tables with hit/miss counters. ``max_items`` bounds each
    version; 0 disables caching (every lookup misses)."""

    def __init__(self, max_items: int = 100_000, max_versions: int = 2,
                 initial_rows: int = 1024) -> None:  # fmt: skip
        if max_items < 0 or max_versions < 1:
            raise ValueError("max_items must be >= 0 and max_versions >= 1")
        self.max_items = max_items
        self.max_versions = max_versions
        self.initial_rows = max(1, initial_rows)
        self._versions: OrderedDict[str, _Table] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def fill(self, version: str, ids: Sequence[str], out: np.ndarray) -> np.ndarray:
        """Copy the cached record of each id into ``out`` (``(len(ids),)`` of the
        version's layout; rows of uncached ids are left as they are); returns the
        ``(len(ids),)`` bool mask of the ids found. Counts hits and misses."""
        n = len(ids)
        table = self._versions.get(version)
        if table is None or not self.max_items or table.rec.dtype != out.dtype:
            self.misses += n
            return np.zeros(n, bool)
        self._versions.move_to_end(version)
        rows = np.fromiter(map(table.index.get, ids, repeat(-1)), np.intp, count=n)  # (K,)
        hit = rows >= 0
        found = int(np.count_nonzero(hit))
        if found == n:
            np.take(table.rec, rows, out=out)
            table.used[rows] = True
        elif found:
            rows = rows[hit]
            out[hit] = table.rec[rows]
            table.used[rows] = True
        self.hits += found
        self.misses += n - found
        return hit

    def put(self, version: str, ids: Sequence[str], records: np.ndarray) -> None:
        """Insert validated ``records`` (aligned with ``ids``). Afterwards the last
        ``max_items`` distinct ids of ``ids`` are all cached; an id already cached keeps
        its record (a version's records never change). Beyond ``max_items`` rows,
        CLOCK picks the rows to reuse among those of other ids."""
        if not self.max_items or not len(ids):
            return
        table = self._table(version, records.dtype)
        last = {i: k for k, i in enumerate(ids)}  # id -> its last position
        wanted = sorted(last, key=last.__getitem__)[-self.max_items :]
        new = [i for i in wanted if i not in table.index]
        if not new:
            return
        m, size = len(new), len(table.ids)
        free = min(m, self.max_items - size)
        rows = list(range(size, size + free))
        if m > free:  # before the new rows exist: only old rows are candidates
            keep = np.fromiter((table.index[i] for i in wanted if i in table.index), np.intp)
            reused = table.victims(m - free, keep).tolist()
            for r, item in zip(reused, new[free:], strict=True):
                del table.index[table.ids[r]]
                table.ids[r] = item
            rows += reused
            self.evictions += m - free
        if size + free > len(table.rec):
            table.grow(min(self.max_items, max(2 * len(table.rec), size + free)))
        table.ids.extend(new[:free])
        table.index.update(zip(new, rows, strict=True))
        at = np.asarray(rows, np.intp)
        table.rec[at] = records[[last[i] for i in new]]
        table.used[at] = False  # new rows are spared only once they are used

    def _table(self, version: str, dtype: np.dtype) -> _Table:
        table = self._versions.get(version)
        if table is None or table.rec.dtype != dtype:  # a version has one layout
            table = _Table(dtype, min(self.initial_rows, self.max_items))
            self._versions[version] = table
            while len(self._versions) > self.max_versions:
                self._versions.popitem(last=False)
        self._versions.move_to_end(version)
        return table

    def clear(self) -> None:
        self._versions.clear()

    def __len__(self) -> int:
        return sum(len(t.ids) for t in self._versions.values())

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "entries": len(self),
        }
