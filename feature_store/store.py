"""The store interface the service reads through, and the logic both stores share.

:class:`FeatureStore` resolves the current version once per read (a pointer cached for
``pointer_ttl_s``), copies the records the per-version
:class:`~feature_store.cache.RecordCache` holds, fetches the rest from its backend
(:meth:`FeatureStore._fetch`: Redis or an in-memory table) and validates + decodes
those with one ``np.frombuffer``.

Guarantees of every read:

- all records and the user record come from one version, the one reported
  (keys carry the version; the pointer is read once per read);
- a record of the wrong size or with NaN/inf is rejected and counted, never returned as
  data; a missing key is reported, never made up;
- a pointer to a version without a readable manifest is counted (``unknown_version``)
  and the last good version keeps serving; with no good version at all the read raises
  :class:`~feature_store.errors.VersionError`.
"""

from __future__ import annotations

import abc
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from feature_store.cache import RecordCache
from feature_store.codec import VersionManifest, decode_items, decode_user, parse_manifest
from feature_store.errors import RecordError, VersionError

log = logging.getLogger(__name__)


@dataclass
class ItemBatch:
    """Items of one read, in the order asked for; ``records[k]`` is real only where
    ``present[k]`` (zeros elsewhere)."""

    version: str
    ids: list[str]
    records: np.ndarray  # (K,) structured, the version's record layout
    present: np.ndarray  # (K,) bool
    missing: list[str]
    rejected: list[tuple[str, str]]  # (item id, reason)

    @property
    def emb(self) -> np.ndarray:
        return self.records["emb"]  # (K, Q, D) float16

    @property
    def sparse(self) -> np.ndarray:
        return self.records["sparse"]  # (K, Fi) int64


@dataclass
class RequestFeatures:
    """Everything one ranking request needs, from one version."""

    version: str
    user_id: str
    user_found: bool
    user_fields: np.ndarray  # (Fu,) int64; zeros (absent) when the user is unknown
    history: ItemBatch  # the user's history, most recent first, truncated to max_hist
    candidates: ItemBatch


@dataclass
class StoreCounters:
    reads: int = 0
    items: int = 0
    missing: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    unknown_version: int = 0
    users_missing: int = 0
    users_rejected: int = 0
    round_trips: int = 0


class FeatureStore(abc.ABC):
    """Versioned item records + user records (see the module docstring)."""

    def __init__(self, cache: RecordCache | None = None, pointer_ttl_s: float = 1.0) -> None:
        self.cache = cache if cache is not None else RecordCache()
        self.pointer_ttl_s = pointer_ttl_s
        self.counters = StoreCounters()
        self._manifests: dict[str, VersionManifest] = {}
        self._version: str | None = None
        self._version_at = -float("inf")

    # -- backend -------------------------------------------------------------------
    @abc.abstractmethod
    async def _get_pointer(self) -> str | None:
        """The pointer's value (None: no version loaded)."""

    @abc.abstractmethod
    async def _get_manifest(self, version: str) -> bytes | None:
        """The stored manifest of ``version`` (None: absent)."""

    @abc.abstractmethod
    async def _fetch(
        self, manifest: VersionManifest, user_id: str | None, item_ids: Sequence[str]
    ) -> tuple[bytes | None, list[bytes | None]]:
        """(user record or None, item records or None) in one round trip."""

    @abc.abstractmethod
    async def ping(self) -> bool:
        """Whether the backend answers (within its timeouts)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    # -- versions ------------------------------------------------------------------
    async def manifest(self, version: str | None = None) -> VersionManifest:
        """The manifest of ``version`` (default: the current one); VersionError if
        it is absent or unreadable."""
        version = version or await self.current_version()
        m = self._manifests.get(version)
        if m is None:
            raw = await self._get_manifest(version)
            if raw is None:
                raise VersionError(f"unknown embedding version {version!r}: no manifest")
            m = parse_manifest(raw, version)
            self._manifests[version] = m
            while len(self._manifests) > 8:  # versions come and go; keep a few
                self._manifests.pop(next(iter(self._manifests)))
        return m

    async def current_version(self) -> str:
        """The version reads use now: the pointer, re-read after ``pointer_ttl_s``.
        A pointer to a version without a readable manifest is counted and ignored
        while a good version is known."""
        now = time.monotonic()
        if self._version is not None and now - self._version_at < self.pointer_ttl_s:
            return self._version
        ptr = await self._get_pointer()
        self.counters.round_trips += 1
        if ptr is None:
            raise VersionError("no embedding version is loaded (the pointer key is absent)")
        if ptr != self._version:
            try:
                await self.manifest(ptr)
            except VersionError as exc:
                self.counters.unknown_version += 1
                if self._version is None:
                    raise
                log.warning("pointer names %r: %s; still serving %s", ptr, exc, self._version)
                self._version_at = now
                return self._version
        self._version, self._version_at = ptr, now
        return ptr

    # -- reads ---------------------------------------------------------------------
    async def _items(
        self, m: VersionManifest, ids: list[str], user_id: str | None = None
    ) -> tuple[ItemBatch, bytes | None]:
        """Records of ``ids``: cached ones copied from the cache, the rest (with the
        user record, if asked) fetched in one round trip, validated and cached."""
        dtype, n = m.dtype(), len(ids)
        records = np.zeros(n, dtype)
        present = self.cache.fill(m.version, ids, records)  # (K,) bool
        todo = np.flatnonzero(~present)  # (M,) positions to fetch
        missing: list[str] = []
        rejected: list[tuple[str, str]] = []
        user = None
        if len(todo) or user_id is not None:
            asked = ids if len(todo) == n else [ids[k] for k in todo.tolist()]
            user, got = await self._fetch(m, user_id, asked)
            self.counters.round_trips += 1
            if len(got) != len(asked):
                raise ValueError(f"the store returned {len(got)} values for {len(asked)} keys")
            d = decode_items(got, dtype)
            if len(todo) == n:
                records, present = d.records, d.present
            else:
                records[todo] = d.records
                present[todo] = d.present
            missing = [asked[k] for k in d.missing]
            rejected = [(asked[k], r) for k, r in d.rejected]
            ok = np.flatnonzero(d.present)
            self.cache.put(m.version, [asked[k] for k in ok.tolist()], d.records[ok])
        c = self.counters
        c.items += n
        c.missing += len(missing)
        for _, reason in rejected:
            c.rejected[reason] += 1
        batch = ItemBatch(m.version, ids, records, present, missing, rejected)
        return batch, user

    async def read_items(self, item_ids: Sequence[str], version: str | None = None) -> ItemBatch:
        """Records of ``item_ids`` from one version (default: the current one)."""
        m = await self.manifest(version or await self.current_version())
        self.counters.reads += 1
        batch, _ = await self._items(m, list(item_ids))
        return batch

    async def read_request(
        self, user_id: str, candidates: Sequence[str], max_hist: int = 50
    ) -> RequestFeatures:
        """User record + candidates in one round trip, then the history items not in
        the cache in a second one (their ids are in the user record); one version."""
        m = await self.manifest(await self.current_version())
        self.counters.reads += 1
        cands, raw_user = await self._items(m, list(candidates), user_id)
        fields = np.zeros(len(m.user_fields), dtype=np.int64)
        history: list[str] = []
        found = False
        if raw_user is None:
            self.counters.users_missing += 1
        else:
            try:
                fields, history = decode_user(raw_user, len(m.user_fields))
                found = True
            except RecordError as exc:
                self.counters.users_rejected += 1
                log.warning("user record rejected: %s", exc)
        hist, _ = await self._items(m, history[:max_hist])
        return RequestFeatures(m.version, user_id, found, fields, hist, cands)

    def stats(self) -> dict[str, object]:
        c = self.counters
        return {
            "version": self._version,
            "reads": c.reads,
            "items": c.items,
            "missing": c.missing,
            "rejected": dict(c.rejected),
            "unknown_version": c.unknown_version,
            "users_missing": c.users_missing,
            "users_rejected": c.users_rejected,
            "round_trips": c.round_trips,
            "cache": self.cache.stats(),
        }
