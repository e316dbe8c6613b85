"""Load on ``POST /v1/rank`` from a small raw HTTP/1.1 client (asyncio streams,
keep-alive, pre-encoded requests): a Python HTTP library costs more CPU per request
than the service's own work at these rates on 2 cores.

Two shapes: :func:`closed_loop` (N clients, each sends when its last answer came;
measures saturation) and :func:`open_loop` (a fixed offered rate whatever the answers;
what overload means). Every request becomes one :class:`Outcome`; a request the
client could not send because ``max_in_flight`` answers were outstanding is recorded
as ``status == -1`` (client-side drop), one that got no answer within
``deadline + answer_slack_s`` (or a broken connection) as ``status == 0``. While
either runs, the objects that existed before it are left out of garbage collection
(:func:`frozen_gc`), so a collection of the calling process cannot stall the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

RANK = "/v1/rank"
_VERSION = re.compile(rb'"embedding_version":"([^"]*)"')
DEADLINE_HEADER = "x-mmrank-deadline-ms"


@dataclass
class Outcome:
    """One request: when it was sent (``time.monotonic()``), how long the answer took,
    its status and what the body said."""

    sent: float
    took: float
    status: int
    tag: int = -1  # which body (see RequestSource)
    retry_after: bool = False
    degraded: bool = False
    version: str | None = None  # embedding_version
    model: str | None = None
    items: list[dict[str, Any]] | None = None  # kept only with keep_items
    error_code: str | None = None  # the error body's code, or the client's exception

    @property
    def ok(self) -> bool:
        """A full (not degraded) ranking."""
        return self.status == 200 and not self.degraded


@dataclass
class RequestSource:
    """Pre-encoded ranking requests, cycled through; ``tag`` is the index."""

    bodies: list[dict[str, Any]]
    encoded: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.encoded = [orjson.dumps(b) for b in self.bodies]

    def __len__(self) -> int:
        return len(self.bodies)

    @classmethod
    def sample(cls, users: Sequence[str], items: Sequence[str], n: int, k: int,
               seed: int = 0) -> RequestSource:  # fmt: skip
        """``n`` requests of ``k`` distinct candidates, uniform users and items."""
        rng = np.random.default_rng(seed)
        k = min(k, len(items))
        bodies = [{"user_id": str(users[int(rng.integers(len(users)))]),
                   "candidates": [str(items[int(j)]) for j in rng.choice(len(items), k, replace=False)]}
                  for _ in range(n)]  # fmt: skip
        return cls(bodies)


IDLE_S = 2.0  # keep-alive connections idle longer are not reused (a server may close them:
# uvicorn's own default is 5 s; mmrank serve's api.keep_alive_s, 75 s, can be set lower)


class _Conn:
    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w = r, w
        self.used = time.monotonic()

    def close(self) -> None:
        self.w.close()


class HttpClient:
    """Keep-alive connections to one ``host:port``, at most ``max_conns`` open."""

    def __init__(self, host: str, port: int, max_conns: int = 256) -> None:
        self.host, self.port = host, port
        self._idle: list[_Conn] = []
        self._sem = asyncio.Semaphore(max_conns)

    def head(self, path: str, n: int, headers: dict[str, str]) -> bytes:
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        return (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {n}\r\n{extra}\r\n").encode()  # fmt: skip

    async def request(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        """(status, lower-cased headers, body); OSError / IncompleteReadError on a
        broken connection."""
        async with self._sem:
            conn = self._idle.pop() if self._idle else None
            while conn is not None and time.monotonic() - conn.used > IDLE_S:
                conn.close()  # the server may have closed it: a race we would call an error
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = _Conn(*await asyncio.open_connection(self.host, self.port))
            try:
                conn.w.write(raw)
                head = await conn.r.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                status = int(lines[0].split(" ", 2)[1])
                headers = {}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    if k:
                        headers[k.strip().lower()] = v.strip()
                body = await conn.r.readexactly(int(headers.get("content-length", "0")))
            except BaseException:
                conn.close()
                raise
            if headers.get("connection", "").lower() == "close":
                conn.close()
            else:
                conn.used = time.monotonic()
                self._idle.append(conn)
            return status, headers, body

    def close(self) -> None:
        for c in self._idle:
            c.close()
        self._idle.clear()


async def send_one(client: HttpClient, src: RequestSource, tag: int, deadline_ms: float,
                   answer_slack_s: float = 2.0, keep_items: bool = False) -> Outcome:  # fmt: skip
    """One ranking request, never raising: transport problems are ``status == 0``."""
    body = src.encoded[tag % len(src)]
    raw = client.head(RANK, len(body), {DEADLINE_HEADER: f"{deadline_ms:g}"}) + body
    t0 = time.monotonic()
    try:
        status, headers, payload = await asyncio.wait_for(
            client.request(raw), deadline_ms / 1e3 + answer_slack_s
        )
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
            ValueError) as exc:  # fmt: skip
        return Outcome(t0, time.monotonic() - t0, 0, tag, error_code=type(exc).__name__)
    took = time.monotonic() - t0
    out = Outcome(t0, took, status, tag, retry_after="retry-after" in headers)
    if status == 200 and not keep_items:  # the hot case: no full parse (client CPU)
        out.degraded = b'"degraded":true' in payload
        m = _VERSION.search(payload)
        out.version = m.group(1).decode() if m else None
        return out
    try:
        obj = orjson.loads(payload) if payload else {}
    except orjson.JSONDecodeError:
        obj = {}
    if status == 200:
        out.degraded = bool(obj.get("degraded"))
        out.version = obj.get("embedding_version")
        out.model = (obj.get("model") or {}).get("version")
        if keep_items:
            out.items = obj.get("items")
    elif isinstance(obj.get("error"), dict):
        out.error_code = obj["error"].get("code")
    return out


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """Leave the objects that exist now out of garbage collection until the block ends
    (``gc.freeze``; new objects are still collected). Why: a full collection of a test
    process that has run other tests (~650k tracked objects) took up to 0.6 s here,
    during which this client and a :class:`~reliability.proxy.DelayProxy` thread in
    the same process stall, and the stall reads as the service's. Not nestable."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def closed_loop(host: str, port: int, src: RequestSource, concurrency: int,
                      duration_s: float, deadline_ms: float = 1000.0,
                      stop: asyncio.Event | None = None, keep_items: bool = False,
                      think_s: float = 0.0) -> list[Outcome]:  # fmt: skip
    """``concurrency`` clients in a loop until ``duration_s`` passed or ``stop`` is set."""
    client = HttpClient(host, port, concurrency)
    out: list[Outcome] = []
    end = time.monotonic() + duration_s
    counter = iter(range(1 << 62))

    async def worker() -> None:
        while time.monotonic() < end and not (stop and stop.is_set()):
            out.append(await send_one(client, src, next(counter), deadline_ms,
                                      keep_items=keep_items))  # fmt: skip
            if think_s:
                await asyncio.sleep(think_s)

    try:
        with frozen_gc():
            await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        client.close()
    return out


async def open_loop(host: str, port: int, src: RequestSource, rate: float, duration_s: float,
                    deadline_ms: float = 1000.0, max_in_flight: int = 512,
                    stop: asyncio.Event | None = None, keep_items: bool = False,
                    poisson: bool = True, seed: int = 0,
                    rate_of: Callable[[float], float] | None = None) -> list[Outcome]:  # fmt: skip
    """Offer ``rate`` requests/s (Poisson arrivals by default) for ``duration_s``,
    whatever the answers; ``rate_of(elapsed_s)`` may vary it. Requests beyond
    ``max_in_flight`` outstanding are recorded as client-side drops (status -1)."""
    client = HttpClient(host, port, max_in_flight)
    rng = np.random.default_rng(seed)
    out: list[Outcome] = []
    tasks: set[asyncio.Task[None]] = set()
    t_start = time.monotonic()
    next_at = t_start
    tag = 0

    async def one(k: int) -> None:
        out.append(await send_one(client, src, k, deadline_ms, keep_items=keep_items))

    try:
        with frozen_gc():
            while True:
                now = time.monotonic()
                if now - t_start >= duration_s or (stop and stop.is_set()):
                    break
                if next_at > now:
                    await asyncio.sleep(next_at - now)
                r = rate_of(now - t_start) if rate_of else rate
                gap = rng.exponential(1.0 / r) if poisson else 1.0 / r
                next_at += gap
                if len(tasks) >= max_in_flight:
                    out.append(Outcome(time.monotonic(), 0.0, -1, tag))
                else:
                    t = asyncio.create_task(one(tag))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                tag += 1
            if tasks:
                await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)
        client.close()
    return out


# -- summaries -------------------------------------------------------------------------
def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) in ms of durations in seconds; NaN when empty."""
    return float(np.percentile(np.asarray(values) * 1e3, q)) if len(values) else float("nan")


def status_counts(outs: Sequence[Outcome]) -> dict[int, int]:
    c: dict[int, int] = {}
    for o in outs:
        c[o.status] = c.get(o.status, 0) + 1
    return dict(sorted(c.items()))


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (Linux /proc), 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0
