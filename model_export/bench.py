"""Model-only latency: the exported ranker in ONNX Runtime on CPU, no HTTP, no Redis
(the ceiling of DESIGN section 10). Serving side: numpy + onnxruntime, no torch.

One request = one user row (U = 1), N history items (all real), K candidates. Each
measurement runs the same feeds ``warmup`` times untimed, then at least ``min_runs``
times and at least ``min_seconds``; latency is the median of the timed runs, with the
minimum beside it (the least disturbed run on a shared machine).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from model_export.manifest import Manifest
from model_export.repository import DEFAULT_OPT_LEVEL, OPT_LEVELS, ModelRepository


@dataclass(frozen=True)
class LatencyRow:
    model: str  # manifest name, e.g. camenn-full
    optimization: str  # ONNX Runtime graph optimisation level
    k: int  # candidates in the request
    n: int  # history length
    p50_ms: float
    min_ms: float
    runs: int
    session_ms: float  # session creation (graph optimisation happens here)


def request_feeds(manifest: Manifest, k: int, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One request's ranker inputs: random embeddings, valid hashed ids, N real
    history items, K candidates of user row 0."""
    rng = np.random.default_rng(seed)
    q, d = manifest.q, manifest.d

    def ids(fields: Sequence[Any], *lead: int) -> np.ndarray:
        cols = [rng.integers(1, f.buckets, size=(*lead, 1)) for f in fields]
        return np.concatenate(cols, axis=-1).astype(np.int64)

    return {
        "user_sparse": ids(manifest.user_fields, 1),
        "hist_emb": rng.standard_normal((1, n, q, d), dtype=np.float32),
        "hist_sparse": ids(manifest.item_fields, 1, n),
        "hist_mask": np.ones((1, n), dtype=bool),
        "cand_emb": rng.standard_normal((k, q, d), dtype=np.float32),
        "cand_sparse": ids(manifest.item_fields, k),
        "cand_user": np.zeros(k, dtype=np.int64),
    }


def time_session(
    session: ort.InferenceSession,
    feeds: dict[str, np.ndarray],
    *,
    warmup: int = 2,
    min_runs: int = 5,
    min_seconds: float = 0.5,
) -> list[float]:
    """Wall-clock seconds of each timed ``session.run`` (at least ``min_runs``)."""
    for _ in range(warmup):
        session.run(None, feeds)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return times


def bench_repository(
    repo: ModelRepository,
    ks: Sequence[int],
    n: int,
    *,
    threads: int = 1,
    optimization: str = DEFAULT_OPT_LEVEL,
    min_runs: int = 5,
    min_seconds: float = 0.5,
) -> list[LatencyRow]:
    """Ranker latency per request for each K, one session at ``optimization``."""
    t0 = time.perf_counter()
    session = repo.session("ranker", threads=threads, optimization=optimization)
    session_ms = 1e3 * (time.perf_counter() - t0)
    rows = []
    for k in ks:
        times = time_session(
            session,
            request_feeds(repo.manifest, k, n),
            min_runs=min_runs,
            min_seconds=min_seconds,
        )
        rows.append(
            LatencyRow(
                repo.manifest.name,
                optimization,
                k,
                n,
                1e3 * statistics.median(times),
                1e3 * min(times),
                len(times),
                session_ms,
            )
        )
    return rows


def bench_levels(
    repo: ModelRepository,
    k: int,
    n: int,
    *,
    levels: Sequence[str] = tuple(OPT_LEVELS),
    threads: int = 1,
    min_runs: int = 5,
    min_seconds: float = 0.5,
) -> list[LatencyRow]:
    """The same request at each graph optimisation level (``disable`` = the graph
    as exported)."""
    return [
        row
        for level in levels
        for row in bench_repository(
            repo,
            [k],
            n,
            threads=threads,
            optimization=level,
            min_runs=min_runs,
            min_seconds=min_seconds,
        )
    ]


def mode_ratios(rows: Sequence[LatencyRow]) -> list[dict[str, Any]]:
    """For each (K, N, level) measured on both CameNN modes: full / candidate-isolated."""
    by = {(r.model, r.k, r.n, r.optimization): r for r in rows}
    out = []
    for (model, k, n, level), full in by.items():
        if not model.endswith("-full"):
            continue
        iso = by.get((model[: -len("-full")] + "-candidate-isolated", k, n, level))
        if iso is not None:
            out.append(
                {
                    "k": k,
                    "n": n,
                    "optimization": level,
                    "full_ms": full.p50_ms,
                    "isolated_ms": iso.p50_ms,
                    "ratio": full.p50_ms / iso.p50_ms,
                }
            )
    return out


def render_markdown(latency: Sequence[LatencyRow], levels: Sequence[LatencyRow] = ()) -> str:
    """The benchmark as markdown tables (latency per request, mode ratios, levels)."""
    lines = [
        "ONNX Runtime CPU, one intra-op thread, one request per run (U = 1); "
        "median (min) ms per request",
        "",
        "| model | K | N | p50 ms | min ms | runs |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.model} | {r.k} | {r.n} | {r.p50_ms:.2f} | {r.min_ms:.2f} | {r.runs} |"
        for r in latency
    ]
    ratios = mode_ratios(latency)
    if ratios:
        lines += [
            "",
            "| K | full ms | candidate-isolated ms | full / isolated |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['k']} | {r['full_ms']:.2f} | {r['isolated_ms']:.2f} | {r['ratio']:.1f}x |"
            for r in ratios
        ]
    if levels:
        base = {(r.model, r.k): r.p50_ms for r in levels if r.optimization == "disable"}
        lines += [
            "",
            "ONNX Runtime graph optimisation levels (`disable` = the graph as exported)",
            "",
            "| model | K | level | session ms | p50 ms | vs disable |",
            "|---|---|---|---|---|---|",
        ]
        for r in levels:
            ref = base.get((r.model, r.k))
            rel = f"{r.p50_ms / ref:.2f}x" if ref else "-"
            lines.append(
                f"| {r.model} | {r.k} | {r.optimization} | {r.session_ms:.0f} | "
                f"{r.p50_ms:.2f} | {rel} |"
            )
    return "\n".join(lines) + "\n"


def to_json(latency: Sequence[LatencyRow], levels: Sequence[LatencyRow] = ()) -> dict[str, Any]:
    return {
        "latency": [asdict(r) for r in latency],
        "mode_ratios": mode_ratios(latency),
        "optimization_levels": [asdict(r) for r in levels],
    }
