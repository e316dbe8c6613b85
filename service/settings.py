"""The service's one settings object (pydantic-settings).

Every value comes from here: constructor arguments (tests, ``mmrank serve`` flags), else
``MMRANK_*`` environment variables (nested groups with ``__``: ``MMRANK_STORE__URL``,
``MMRANK_BATCHING__MAX_DELAY_MS``), else the defaults below. Nothing else in the
service reads the environment. Values are validated at start-up; a bad value stops the
service before it binds a port.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class BackendSettings(BaseModel):
    """Which engine scores the ranker batches (DESIGN section 6)."""

    kind: Literal["onnxruntime", "triton", "torch"] = Field(
        default="onnxruntime",
        description="onnxruntime: in process, the default; triton: a Triton server over "
        "gRPC (the repository must be the one Triton serves); torch: the PyTorch reference "
        "(needs the training extra; for comparisons, not for production)",
    )
    device: Literal["auto", "cpu", "cuda", "tensorrt"] = Field(
        default="auto",
        description="ONNX Runtime execution provider: auto = TensorRT, else CUDA, else CPU, "
        "whichever this onnxruntime build has; cpu forces the CPU provider",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="batches scored at the same time (worker threads sharing one session); "
        "on CPU, workers x threads should not exceed the cores left to the event loop",
    )
    threads: int = Field(
        default=1, ge=1, le=64, description="ONNX Runtime intra-op threads per inference call"
    )
    optimization: Literal["disable", "basic", "extended", "all"] = Field(
        default="extended",
        description="ONNX Runtime graph optimisation level (model_export.repository)",
    )
    triton_url: str = Field(default="localhost:8001", description="Triton gRPC endpoint host:port")
    triton_model: str = Field(default="ranker", description="the ranker's model name on Triton")
    timeout_ms: float = Field(
        default=5000.0, gt=0, description="longest one inference call may take before it is failed"
    )
    breaker_open_ms: float = Field(
        default=500.0,
        ge=0,
        description="after the backend is unreachable or a call times out, calls fail at once "
        "(503) for this long, then one goes through again; 0 = no circuit breaker. Short: "
        "quick recovery; long: fewer calls spent on a backend that is still down",
    )


class StoreSettings(BaseModel):
    """Where item embeddings and user features come from (DESIGN section 4)."""

    kind: Literal["embedded", "redis", "cluster"] = Field(
        default="embedded",
        description="embedded: one local file (mmrank load --embedded); redis: one node; "
        "cluster: Redis Cluster (url names any node)",
    )
    path: Path | None = Field(default=None, description="the embedded store's file (kind=embedded)")
    url: str = Field(
        default="redis://localhost:6379/0", description="Redis URL (kind=redis|cluster)"
    )
    namespace: str = Field(default="mmrank", description="key prefix, shared with mmrank load")
    pool_size: int = Field(
        default=32,
        ge=1,
        description="Redis connections (per node on a cluster); ~ concurrent reads",
    )
    socket_timeout_ms: float = Field(
        default=250.0,
        gt=0,
        description="per Redis command; a slow Redis fails the read, not the service",
    )
    connect_timeout_ms: float = Field(default=500.0, gt=0, description="per new Redis connection")
    retries: int = Field(default=1, ge=0, description="retries after a connection error or timeout")
    cache_items: int = Field(
        default=100_000, ge=0, description="item records cached in process per embedding version"
    )
    pointer_ttl_s: float = Field(
        default=1.0,
        ge=0,
        description="how long the current-version pointer is reused before re-reading",
    )
    timeout_ms: float = Field(
        default=300.0,
        gt=0,
        description="budget of one request's feature read (all round trips); past it the "
        "request gets 503 or, with degraded=input_order, a degraded ranking",
    )


class BatchingSettings(BaseModel):
    """The cross-request batcher (service.batcher)."""

    max_batch_rows: int = Field(
        default=512,
        ge=1,
        description="candidate rows per inference call; larger requests are split. Measured "
        "for the demo-sized CameNN (masked candidate-isolated graph) on 1 ORT thread, one "
        "user row: 13.0 / 11.3 / 10.6 / 10.8 us per row in calls of 128 / 256 / 512 / 1000 "
        "rows, so a 500-candidate request is one call; on a GPU raise it (thousands of rows)",
    )
    max_user_rows: int = Field(
        default=64,
        ge=0,
        description="bound on requests x candidate rows of a batch (a single request is never "
        "refused); 0 = none. The exported CameNN candidate-isolated graph scores each "
        "candidate against the keys of every user row of its batch, masked "
        "(models.common.attend_own_user: no per-candidate copies), so that product is its "
        "attention work, while each user row's own encoding costs the same merged or not. "
        "Measured (mmrank bench-service --merge 2 4 8: one call of m requests against m "
        "calls of one, model alone, 1 ORT thread; merged / separate time): Intel Xeon, K=5 "
        "m=2 / 4 / 8 0.92 / 0.95 / 1.17, K=10 1.00 / 1.15 / 1.52, K=25 1.09 / 1.44 / 2.12, "
        "K=100 1.33 / 1.90 / 3.14; AMD EPYC, K=25 m=2 / 4 1.04 / 1.17, K=100 1.05 / 1.39. "
        "EM3's exported target attention has the same masked layout (Intel Xeon, K=10 "
        "m=2 / 4 / 8 0.95 / 1.03 / 1.22, K=100 1.08 / 1.26 / 1.64, K=500 1.11 / 1.42 / "
        "2.00). So on CPU only tiny requests merge (at the default: 2 requests of up to 16 "
        "candidates, 4 of up to 4); end to end at K=100 (Intel Xeon, mmrank bench) the old "
        "default 512 (pairs merged) reached 0.56 of the model alone, no merging 0.76-0.78. "
        "On a GPU, set 0",
    )
    fill_batches: bool = Field(
        default=False,
        description="true: split requests at the batch boundary so that every batch but "
        "the last holds max_batch_rows (fewest calls; for GPUs, where a call costs more "
        "than rows do); false: split only a request larger than max_batch_rows and close a "
        "batch when the next request does not fit. Measured on CPU (K=500, 256 rows): "
        "filling puts a request's last rows into the next user's batch, whose history is "
        "then padded to the longer of the two: ~5% more inference work",
    )
    max_delay_ms: float = Field(
        default=0.0,
        ge=0,
        description="how long a free worker waits for more rows before scoring a partial "
        "batch; 0 = score whatever is queued as soon as a worker is free (batches grow "
        "with load: rows queue up while the worker is busy); > 0 adds up to this much "
        "latency at low load for fuller batches",
    )
    prefetch: int = Field(
        default=1,
        ge=0,
        le=8,
        description="batches handed to the backend beyond the ones its workers are scoring: "
        "a closed batch waits at the backend (ONNX Runtime: in its thread pool's queue) and "
        "starts the moment a worker is free, instead of after the event loop has taken the "
        "last batch's scores and collected the next (the wait there counts as "
        "timings_ms.inference; a deadline passing during that wait no longer stops the "
        "batch's inference); 0 = collect a batch only when a worker is free (the fullest "
        "batches). Measured with the ONNX Runtime thread on a core of its own, K=500, "
        "interleaved runs: 71 % -> 88 % of the model alone's throughput (one shared core: "
        "no change)",
    )
    queue_limit: int = Field(
        default=64,
        ge=1,
        description="requests waiting for inference; one more is refused at once with 429",
    )
    hist_buckets: list[int] = Field(
        default_factory=list,
        description="history lengths the batch's history axis is padded to (the smallest "
        "one that fits the longest history of the batch); each is warmed before the service "
        "is ready. Empty (the default): every length up to the history limit, so a batch "
        "is padded only to its own longest history; on TensorRT, where each length is an "
        "engine profile, 8/16/24/32/40/48 and the limit. Inference work grows with the "
        "padded length: measured on CPU, K=500, Zipf users, 1 ORT thread, interleaved "
        "runs, the ORT thread spent 12.5-12.9 ms per request with 8/16/.../48/50 and "
        "11.8-12.0 ms with every length (the model alone, unpadded: 11.6-12.0 ms); every "
        "length costs nothing beyond its warm-up run on ONNX Runtime CPU",
    )
    max_hist: int = Field(
        default=50, ge=0, description="history items read per user (the model's own limit caps it)"
    )

    @model_validator(mode="after")
    def _buckets(self) -> BatchingSettings:
        b = sorted(set(self.hist_buckets))  # empty: the default (service.models.max_history)
        if b and b[0] < 1:
            raise ValueError("hist_buckets must hold positive lengths")
        if b and b[-1] < self.max_hist:
            b.append(self.max_hist)
        self.hist_buckets = b
        return self


class ApiSettings(BaseModel):
    """The HTTP surface (DESIGN section 5)."""

    max_candidates: int = Field(default=1000, ge=1, description="candidates per request, at most")
    max_id_length: int = Field(
        default=128, ge=1, description="longest item / user id, in characters"
    )
    max_body_bytes: int = Field(
        default=1_048_576, ge=1024, description="request body limit; larger bodies get 413"
    )
    max_in_flight: int = Field(
        default=256,
        ge=1,
        description="ranking requests handled at once (parsing, features, queue, inference); "
        "one more is answered 429 + Retry-After at once, before its body is read, so that "
        "overload costs almost nothing per refused request and accepted ones keep their "
        "latency. The default only bounds memory; for latency under overload size it near "
        "saturation throughput x target latency (mmrank reliability overload measures it)",
    )
    default_deadline_ms: float = Field(
        default=1000.0, gt=0, description="deadline of a request that sends no deadline header"
    )
    max_deadline_ms: float = Field(
        default=10_000.0, gt=0, description="deadline headers are capped here"
    )
    deadline_header: str = Field(
        default="x-mmrank-deadline-ms", description="request header: the client's budget in ms"
    )
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After of 429 and 503 answers")
    degraded: Literal["fail", "input_order"] = Field(
        default="fail",
        description="when the feature store is unavailable or slow: fail = 503 + Retry-After; "
        "input_order = 200 with the candidates in the order sent, no scores, "
        "degraded=true and the reason",
    )
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="keys accepted on /v1/rank (header x-api-key or Authorization: Bearer); "
        "empty = no authentication on the ranking API",
    )
    admin_api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="keys accepted on /v1/admin/*; empty = the admin API is disabled (403)",
    )
    keep_alive_s: int = Field(
        default=75,
        ge=1,
        description="an idle keep-alive connection is closed after this many seconds. Keep "
        "it longer than the idle timeout of the clients and load balancers in front (AWS "
        "ALB and nginx: 60 s) so that they close idle connections, not the server: a "
        "request sent just as the server closes its connection gets no answer (a 502 "
        "behind a balancer). uvicorn's own default is 5 s",
    )
    docs: bool = Field(default=False, description="serve /docs and /openapi.json")
    metrics: bool = Field(default=True, description="serve /metrics (Prometheus)")


class ShutdownSettings(BaseModel):
    """What SIGTERM does (``mmrank serve``; :class:`service.app.DrainingServer`). The whole
    shutdown takes at most ``drain_s`` (+ closing the model), under compose's
    ``stop_grace_period`` of 45 s."""

    unready_s: float = Field(
        default=2.0,
        ge=0,
        description="first phase: /v2/health/ready answers 503 while requests are still "
        "accepted and served, so a load balancer stops sending before the listener closes; "
        "0 = close the listener at once",
    )
    drain_s: float = Field(
        default=30.0,
        gt=0,
        description="whole shutdown budget: after unready_s the listener closes and the "
        "requests in flight get the rest of it to finish; past it they are cancelled",
    )

    @model_validator(mode="after")
    def _fits(self) -> ShutdownSettings:
        if self.unready_s >= self.drain_s:
            raise ValueError("shutdown.unready_s must be shorter than shutdown.drain_s")
        return self


class Settings(BaseSettings):
    """Everything the service needs; see the groups for each value's trade-off."""

    model_config = SettingsConfigDict(
        env_prefix="MMRANK_", env_nested_delimiter="__", extra="forbid", frozen=False
    )

    repo: Path = Field(
        default=Path("model_repository"), description="the model repository to serve"
    )
    golden_check: bool = Field(
        default=True, description="run each graph's golden batch when a repository is opened"
    )
    backend: BackendSettings = Field(default_factory=lambda: BackendSettings())
    store: StoreSettings = Field(default_factory=lambda: StoreSettings())
    batching: BatchingSettings = Field(default_factory=lambda: BatchingSettings())
    api: ApiSettings = Field(default_factory=lambda: ApiSettings())
    shutdown: ShutdownSettings = Field(default_factory=lambda: ShutdownSettings())
    log_level: str = Field(default="INFO", description="logging level of the service's loggers")

    @model_validator(mode="after")
    def _store(self) -> Settings:
        if self.store.kind == "embedded" and self.store.path is None:
            raise ValueError("store.kind=embedded needs store.path (MMRANK_STORE__PATH)")
        return self
