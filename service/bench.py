"""``mmrank bench-service``: the service against the model alone, in one run (DESIGN
section 10, the ceiling half): same requests, same ONNX Runtime threads.

1. A CameNN of the demo's size (d = 64, 8 heads, ``candidate-isolated``; random weights:
   speed does not depend on training) is exported, the world's catalog embedded by its
   item tower and written to the embedded store (or ``--repo``/``--store`` given).
2. Model only: each request's tensors (U = 1, its N history items, K candidates, in
   calls of at most ``batching.max_batch_rows`` candidates, as the service splits them)
   run through one ONNX Runtime session, one after another on one thread: throughput,
   per-request p50 and CPU per request.
3. End to end: ``mmrank serve`` in a subprocess (optionally pinned with ``taskset``), a
   light asyncio HTTP/1.1 keep-alive load generator in this process (optionally pinned
   apart): closed loop with ``--concurrency`` connections for saturation throughput,
   then an open loop (Poisson arrivals) at half that rate for p50.
4. The model alone again, fed the open loop's own arrival times (same rate, seed and
   requests, first come first served): the half-load p50 compared like for like.

Steps 2-4 repeat in ``--rounds`` rounds (:func:`run_bench`); each round's comparisons
are reported with their medians and spread.

``--merge M ...`` measures only what ``batching.max_user_rows`` trades: the model alone
scoring groups of M requests in one call against one call each (:func:`merge_costs`).

Imports torch only to build the model when no ``--repo`` is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from feature_store.codec import decode_user
from feature_store.embedded import _read
from model_export.repository import open_repository
from service.settings import BatchingSettings
from service.tensors import Piece, UserSide, assemble


def build_stack(out: Path, items: int, users: int, seed: int = 0) -> tuple[Path, Path]:
    """(model repository, embedded store file) of a demo-sized CameNN on a world."""
    import torch

    from data.world import ITEM_FIELDS, USER_FIELDS, WorldConfig, write_world
    from feature_store.catalogs import resolve
    from feature_store.embed import build_version, embed_catalog
    from feature_store.embedded import write_embedded
    from model_export.export import export_run
    from models.camenn import CameNN, CameNNConfig
    from training.runs import save_run

    world = out / "world"
    if not (world / "interactions.parquet").is_file():
        write_world(WorldConfig(seed=seed, n_users=users, n_items=items), world)
    torch.manual_seed(seed)
    cfg = CameNNConfig(user_buckets=[f.buckets for f in USER_FIELDS],
                       item_buckets=[f.buckets for f in ITEM_FIELDS],
                       attention="candidate-isolated")  # fmt: skip
    model = CameNN(cfg).eval()
    save_run(out / "run", "camenn", model, cfg, {"data": "bench-world"})
    repo = out / "repo"
    export_run(out / "run", repo, force=True)
    _, cat, us = resolve(f"world:{world}")
    e = embed_catalog(open_repository(repo), cat, threads=2)
    store = out / "store.npz"
    write_embedded(store, build_version(e, us, "bench"))
    return repo, store


@dataclass
class Request:
    user: str
    cands: list[str]
    body: bytes
    feeds: dict[str, np.ndarray]


def make_requests(repo: Path, store: Path, k: int, n: int, count: int, seed: int = 0,
                  zipf: float | None = None) -> list[Request]:  # fmt: skip
    """``count`` requests, ``k`` distinct candidates each, with the model-only tensors of
    each (histories cut to ``n``). Without ``zipf``: users with the longest histories,
    candidates uniform. With ``zipf = a``: users and candidates drawn with probability
    ~ rank^-a over a random popularity order (DESIGN section 10's request mix: a few
    users and items are hot, most are rare)."""
    t = _read(store)
    m = open_repository(repo, golden=False).manifest
    ids = list(t.items)
    rec = np.frombuffer(b"".join(t.items[i] for i in ids), dtype=t.manifest.dtype())
    pos = {i: j for j, i in enumerate(ids)}
    users = []
    for u, raw in t.users.items():
        fields, hist = decode_user(raw, len(m.user_fields))
        users.append((len(hist), u, fields, hist[:n]))
    users.sort(key=lambda x: -x[0])
    rng = np.random.default_rng(seed)
    k = min(k, len(ids))
    p_item = p_user = None
    if zipf is not None:
        p_item = _zipf(len(ids), zipf)[rng.permutation(len(ids))]
        p_user = _zipf(len(users), zipf)[rng.permutation(len(users))]
    out = []
    for r in range(count):
        ui = (r % max(1, min(len(users), 200)) if p_user is None
              else int(rng.choice(len(users), p=p_user)))  # fmt: skip
        _, u, fields, hist = users[ui]
        c = [ids[j] for j in rng.choice(len(ids), size=k, replace=False, p=p_item)]
        h = [pos[i] for i in hist]
        cj = [pos[i] for i in c]
        feeds: dict[str, np.ndarray] = {
            "user_sparse": fields[None].astype(np.int64),
            "hist_emb": rec["emb"][h].astype(np.float32)[None],
            "hist_sparse": rec["sparse"][h].astype(np.int64)[None],
            "hist_mask": np.ones((1, len(h)), bool),
            "cand_emb": rec["emb"][cj].astype(np.float32),
            "cand_sparse": rec["sparse"][cj].astype(np.int64),
            "cand_user": np.zeros(len(cj), np.int64),
        }
        body = json.dumps({"user_id": u, "candidates": c}).encode()
        out.append(Request(u, c, body, feeds))
    return out


def _zipf(n: int, a: float) -> np.ndarray:
    w = np.arange(1, n + 1, dtype=np.float64) ** -a
    return w / w.sum()


def chunks(feeds: dict[str, np.ndarray], rows: int) -> list[dict[str, np.ndarray]]:
    """One request's tensors as calls of at most ``rows`` candidates each (the service's
    ``batching.max_batch_rows``), each with the request's own user row."""
    k = len(feeds["cand_user"])
    cand = ("cand_emb", "cand_sparse", "cand_user")
    return [{**feeds, **{n: feeds[n][a : a + rows] for n in cand}} for a in range(0, k, rows)]


def _model_calls(repo: Path, reqs: list[Request], threads: int, max_rows: int
                 ) -> tuple[Any, list[list[dict[str, np.ndarray]]]]:  # fmt: skip
    """One ONNX Runtime session of the ranker, each request's calls of at most
    ``max_rows`` candidates (:func:`chunks`), and the first five requests run once (warm)."""
    sess = open_repository(repo, golden=False).session("ranker", threads=threads)
    calls = [chunks(r.feeds, max_rows) for r in reqs]
    for c in calls[:5]:
        for f in c:
            sess.run(["cvr"], f)
    return sess, calls


def model_only(repo: Path, reqs: list[Request], threads: int, seconds: float,
               max_rows: int) -> dict[str, float]:  # fmt: skip
    """The ceiling: each request's tensors through one ONNX Runtime session, one request
    after another, in calls of at most ``max_rows`` candidates (the same split the
    service makes), unpadded history; throughput, p50 per request, CPU per request."""
    sess, calls = _model_calls(repo, reqs, threads, max_rows)
    lat = []
    t0, c0 = time.perf_counter(), time.process_time()
    i = 0
    while time.perf_counter() - t0 < seconds or i < 20:
        a = time.perf_counter()
        for f in calls[i % len(calls)]:
            sess.run(["cvr"], f)
        lat.append(time.perf_counter() - a)
        i += 1
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"throughput_rps": i / total, "p50_ms": 1e3 * statistics.median(lat), "requests": i,
            "cpu_ms_per_request": 1e3 * cpu / i}  # fmt: skip


def _piece(feeds: dict[str, np.ndarray]) -> Piece:
    """A request's tensors (U = 1) as the batcher's piece of all its candidates."""
    n = int(feeds["hist_mask"][0].sum())
    user = UserSide(feeds["user_sparse"][0], feeds["hist_emb"][0, :n], feeds["hist_sparse"][0, :n])
    return Piece(user, feeds["cand_emb"], feeds["cand_sparse"], 0, len(feeds["cand_user"]))


def merge_costs(repo: Path, reqs: list[Request], threads: int, sizes: list[int],
                rounds: int = 3) -> list[dict[str, float]]:  # fmt: skip
    """What merging costs the model alone (``batching.max_user_rows``): for each m in
    ``sizes``, ``reqs`` in groups of m, scored as one call per group (U = m, the history
    padded to the group's longest, as the batcher assembles it) and as m calls of one
    (each its own length). ms per request, the fastest of ``rounds`` alternating
    rounds, and the largest score difference between the two (a candidate's score must
    not depend on its batch-mates)."""
    sess = open_repository(repo, golden=False).session("ranker", threads=threads)
    pieces = [_piece(r.feeds) for r in reqs]
    longest = max(1, *(len(p.user.hist_emb) for p in pieces))
    lengths = list(range(1, longest + 1))  # every length: each call padded to its own
    out = []
    for m in sizes:
        groups = [pieces[i : i + m] for i in range(0, len(pieces) - m + 1, m)]
        if not groups:
            continue
        separate = [[assemble([p], lengths) for p in g] for g in groups]
        merged = [assemble(g, lengths) for g in groups]
        diff = max(
            float(np.abs(sess.run(["cvr"], mf)[0]
                         - np.concatenate([sess.run(["cvr"], f)[0] for f in sf])).max())
            for mf, sf in zip(merged, separate, strict=True)
        )  # fmt: skip
        best = {"separate": float("inf"), "merged": float("inf")}
        for _ in range(rounds):
            for name, calls in (("separate", [f for sf in separate for f in sf]),
                                ("merged", merged)):  # fmt: skip
                t = time.perf_counter()
                for f in calls:
                    sess.run(["cvr"], f)
                best[name] = min(best[name], (time.perf_counter() - t) / (len(groups) * m))
        out.append({"k": len(reqs[0].cands), "m": m, "separate_ms": 1e3 * best["separate"],
                    "merged_ms": 1e3 * best["merged"],
                    "merged_over_separate": best["merged"] / best["separate"],
                    "max_score_diff": diff})  # fmt: skip
    return out


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) process ``pid`` has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Conn:
    """One HTTP/1.1 keep-alive connection; ``post`` returns (status, seconds). A kept
    connection the server closed while idle (uvicorn: after 5 s) is reopened once."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.r: asyncio.StreamReader | None = None
        self.w: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> tuple[int, float]:
        head = (f"POST /v1/rank HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json"
                f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
        t0 = time.perf_counter()
        reused = self.w is not None
        try:
            status = await self._exchange(head + body)
        except (asyncio.IncompleteReadError, ConnectionError):
            if not reused:
                raise
            self.w = None  # closed by the server while idle: once more on a new connection
            status = await self._exchange(head + body)
        return status, time.perf_counter() - t0

    async def _exchange(self, data: bytes) -> int:
        if self.w is None:
            self.r, self.w = await asyncio.open_connection(self.host, self.port)
        assert self.r is not None
        self.w.write(data)
        raw = await self.r.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length"))
        await self.r.readexactly(length)
        return status


async def closed_loop(host: str, port: int, reqs: list[Request], conc: int, seconds: float,
                      server_pid: int | None = None) -> dict[str, float]:  # fmt: skip
    """Saturation: ``conc`` connections, each sending its next request as soon as the
    last one is answered. With ``server_pid``, also the server's CPU per request
    (a measure that other jobs on the machine disturb far less than throughput).
    Throughput counts 200 answers only; other answers are counted in ``errors``."""
    conns = [Conn(host, port) for _ in range(conc)]
    for c in conns:  # warm the connections and the server
        await c.post(reqs[0].body)
    lat: list[float] = []
    bad = 0
    stop = time.perf_counter() + seconds
    counter = [0]

    async def run(c: Conn) -> None:
        nonlocal bad
        while time.perf_counter() < stop:
            i = counter[0]
            counter[0] += 1
            st, s = await c.post(reqs[i % len(reqs)].body)
            lat.append(s)
            bad += st != 200

    t0 = time.perf_counter()
    c0 = process_cpu_s(server_pid) if server_pid else 0.0
    await asyncio.gather(*(run(c) for c in conns))
    total = time.perf_counter() - t0
    out = {"throughput_rps": (len(lat) - bad) / total,  # answered 200: errors do not count
           "p50_ms": 1e3 * statistics.median(lat),
           "requests": len(lat), "errors": bad}  # fmt: skip
    if server_pid:
        out["cpu_ms_per_request"] = 1e3 * (process_cpu_s(server_pid) - c0) / len(lat)
    return out


def arrivals(rate: float, seconds: float, seed: int = 1) -> np.ndarray:
    """Poisson arrival times (s from the start) at ``rate`` per second over ``seconds``;
    the same ``seed`` gives the same schedule to the service and to the model alone."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1 / rate, int(rate * seconds * 2) + 16)
    t = np.cumsum(gaps)
    return t[t < seconds]


async def open_loop(host: str, port: int, reqs: list[Request], rate: float,
                    seconds: float, seed: int = 1) -> dict[str, float]:  # fmt: skip
    """Request ``i`` of ``reqs`` (cyclic) sent at :func:`arrivals`' ``i``-th time, on a
    free keep-alive connection; latency from sending to the whole answer."""
    free = [Conn(host, port) for _ in range(32)]
    for c in free[:4]:
        await c.post(reqs[0].body)
    lat: list[float] = []
    bad = 0
    tasks = []

    async def one(i: int) -> None:
        nonlocal bad
        c = free.pop() if free else Conn(host, port)
        st, s = await c.post(reqs[i % len(reqs)].body)
        free.append(c)
        lat.append(s)
        bad += st != 200

    t0 = time.perf_counter()
    for i, at in enumerate(arrivals(rate, seconds, seed)):
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    return _latency(lat, rate) | {"errors": bad}


def model_open_loop(repo: Path, reqs: list[Request], threads: int, rate: float, seconds: float,
                    max_rows: int, seed: int = 1) -> dict[str, float]:  # fmt: skip
    """The model alone under the open loop's arrivals (same rate, seed and request order):
    one session, first come first served, each request's latency from its arrival to
    its last call's end, so its queueing behind earlier requests counts as it does for
    the service."""
    sess, calls = _model_calls(repo, reqs, threads, max_rows)
    lat = []
    t0 = time.perf_counter()
    for i, at in enumerate(arrivals(rate, seconds, seed)):
        wait = t0 + at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        for f in calls[i % len(calls)]:
            sess.run(["cvr"], f)
        lat.append(time.perf_counter() - t0 - at)
    return _latency(lat, rate)


def _latency(lat: list[float], rate: float) -> dict[str, float]:
    return {"rate_rps": rate, "p50_ms": 1e3 * statistics.median(lat),
            "p95_ms": 1e3 * float(np.percentile(lat, 95)),
            "p99_ms": 1e3 * float(np.percentile(lat, 99)), "requests": len(lat)}  # fmt: skip


def _pin(cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus] if cpus else []


def cpu_set(cpus: str | None) -> set[int] | None:
    """``"0,1"`` -> {0, 1}; None stays None (no pinning)."""
    return {int(c) for c in cpus.split(",")} if cpus else None


@contextlib.contextmanager
def pinned(cpus: str | None) -> Iterator[None]:
    """Run the block (and the processes it starts) on ``cpus``; then restore."""
    mine = os.sched_getaffinity(0)
    want = cpu_set(cpus)
    if want:
        os.sched_setaffinity(0, want)
    try:
        yield
    finally:
        os.sched_setaffinity(0, mine)


@contextlib.contextmanager
def serving(cmd: list[str], port: int, cpus: str | None, env: dict[str, str] | None = None,
            ready_path: str = "/v2/health/ready", timeout_s: float = 180.0
            ) -> Iterator[subprocess.Popen[bytes]]:  # fmt: skip
    """A server process (``cmd``, pinned to ``cpus``) that answers 200 on
    ``ready_path`` at ``port`` before the block runs; terminated after it."""
    import urllib.request

    server = subprocess.Popen([*_pin(cpus), *cmd], env=env)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{ready_path}", timeout=1):
                    break
            except Exception:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{cmd[2:5]} did not become ready") from None
                time.sleep(0.3)
        yield server
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)


def mmrank_env(threads: int, rows: int, **extra: str) -> dict[str, str]:
    """``mmrank serve``'s settings for a benchmark: ``threads`` ORT threads, one worker,
    ``rows`` per batch, a queue and deadline that a saturating load does not hit."""
    return {**os.environ, "MMRANK_BACKEND__THREADS": str(threads),
            "MMRANK_BACKEND__WORKERS": "1", "MMRANK_BATCHING__QUEUE_LIMIT": "256",
            "MMRANK_BATCHING__MAX_BATCH_ROWS": str(rows),
            "MMRANK_API__DEFAULT_DEADLINE_MS": "10000", **extra}  # fmt: skip


def given_or_built(args: Any) -> tuple[Path, Path]:
    """(model repository, embedded store): ``--repo`` and ``--store``, or a stack
    :func:`build_stack` builds in ``--work`` (default: a temporary directory)."""
    if args.repo:
        if not args.store:
            raise ValueError("--repo needs --store, the embedded store of its embeddings")
        return Path(args.repo), Path(args.store)
    work = Path(args.work or tempfile.mkdtemp(prefix="mmrank-bench-"))
    return build_stack(work, args.items, args.users)


RATIOS = ("throughput_ratio", "p50_delta_ms", "p50_delta_same_arrivals_ms", "cpu_ratio")


def bench_round(repo: Path, store: Path, reqs: list[Request], args: Any, rows: int
                ) -> dict[str, Any]:  # fmt: skip
    """One round: the model alone, the service (saturation, then half of it in an open
    loop), the model alone under that open loop's arrivals; with the four comparisons."""
    from feature_store.local_redis import free_port

    with pinned(args.server_cpus):  # the model alone runs where the server will
        model = model_only(repo, reqs, args.threads, args.seconds, rows)
    port = free_port()
    cmd = [sys.executable, "-m", "mmrank.cli", "serve", "--repo", str(repo), "--embedded",
           str(store), "--port", str(port), "--log-level", "warning"]  # fmt: skip
    with pinned(args.client_cpus), serving(cmd, port, args.server_cpus,
                                           mmrank_env(args.threads, rows)) as server:  # fmt: skip
        sat = asyncio.run(closed_loop("127.0.0.1", port, reqs, args.concurrency, args.seconds,
                                      server.pid))  # fmt: skip
        half = asyncio.run(open_loop("127.0.0.1", port, reqs, sat["throughput_rps"] / 2,
                                     args.seconds))  # fmt: skip
    with pinned(args.server_cpus):  # the same arrivals, the model alone, server stopped
        model_half = model_open_loop(repo, reqs, args.threads, half["rate_rps"], args.seconds,
                                     rows)  # fmt: skip
    return {
        "model_only": model,
        "saturation": sat,
        "half_load": half,
        "model_half_load": model_half,
        "throughput_ratio": sat["throughput_rps"] / model["throughput_rps"],
        "p50_delta_ms": half["p50_ms"] - model["p50_ms"],
        "p50_delta_same_arrivals_ms": half["p50_ms"] - model_half["p50_ms"],
        "cpu_ratio": model["cpu_ms_per_request"] / sat["cpu_ms_per_request"],
    }


def run_bench(args: Any) -> dict[str, Any]:
    """``args.rounds`` interleaved rounds (:func:`bench_round`) on one stack; the
    comparisons' medians over the rounds and their spread. Why rounds: on a shared
    machine the model alone's own speed moved by a third between runs minutes apart,
    so one pair of measurements says little; each round pairs measurements taken
    seconds apart."""
    repo, store = given_or_built(args)
    reqs = make_requests(repo, store, args.k, args.n, 200)
    n_real = int(np.median([r.feeds["hist_mask"].shape[1] for r in reqs]))
    rows = args.max_batch_rows or BatchingSettings().max_batch_rows
    rounds = [bench_round(repo, store, reqs, args, rows) for _ in range(max(1, args.rounds))]
    return {
        "setup": {
            "model": "camenn candidate-isolated d=64",
            "k": args.k,
            "n": n_real,
            "ort_threads": args.threads,
            "max_batch_rows": rows,
            "concurrency": args.concurrency,
            "server_cpus": args.server_cpus,
            "client_cpus": args.client_cpus,
            "cores": os.cpu_count(),
            "repo": str(repo),
            "seconds": args.seconds,
        },
        "rounds": rounds,
        **{k: statistics.median(r[k] for r in rounds) for k in RATIOS},
        "spread": {k: [min(r[k] for r in rounds), max(r[k] for r in rounds)] for k in RATIOS},
    }


def run_merge(args: Any) -> list[dict[str, float]]:
    """``mmrank bench-service --merge M ...``: :func:`merge_costs` at ``--k`` on the
    built (or given) stack, pinned to ``--server-cpus``."""
    repo, store = given_or_built(args)
    reqs = make_requests(repo, store, args.k, args.n, 64)
    with pinned(args.server_cpus):
        return merge_costs(repo, reqs, args.threads, args.merge)


def render_merge(rows: list[dict[str, float]]) -> str:
    lines = ["| K | requests per call (m) | m calls of one (ms per request) | one call of m "
             "| merged / separate | max score difference |", "|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['k']} | {r['m']} | {r['separate_ms']:.3f} | {r['merged_ms']:.3f} | "
              f"{r['merged_over_separate']:.2f} | {r['max_score_diff']:.1e} |" for r in rows]  # fmt: skip
    return "\n".join(lines) + "\n"


def render(res: dict[str, Any]) -> str:
    s, sp = res["setup"], res["spread"]
    lines = [
        f"service vs model only: CameNN candidate-isolated, K={s['k']}, N={s['n']}, ONNX Runtime "
        f"CPU, {s['ort_threads']} thread(s); server cpus {s['server_cpus'] or 'any'}, "
        f"load generator cpus {s['client_cpus'] or 'any'}; {len(res['rounds'])} rounds of "
        f"{s['seconds']:g} s per measurement, {s['concurrency']} connections at saturation",
        "",
        "| round | model alone req/s | end to end req/s (errors) | throughput ratio | model "
        "alone p50 ms: unloaded / same arrivals | end to end p50 ms at half load (req/s, "
        "errors) | p50 delta: vs unloaded / vs same arrivals | CPU per request ms: model / "
        "end to end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(res["rounds"], 1):
        m, sat, half, mh = r["model_only"], r["saturation"], r["half_load"], r["model_half_load"]
        lines.append(
            f"| {i} | {m['throughput_rps']:.1f} | {sat['throughput_rps']:.1f} ({sat['errors']}) "
            f"| {r['throughput_ratio']:.1%} | {m['p50_ms']:.2f} / {mh['p50_ms']:.2f} | "
            f"{half['p50_ms']:.2f} ({half['rate_rps']:.1f}, {half['errors']}) | "
            f"{r['p50_delta_ms']:+.2f} / {r['p50_delta_same_arrivals_ms']:+.2f} | "
            f"{m['cpu_ms_per_request']:.2f} / {sat['cpu_ms_per_request']:.2f} |"
        )
    lines += [
        "",
        f"median over rounds (min - max): throughput ratio {res['throughput_ratio']:.1%} "
        f"({sp['throughput_ratio'][0]:.1%} - {sp['throughput_ratio'][1]:.1%}; target >= 80%); "
        f"p50 delta vs the model alone unloaded {res['p50_delta_ms']:+.2f} ms "
        f"({sp['p50_delta_ms'][0]:+.2f} - {sp['p50_delta_ms'][1]:+.2f}), under the same "
        f"arrivals {res['p50_delta_same_arrivals_ms']:+.2f} ms "
        f"({sp['p50_delta_same_arrivals_ms'][0]:+.2f} - {sp['p50_delta_same_arrivals_ms'][1]:+.2f}"
        f"; target <= +3 ms); CPU ratio {res['cpu_ratio']:.1%} (the throughput ratio a "
        "dedicated core would give)",
    ]
    return "\n".join(lines) + "\n"
