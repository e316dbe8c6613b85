"""Versioned load into Redis (single node or cluster): write, verify, flip, clean up.

:func:`load_version` guarantees, in order:

1. the new version is written under its own key prefix (items and users through
   pipelined MSETs), then its manifest; the pointer is untouched while it is written;
2. it is verified: every item key holds exactly one record (count and record size, by
   pipelined STRLEN), every user key exists, and a random sample of records reads back
   byte for byte (sha256);
3. only then the pointer key is set to the new version (one SET: readers switch at
   once, each read sees one version), and the previous version is marked superseded;
4. versions older than the previous one that were superseded more than ``grace_s``
   ago are deleted (in-flight readers may still use the previous version; readers cache
   the pointer for ``pointer_ttl_s`` < ``grace_s``).

It fails closed: if Redis refuses a write (``maxmemory`` + ``noeviction``: OOM), times
out, or verification fails, the partial version is deleted (best effort), the
pointer is not flipped, readers keep the old version, and :class:`LoadError` is raised.
Synchronous (an offline job); progress goes to an optional callback, not to stdout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
from redis import exceptions as rex
from redis.cluster import RedisCluster

from feature_store.codec import VersionManifest, split_records
from feature_store.errors import LoadError
from feature_store.keys import (
    check_id,
    check_name,
    item_keys,
    manifest_key,
    pointer_key,
    user_key,
    version_pattern,
    versions_key,
)

log = logging.getLogger(__name__)
Progress = Callable[[int], None]


@dataclass
class VersionData:
    """A whole version, ready to write: records aligned with ``item_ids``, encoded user
    records aligned with ``user_ids``."""

    manifest: VersionManifest
    item_ids: list[str]
    records: np.ndarray  # (I,) structured, manifest.dtype()
    user_ids: list[str]
    user_values: list[bytes]

    def __post_init__(self) -> None:
        check_name("version", self.manifest.version)
        if self.records.dtype != self.manifest.dtype():
            raise ValueError("records do not have the manifest's record layout")
        if len(self.records) != len(self.item_ids) or len(self.user_ids) != len(self.user_values):
            raise ValueError("one record per item id and one value per user id")
        for i in self.item_ids:
            check_id("item", i)
        for u in self.user_ids:
            check_id("user", u)
        if len(set(self.item_ids)) != len(self.item_ids):
            raise ValueError("item ids must be unique")


@dataclass
class LoadReport:
    version: str
    previous: str | None
    items: int
    users: int
    write_seconds: float
    verify_seconds: float
    deleted: list[str]

    @property
    def items_per_s(self) -> float:
        return self.items / max(self.write_seconds, 1e-9)


def connect_sync(url: str, cluster: bool = False, timeout_s: float = 10.0) -> Any:
    """A synchronous client for loading (longer timeouts than the reader: bulk writes)."""
    if cluster:
        return RedisCluster.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=5.0)
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=5.0)


def _is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


def _write(
    client: Any, pairs: list[tuple[str, bytes]], chunk: int, progress: Progress | None
) -> None:
    cluster = _is_cluster(client)
    per_pipe = 8 * chunk
    for s in range(0, len(pairs), per_pipe):
        block = pairs[s : s + per_pipe]
        if cluster:
            for c in range(0, len(block), chunk):
                client.mset_nonatomic(dict(block[c : c + chunk]))
        else:
            pipe = client.pipeline(transaction=False)
            for c in range(0, len(block), chunk):
                pipe.mset(dict(block[c : c + chunk]))
            pipe.execute()
        if progress:
            progress(len(block))


def _strlens(client: Any, keys: Sequence[str], chunk: int) -> list[int]:
    out: list[int] = []
    for s in range(0, len(keys), chunk * 8):
        pipe = client.pipeline(transaction=False)
        for k in keys[s : s + chunk * 8]:
            pipe.strlen(k)
        out.extend(int(x) for x in pipe.execute())
    return out


def _mget(client: Any, keys: list[str]) -> list[bytes | None]:
    return list(client.mget_nonatomic(keys) if _is_cluster(client) else client.mget(keys))


def delete_version(client: Any, ns: str, version: str, batch: int = 1000) -> int:
    """UNLINK every key of ``version`` (SCAN over every node); returns how many."""
    n = 0
    keys: list[bytes] = []
    for k in client.scan_iter(match=version_pattern(ns, version), count=batch):
        keys.append(k)
        if len(keys) >= batch:
            n += int(client.unlink(*keys))
            keys = []
    if keys:
        n += int(client.unlink(*keys))
    client.hdel(versions_key(ns), version)
    return n


def versions(client: Any, ns: str) -> dict[str, dict[str, Any]]:
    """The version registry: name -> {loaded_at, superseded_at}."""
    raw = client.hgetall(versions_key(ns))
    return {k.decode(): json.loads(v) for k, v in raw.items()}


def current(client: Any, ns: str) -> str | None:
    v = client.get(pointer_key(ns))
    return None if v is None else v.decode()


def _verify(client: Any, ns: str, data: VersionData, ikeys: list[str], ukeys: list[str],
            chunk: int, sample: int, seed: int) -> None:  # fmt: skip
    size = data.manifest.record_size
    lens = _strlens(client, ikeys, chunk)
    bad = sum(1 for n in lens if n != size)
    if bad:
        raise LoadError(
            f"verify: {bad} of {len(ikeys)} item keys do not hold one {size}-byte record"
        )
    ulens = _strlens(client, ukeys, chunk)
    if any(n == 0 for n in ulens):
        raise LoadError(f"verify: {sum(n == 0 for n in ulens)} user keys are missing")
    if len(ikeys):
        pick = np.random.default_rng(seed).choice(
            len(ikeys), min(sample, len(ikeys)), replace=False
        )
        got = _mget(client, [ikeys[i] for i in pick])
        want = data.records[pick]
        for i, g, w in zip(pick, got, want, strict=True):
            if g is None or hashlib.sha256(g).digest() != hashlib.sha256(w.tobytes()).digest():
                raise LoadError(f"verify: record of item {data.item_ids[i]!r} reads back different")
    raw = client.get(manifest_key(ns, data.manifest.version))
    if raw is None or json.loads(raw) != json.loads(data.manifest.dumps()):
        raise LoadError("verify: the stored manifest differs from the one written")


def load_version(
    client: Any,
    data: VersionData,
    ns: str,
    *,
    grace_s: float = 300.0,
    chunk: int = 1000,
    sample: int = 256,
    progress: Progress | None = None,
) -> LoadReport:
    """Write, verify, flip and clean up (the module docstring's guarantees)."""
    ns = check_name("namespace", ns)
    m = data.manifest
    ver = m.version
    if client.exists(manifest_key(ns, ver)) or ver in versions(client, ns):
        raise LoadError(f"version {ver} already exists in namespace {ns}; pick a new name")
    previous = current(client, ns)
    ikeys = item_keys(ns, ver, data.item_ids, m.key_buckets)
    ukeys = [user_key(ns, ver, u, m.key_buckets) for u in data.user_ids]
    t0 = time.perf_counter()
    try:
        _write(client, list(zip(ikeys, split_records(data.records), strict=True)), chunk, progress)
        _write(client, list(zip(ukeys, data.user_values, strict=True)), chunk, None)
        client.set(manifest_key(ns, ver), m.dumps())
        t1 = time.perf_counter()
        _verify(client, ns, data, ikeys, ukeys, chunk, sample, seed=len(ikeys))
    except (rex.RedisError, LoadError) as exc:
        log.error("load of %s failed (%s); deleting the partial version", ver, exc)
        try:
            delete_version(client, ns, ver)
        except rex.RedisError as exc2:  # pragma: no cover - Redis gone mid-cleanup
            log.error("could not delete partial version %s: %s", ver, exc2)
        raise LoadError(
            f"load of version {ver} failed, pointer not flipped (still {previous}): {exc}"
        ) from exc
    t2 = time.perf_counter()
    now = time.time()
    reg = versions_key(ns)
    client.hset(reg, ver, json.dumps({"loaded_at": now, "superseded_at": None}))
    client.set(pointer_key(ns), ver)
    if previous is not None and previous != ver:
        info = versions(client, ns).get(previous, {"loaded_at": None})
        info["superseded_at"] = now
        client.hset(reg, previous, json.dumps(info))
    deleted = cleanup(client, ns, grace_s, keep=(ver, previous))
    log.info(
        "loaded %s: %d items, %d users; pointer flipped from %s",
        ver,
        len(ikeys),
        len(ukeys),
        previous,
    )
    return LoadReport(ver, previous, len(ikeys), len(ukeys), t1 - t0, t2 - t1, deleted)


def cleanup(client: Any, ns: str, grace_s: float, keep: Sequence[str | None] = ()) -> list[str]:
    """Delete versions other than the current one and ``keep`` that were superseded
    more than ``grace_s`` ago; returns their names."""
    now = time.time()
    cur = current(client, ns)
    deleted = []
    for ver, info in versions(client, ns).items():
        if ver == cur or ver in keep:
            continue
        sup = info.get("superseded_at")
        if sup is not None and now - float(sup) >= grace_s:
            delete_version(client, ns, ver)
            deleted.append(ver)
    return deleted
