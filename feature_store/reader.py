"""The Redis feature store the service reads through (redis.asyncio, hiredis parser).

- Single node: one ``MGET`` per round trip (user record + candidate records together),
  sent through :mod:`feature_store.resp` (hiredis in C, no per-call tasks) for
  ``redis://`` URLs; redis-py for everything else.
- Redis Cluster: ``mget_nonatomic``: one MGET per hash-tag bucket (:mod:`feature_store.keys`),
  sent as one pipeline per node, concurrently.
- Every call is bounded: ``socket_timeout_s`` per command, ``connect_timeout_s`` per
  connection, at most ``retries`` retries with a short backoff; a pool of at most
  ``max_connections`` connections (per node on a cluster) and a wait of at most
  ``socket_timeout_s`` for a free one. When Redis does not answer in that budget the
  read raises :class:`~feature_store.errors.StoreUnavailable` (redis-py's defaults
  would wait about a minute on a stopped Redis).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
from redis import exceptions as rex
from redis.asyncio import BlockingConnectionPool, Connection, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from feature_store.cache import RecordCache
from feature_store.codec import VersionManifest
from feature_store.errors import StoreUnavailable
from feature_store.keys import (
    DEFAULT_NAMESPACE,
    check_name,
    item_keys,
    manifest_key,
    pointer_key,
    user_key,
)
from feature_store.resp import RespError, RespPool, endpoint, pack
from feature_store.store import FeatureStore


@dataclass(frozen=True)
class RedisSettings:
    """How the service reaches Redis. Every field is a trade-off named beside it."""

    url: str = "redis://localhost:6379/0"  # redis://host:port/db (cluster: any node)
    cluster: bool = False  # Redis Cluster client (slot routing, per-node pipelines)
    namespace: str = DEFAULT_NAMESPACE  # key prefix shared with the loader
    socket_timeout_s: float = 0.25  # per command; a slow Redis fails the read, not the service
    connect_timeout_s: float = 0.5  # per new connection
    retries: int = 1  # retries after a connection error / timeout (0 = fail at once)
    max_connections: int = 32  # pool bound (per node on a cluster); ~ concurrent reads
    pointer_ttl_s: float = 1.0  # how stale the version pointer may be; < loader grace period
    cache_items: int = 100_000  # cached records per version (0 = no cache)


class HiredisPackConnection(Connection):
    """redis-py's async connection packs commands in Python (~0.3 ms for a 551-key
    MGET here); hiredis packs the same bytes in C. Multi-word command names are split
    first, as redis-py does."""

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if isinstance(first, str) and " " in first:
            args = (*first.encode().split(), *args[1:])
        elif isinstance(first, bytes) and b" " in first:
            args = (*first.split(), *args[1:])
        return [hiredis.pack_command(args)]


def _retry(n: int) -> Retry:
    return Retry(ExponentialBackoff(cap=0.05, base=0.005), n)


def connect(s: RedisSettings) -> Redis | RedisCluster:
    """An async client per ``s`` (nothing is sent until the first command)."""
    errors: list[type[Exception]] = [rex.ConnectionError, rex.TimeoutError]
    if s.cluster:
        return RedisCluster.from_url(
            s.url,
            socket_timeout=s.socket_timeout_s,
            socket_connect_timeout=s.connect_timeout_s,
            retry=_retry(s.retries),
            retry_on_error=errors,
            max_connections=s.max_connections,
        )
    pool = BlockingConnectionPool.from_url(
        s.url,
        max_connections=s.max_connections,
        connection_class=HiredisPackConnection,
        timeout=s.socket_timeout_s,
        socket_timeout=s.socket_timeout_s,
        socket_connect_timeout=s.connect_timeout_s,
        retry=_retry(s.retries),
        retry_on_error=errors,
    )
    return Redis(connection_pool=pool)


class RedisStore(FeatureStore):
    """:class:`~feature_store.store.FeatureStore` over Redis or Redis Cluster."""

    def __init__(self, settings: RedisSettings | None = None, client: Any = None) -> None:
        s = settings or RedisSettings()
        super().__init__(RecordCache(s.cache_items), s.pointer_ttl_s)
        self.settings = s
        self.ns = check_name("namespace", s.namespace)
        self.client: Any = client if client is not None else connect(s)
        self.cluster = s.cluster
        ep = None if s.cluster or client is not None else endpoint(s.url)
        self._resp = None if ep is None else RespPool(
            ep, max_connections=s.max_connections, timeout_s=s.socket_timeout_s,
            connect_timeout_s=s.connect_timeout_s, retries=s.retries)  # fmt: skip

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except (rex.ConnectionError, rex.TimeoutError, TimeoutError, OSError) as exc:
            raise StoreUnavailable(f"redis at {self.settings.url}: {exc}") from exc
        except (rex.RedisError, RespError) as exc:  # cluster down, NOPERM, ...
            raise StoreUnavailable(f"redis at {self.settings.url}: {exc}") from exc

    async def _get_pointer(self) -> str | None:
        v = await self._call(self.client.get(pointer_key(self.ns)))
        return None if v is None else v.decode()

    async def _get_manifest(self, version: str) -> bytes | None:
        return await self._call(self.client.get(manifest_key(self.ns, version)))

    async def _fetch(
        self, manifest: VersionManifest, user_id: str | None, item_ids: Sequence[str]
    ) -> tuple[bytes | None, list[bytes | None]]:
        keys = item_keys(self.ns, manifest.version, item_ids, manifest.key_buckets)
        if user_id is not None:
            keys.append(user_key(self.ns, manifest.version, user_id, manifest.key_buckets))
        if not keys:
            return None, []
        if self._resp is not None:
            values = await self._call(self._resp.execute(pack("MGET", *keys)))
        elif self.cluster:
            values = await self._call(self.client.mget_nonatomic(keys))
        else:
            values = await self._call(self.client.mget(keys))
        if user_id is not None:
            return values[-1], values[:-1]
        return None, values

    async def ping(self) -> bool:
        try:
            return bool(await self._call(self.client.ping()))
        except StoreUnavailable:
            return False

    async def close(self) -> None:
        if self._resp is not None:
            await self._resp.close()
        await self.client.aclose()
