"""Prometheus metrics (DESIGN section 7), prefix ``mmrank_``, one registry per app.

Recorded where the work happens: the HTTP middleware counts requests by outcome and
times them end to end; the ranking pipeline times its stages and counts candidates,
missing items and degraded answers; the batcher records batch rows, batch requests,
queue depth and rejections. Feature-store cache counters are read from the store at
scrape time. Rows and requests per batch are separate histograms, so the average batch
is their ratio (as Triton reports executions and inferences).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
                   0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)  # fmt: skip
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25,
                 0.5, 1.0)  # fmt: skip
ROW_BUCKETS = (1, 10, 50, 100, 200, 500, 1000, 2000, 4000, 8000)
OUTCOMES = {200: "ok", 401: "unauthenticated", 403: "forbidden", 404: "not_found",
            409: "conflict", 413: "too_large", 422: "invalid", 429: "overloaded",
            499: "client_gone", 503: "unavailable", 504: "deadline"}  # fmt: skip


class _StoreCollector(Collector):
    """Cache hits/misses and store reads, read from the feature store at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        s = self.stats()
        cache = s.get("cache", {})
        for name, key, doc in (
            ("mmrank_store_cache_hits", "hits", "item records served from the in-process cache"),
            ("mmrank_store_cache_misses", "misses", "item records not in the cache"),
        ):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(cache.get(key, 0)))
            yield c
        r = CounterMetricFamily(
            "mmrank_store_rejected_records", "records refused", labels=["reason"]
        )
        for reason, n in dict(s.get("rejected", {})).items():
            r.add_metric([reason], float(n))
        yield r


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("mmrank_requests", "ranking requests by outcome", ["outcome"],
                                registry=r)  # fmt: skip
        self.latency = Histogram("mmrank_request_latency_seconds",
                                 "end-to-end latency of /v1/rank (server side)",
                                 buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.stages = Histogram("mmrank_stage_latency_seconds",
                                "latency per stage: parse, features, queue, inference, sort",
                                ["stage"], buckets=STAGE_BUCKETS, registry=r)  # fmt: skip
        self.batch_rows = Histogram("mmrank_batch_rows", "candidate rows per inference call",
                                    buckets=ROW_BUCKETS, registry=r)  # fmt: skip
        self.batch_requests = Histogram("mmrank_batch_requests", "requests per inference call",
                                        buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
                                        registry=r)  # fmt: skip
        self.queue_depth = Gauge("mmrank_queue_depth", "requests waiting for inference",
                                 registry=r)  # fmt: skip
        self.candidates = Histogram("mmrank_candidates_per_request", "candidates per request",
                                    buckets=ROW_BUCKETS, registry=r)  # fmt: skip
        self.missing = Counter("mmrank_missing_items", "candidates without usable features",
                               registry=r)  # fmt: skip
        self.rejections = Counter("mmrank_rejections", "requests refused or dropped, by reason",
                                  ["reason"], registry=r)  # fmt: skip
        self.degraded = Counter("mmrank_degraded_responses", "degraded answers by reason",
                                ["reason"], registry=r)  # fmt: skip
        self.inference_failures = Counter("mmrank_inference_failures", "failed backend calls",
                                          registry=r)  # fmt: skip
        self.model_info = Gauge("mmrank_model_info", "the model being served (value 1)",
                                ["name", "version", "backend"], registry=r)  # fmt: skip
        self.embedding_info = Gauge("mmrank_embedding_info",
                                    "the embedding version last read, and whether it is "
                                    "compatible with the model (value 1 or 0)",
                                    ["version"], registry=r)  # fmt: skip
        self.swaps = Counter("mmrank_model_swaps", "admin model swaps by result", ["result"],
                             registry=r)  # fmt: skip

    def watch_store(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.registry.register(_StoreCollector(stats))

    def outcome(self, status: int) -> None:
        self.requests.labels(OUTCOMES.get(status, "error")).inc()

    def stage(self, name: str, seconds: float) -> None:
        self.stages.labels(name).observe(seconds)

    def batch(self, rows: int, requests: int) -> None:
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)

    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

    def set_model(self, name: str, version: str, backend: str) -> None:
        self.model_info.clear()
        self.model_info.labels(name, version, backend).set(1)

    def set_embedding(self, version: str, compatible: bool) -> None:
        self.embedding_info.clear()
        self.embedding_info.labels(version).set(1 if compatible else 0)
