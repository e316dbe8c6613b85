"""Feature-store benchmark: bulk load rate and read latency (``mmrank bench-store``).

Synthetic records of the CameNN layout (Q = 1, D = 64, 3 item fields, ITA/TIA:
160-byte records) are loaded with the real loader; reads go through the real
:class:`~feature_store.reader.RedisStore`:

- ``items``: one read of ``hist`` + ``cand`` item records (one MGET / one pipeline per
  node), cache cold (cache off) and warm (every item cached: no round trip). Cold reads
  draw their items two ways: ``uniform`` over the catalog (the worst case: every read
  touches Redis memory no earlier read warmed) and ``zipf`` (popularity ~ rank^-1 over a
  random order, DESIGN section 10's request mix: hot items stay in Redis's CPU caches);
- ``request``: ``read_request`` (user record + candidates, then the history items), cold.

Latencies are wall time per read in one task on uvloop (the service's loop), after a
warm-up, so they include the client, the network stack and decoding; on a shared
machine they are noisy. For the cold reads, ``server_ms`` is the time Redis itself spent
in MGET per read (``INFO commandstats``, summed over the nodes of a cluster): the part
of the latency no client change can remove. Measured here, it is mostly memory latency:
550 random keys of 50,000 cost Redis 0.40 ms, of 5,000 0.10 ms.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import uvloop

from feature_store.embed import Embeddings, build_version
from feature_store.loader import LoadReport, connect_sync, load_version
from feature_store.reader import RedisSettings, RedisStore


def synthetic_embeddings(n_items: int, q: int = 1, d: int = 64, seed: int = 0) -> Embeddings:
    rng = np.random.default_rng(seed)
    meta = {
        "model_name": "bench", "model_version": "bench", "item_tower_sha256": "0" * 64,
        "q": q, "d": d, "alignment": True,
        "item_fields": [["item_id", 20011], ["category", 17], ["brand", 211]],
        "user_fields": [["user_id", 50021], ["age", 11]],
    }  # fmt: skip
    return Embeddings(
        item_ids=np.array([f"item{i}" for i in range(n_items)]),
        emb=rng.normal(size=(n_items, q, d)).astype(np.float32),
        sparse=rng.integers(1, 17, size=(n_items, 3)),
        ita=rng.random(n_items).astype(np.float32),
        tia=rng.random(n_items).astype(np.float32),
        has_text=np.ones(n_items, bool),
        has_image=np.ones(n_items, bool),
        meta=meta,
    )


@dataclass
class ReadTiming:
    name: str
    n: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    server_ms: float | None = None  # Redis's own MGET time per read (cold reads)


def _timing(name: str, samples: list[float], server_ms: float | None = None) -> ReadTiming:
    a = np.asarray(samples) * 1e3
    return ReadTiming(name, len(a), float(np.percentile(a, 50)), float(np.percentile(a, 99)),
                      float(a.mean()), server_ms)  # fmt: skip


async def _mget_server_ms(client: Any, cluster: bool, reads: int) -> float:
    """Redis's MGET time since the last stats reset, per read, over every node."""
    if cluster:
        per_node = (await client.info("commandstats", target_nodes=client.PRIMARIES)).values()
    else:
        per_node = [await client.info("commandstats")]
    return sum(n.get("cmdstat_mget", {}).get("usec", 0) for n in per_node) / 1e3 / reads


async def _reset_stats(client: Any, cluster: bool) -> None:
    if cluster:
        await client.config_resetstat(target_nodes=client.PRIMARIES)
    else:
        await client.config_resetstat()


async def _time(fn: Callable[[int], Any], reads: int, warmup: int = 20) -> list[float]:
    for k in range(warmup):
        await fn(k)
    out = []
    for k in range(reads):
        t = time.perf_counter()
        await fn(k)
        out.append(time.perf_counter() - t)
    return out


def item_sets(n_items: int, size: int, count: int, zipf: float | None,
              rng: np.random.Generator) -> list[list[str]]:  # fmt: skip
    """``count`` reads of ``size`` distinct items each: uniform, or with probability
    ~ rank^-zipf over a random popularity order."""
    p = None
    if zipf is not None:
        w = np.arange(1, n_items + 1, dtype=np.float64) ** -zipf
        p = (w / w.sum())[rng.permutation(n_items)]
    return [[f"item{i}" for i in rng.choice(n_items, size, replace=False, p=p)]
            for _ in range(count)]  # fmt: skip


async def bench_reads(url: str, cluster: bool, ns: str, n_items: int, n_users: int,
                      hist: int, cand: int, reads: int, seed: int = 0) -> list[ReadTiming]:  # fmt: skip
    rng = np.random.default_rng(seed)
    sets = item_sets(n_items, hist + cand, reads + 20, None, rng)
    zipf_sets = item_sets(n_items, hist + cand, reads + 20, 1.0, rng)
    users = [f"user{u}" for u in rng.integers(0, n_users, reads + 20)]
    base = RedisSettings(url=url, cluster=cluster, namespace=ns, pointer_ttl_s=3600.0,
                         socket_timeout_s=2.0)  # fmt: skip
    out = []
    cold = RedisStore(RedisSettings(**{**base.__dict__, "cache_items": 0}))
    try:
        await cold.current_version()
        for name, draws in (("items cold", sets), ("items cold zipf", zipf_sets)):
            for k in range(20):  # warm-up, outside the server's count
                await cold.read_items(draws[k])
            await _reset_stats(cold.client, cluster)

            def read(k: int, d: list[list[str]] = draws) -> Any:
                return cold.read_items(d[k + 20])  # past the warm-up's sets

            samples = await _time(read, reads, warmup=0)
            server = await _mget_server_ms(cold.client, cluster, reads)
            out.append(_timing(name, samples, server))
        out.append(_timing("request cold", await _time(
            lambda k: cold.read_request(users[k], sets[k][hist:], max_hist=hist), reads)))  # fmt: skip
    finally:
        await cold.close()
    warm = RedisStore(RedisSettings(**{**base.__dict__, "cache_items": n_items}))
    try:
        for s in sets:
            await warm.read_items(s)
        out.append(_timing("items warm", await _time(lambda k: warm.read_items(sets[k]), reads)))
    finally:
        await warm.close()
    return out


def bench_store(url: str, cluster: bool, *, ns: str = "mmrank-bench", n_items: int = 50_000,
                n_users: int = 2_000, hist: int = 50, cand: int = 500, reads: int = 500,
                progress: Callable[[int], None] | None = None
                ) -> tuple[LoadReport, list[ReadTiming]]:  # fmt: skip
    """Load a synthetic version into ``url`` (namespace ``ns``), then time reads."""
    e = synthetic_embeddings(n_items)
    rng = np.random.default_rng(1)
    users = ([f"user{u}" for u in range(n_users)], rng.integers(1, 11, size=(n_users, 2)),
             [[f"item{i}" for i in rng.choice(n_items, hist, replace=False)]
              for _ in range(n_users)])  # fmt: skip
    data = build_version(e, users)
    client = connect_sync(url, cluster)
    try:
        report = load_version(client, data, ns, grace_s=0.0, progress=progress)
    finally:
        client.close()
    timings = uvloop.run(bench_reads(url, cluster, ns, n_items, n_users, hist, cand, reads))
    return report, timings
