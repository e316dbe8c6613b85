"""Fault, overload and soak scenarios on a :class:`reliability.rig.Rig`, and how their
outcomes are judged. Shared by the ``mmrank reliability`` commands (long, measured) and
tests/reliability (short, asserting behaviour).

The rules of issue 7 for a dependency fault under steady load:

- every request is answered within its deadline (+ ``slack_ms`` for the client's own
  scheduling on a loaded machine): a 200 (a full ranking, or one flagged ``degraded``)
  or a 503 with ``Retry-After``; nothing else, and no other 5xx;
- after the dependency returns, the share of full rankings is back to >= 99 % within
  ``recover_within_s`` (requests sent from then on, see :func:`recovery_s`);
- the service process is the same one throughout (no restart).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from reliability.load import (
    Outcome,
    RequestSource,
    closed_loop,
    open_loop,
    pct,
    rss_bytes,
    status_counts,
)
from reliability.rig import Rig

# -- faults ------------------------------------------------------------------------------


@dataclass
class Fault:
    """``begin`` starts the fault; ``end`` ends it (returns once the dependency is back)."""

    name: str
    begin: Callable[[Rig], None]
    end: Callable[[Rig], None]


def redis_faults(fault_s: float, slow_ms: float = 200.0) -> dict[str, Fault]:
    """The four Redis faults: SIGSTOP, kill (+ restart and reload), CLIENT PAUSE, and a
    TCP delay of ``slow_ms`` each way (past the store's per-command timeout)."""

    def pause_end(rig: Rig) -> None:
        """CLIENT PAUSE ends by itself; wait until Redis answers commands again."""
        assert rig.redis is not None
        c = rig.redis.client()
        try:
            c.ping()
        finally:
            c.close()

    return {
        "sigstop": Fault("sigstop", Rig.sigstop, Rig.sigcont),
        "kill": Fault("kill", Rig.kill_redis, lambda r: (r.restart_redis(), None)[1]),
        "pause": Fault("pause", lambda r: r.client_pause(int(fault_s * 1000)), pause_end),
        "slow": Fault("slow", lambda r: r.slow(slow_ms), lambda r: r.slow(0.0)),
    }


def triton_faults() -> dict[str, Fault]:
    """Triton as the backend: SIGKILL then started again on its ports; SIGSTOP/SIGCONT."""
    return {
        "triton-kill": Fault("triton-kill", Rig.triton_kill, Rig.triton_start),
        "triton-stop": Fault("triton-stop", Rig.triton_pause, Rig.triton_resume),
    }


# -- judging -----------------------------------------------------------------------------


def recovery_s(outs: Sequence[Outcome], since: float, target: float = 0.99,
               min_after: int = 20) -> float | None:  # fmt: skip
    """Seconds after ``since`` from which on the share of full rankings among the
    requests sent is >= ``target`` (and stays so to the end); None if never (or fewer
    than ``min_after`` requests are left to judge)."""
    after = sorted((o for o in outs if o.sent >= since), key=lambda o: o.sent)
    ok = np.array([o.ok for o in after], dtype=np.float64)
    if len(ok) < min_after:
        return None
    # share of ok among requests k.. end, for every k
    tail_ok = np.cumsum(ok[::-1])[::-1]
    tail_n = np.arange(len(ok), 0, -1)
    good = np.flatnonzero((tail_ok / tail_n >= target) & (tail_n >= min_after))
    return None if not len(good) else max(0.0, after[int(good[0])].sent - since)


@dataclass
class FaultReport:
    name: str
    requests: int
    statuses: dict[int, int]
    degraded: int
    late: int  # answered after deadline + slack
    disallowed: int  # not 200 / 503 with Retry-After (transport errors, 504, 500, ...)
    fault_s: float
    recovery_s: float | None
    max_ms: float
    same_process: bool
    problems: list[str] = field(default_factory=list)
    # the first answers sent after the dependency returned that were not full rankings:
    # (seconds after it returned, status, error code, ms taken); for diagnosing recovery
    late_failures: list[tuple[float, int, str | None, float]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def line(self) -> str:
        rec = "never" if self.recovery_s is None else f"{self.recovery_s:.2f}s"
        return (f"{self.name}: {self.requests} requests {self.statuses}, degraded {self.degraded}, "
                f"late {self.late}, disallowed {self.disallowed}, slowest {self.max_ms:.0f} ms, "
                f"fault {self.fault_s:.1f}s, >=99% ok again {rec} after it, same process "
                f"{self.same_process}: {'PASS' if self.passed else 'FAIL ' + '; '.join(self.problems)}")  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed}


def allowed(o: Outcome) -> bool:
    return o.status == 200 or (o.status == 503 and o.retry_after)


def judge_fault(name: str, outs: Sequence[Outcome], fault_end: float, fault_s: float,
                deadline_ms: float, same_process: bool, slack_ms: float = 100.0,
                recover_within_s: float = 5.0) -> FaultReport:  # fmt: skip
    sent = [o for o in outs if o.status != -1]
    late = [o for o in sent if o.took * 1e3 > deadline_ms + slack_ms]
    bad = sorted((o for o in sent if not allowed(o)), key=lambda o: o.sent)
    rec = recovery_s(sent, fault_end)
    r = FaultReport(name, len(sent), status_counts(sent), sum(o.degraded for o in sent), len(late),
                    len(bad), fault_s, rec, max((o.took for o in sent), default=0.0) * 1e3,
                    same_process)  # fmt: skip
    if late:
        r.problems.append(f"{len(late)} answers later than {deadline_ms:g} + {slack_ms:g} ms")
    if bad:
        when = [round(o.sent - (fault_end - fault_s), 2) for o in bad[:10]]
        r.problems.append(f"{len(bad)} answers neither 200 nor 503 + Retry-After: "
                          f"{status_counts(bad)} {sorted({str(o.error_code) for o in bad})}, "
                          f"sent at {when} s after the fault began")  # fmt: skip
    after = sorted((o for o in sent if o.sent >= fault_end and not o.ok), key=lambda o: o.sent)
    r.late_failures = [(round(o.sent - fault_end, 3), o.status, o.error_code, round(o.took * 1e3, 1))
                       for o in after[:10]]  # fmt: skip
    if rec is None or rec > recover_within_s:
        r.problems.append(f"full rankings not back to >= 99% within {recover_within_s:g}s "
                          f"(failures after it: {r.late_failures})")  # fmt: skip
    if not same_process:
        r.problems.append("the service process died or was replaced")
    if len(outs) - len(sent):
        r.problems.append(
            f"{len(outs) - len(sent)} requests dropped by the client (overloaded client)"
        )
    return r


async def run_fault(rig: Rig, src: RequestSource, fault: Fault, *, rate: float = 20.0,
                    before_s: float = 2.0, fault_s: float = 3.0, after_s: float = 7.0,
                    deadline_ms: float = 1000.0, slack_ms: float = 100.0) -> FaultReport:  # fmt: skip
    """Steady open-loop load at ``rate``; the fault from ``before_s`` for ``fault_s``;
    load goes on ``after_s`` after the dependency is back; judged (module docstring)."""
    assert rig.service is not None
    pid = rig.service.pid
    host, port = rig.host_port
    stop = asyncio.Event()
    load = asyncio.create_task(open_loop(host, port, src, rate, 1e9, deadline_ms, stop=stop))
    await asyncio.sleep(before_s)
    t0 = time.monotonic()
    await asyncio.to_thread(fault.begin, rig)
    await asyncio.sleep(max(0.0, fault_s - (time.monotonic() - t0)))
    await asyncio.to_thread(fault.end, rig)
    fault_end = time.monotonic()
    await asyncio.sleep(after_s)
    stop.set()
    outs = await load
    same = rig.service.alive() and rig.service.pid == pid
    return judge_fault(fault.name, outs, fault_end, fault_end - t0, deadline_ms, same, slack_ms)


# -- overload ----------------------------------------------------------------------------


@dataclass
class Step:
    factor: float
    offered_rps: float
    seconds: float
    statuses: dict[int, int]
    goodput_rps: float  # full rankings answered within the deadline, per second
    accepted_p50_ms: float
    accepted_p99_ms: float
    rejected_p99_ms: float  # 429s
    rejected_with_retry_after: float  # share of 429s carrying Retry-After
    client_drops: int
    rss_mb: float
    no_answer: dict[str, int] = field(default_factory=dict)  # status 0 by client exception


def summarize_step(factor: float, offered: float, seconds: float, outs: Sequence[Outcome],
                   deadline_ms: float, rss: int) -> Step:  # fmt: skip
    sent = [o for o in outs if o.status != -1]
    good = [o for o in sent if o.ok and o.took * 1e3 <= deadline_ms]
    acc = [o.took for o in sent if o.status == 200]
    rej = [o for o in sent if o.status == 429]
    return Step(factor, offered, seconds, status_counts(outs), len(good) / seconds, pct(acc, 50),
                pct(acc, 99), pct([o.took for o in rej], 99),
                (sum(o.retry_after for o in rej) / len(rej)) if rej else 1.0,
                len(outs) - len(sent), rss / 2**20,
                dict(Counter(str(o.error_code) for o in sent if o.status == 0)))  # fmt: skip


async def saturation(host: str, port: int, src: RequestSource, seconds: float,
                     concurrency: int = 8, deadline_ms: float = 1000.0) -> tuple[float, list[Outcome]]:  # fmt: skip
    """Throughput of full rankings with ``concurrency`` closed-loop clients (after a
    1 s warm-up that is not counted)."""
    await closed_loop(host, port, src, concurrency, 1.0, deadline_ms)
    outs = await closed_loop(host, port, src, concurrency, seconds, deadline_ms)
    return sum(o.ok for o in outs) / seconds, outs


async def overload(rig: Rig, src: RequestSource, sat_rps: float, factors: Sequence[float],
                   seconds: float, deadline_ms: float = 1000.0,
                   max_in_flight: int = 2048) -> list[Step]:  # fmt: skip
    """Open-loop steps at ``factor * sat_rps`` each, one after the other."""
    assert rig.service is not None
    host, port = rig.host_port
    steps = []
    for f in factors:
        outs = await open_loop(host, port, src, f * sat_rps, seconds, deadline_ms,
                               max_in_flight=max_in_flight, seed=int(f * 100))  # fmt: skip
        steps.append(summarize_step(f, f * sat_rps, seconds, outs, deadline_ms,
                                    rss_bytes(rig.service.pid)))  # fmt: skip
        await asyncio.sleep(1.0)  # let the queue empty between steps
    return steps


def judge_overload(steps: Sequence[Step], rss_start: int) -> list[str]:
    """Issue 7's overload targets against the 1x step; the misses (empty: all met)."""
    base = next(s for s in steps if s.factor == 1)
    out = []
    for s in steps:
        if s.factor <= 1:
            continue
        if s.goodput_rps < 0.9 * base.goodput_rps:
            out.append(f"{s.factor:g}x: goodput {s.goodput_rps:.1f}/s < 90% of 1x "
                       f"{base.goodput_rps:.1f}/s")  # fmt: skip
        if s.accepted_p99_ms > 1.5 * base.accepted_p99_ms:
            out.append(f"{s.factor:g}x: accepted p99 {s.accepted_p99_ms:.0f} ms > 1.5 x 1x "
                       f"{base.accepted_p99_ms:.0f} ms")  # fmt: skip
        if s.rejected_p99_ms > 15:
            out.append(f"{s.factor:g}x: 429 p99 {s.rejected_p99_ms:.1f} ms > 15 ms")
        if s.rejected_with_retry_after < 1:
            out.append(f"{s.factor:g}x: a 429 without Retry-After")
        bad5 = {k: v for k, v in s.statuses.items() if k >= 500 or k == 0}
        if bad5:
            out.append(f"{s.factor:g}x: answers {bad5}")
    if rss_start and steps[-1].rss_mb * 2**20 > 1.5 * rss_start:
        out.append(f"RSS grew from {rss_start / 2**20:.0f} to {steps[-1].rss_mb:.0f} MB")
    return out


# -- soak --------------------------------------------------------------------------------


@dataclass
class SoakWindow:
    start_s: float
    requests: int
    errors: int  # not a full ranking within the deadline
    p99_ms: float
    rss_mb: float
    paused: bool  # a Redis pause fell in this window
    statuses: dict[int, int] = field(default_factory=dict)


async def soak(rig: Rig, src: RequestSource, rate: float, seconds: float, pause_every_s: float,
               pause_ms: int, window_s: float = 30.0, deadline_ms: float = 1000.0) -> list[SoakWindow]:  # fmt: skip
    """Open-loop load at ``rate`` for ``seconds``; ``CLIENT PAUSE pause_ms`` every
    ``pause_every_s`` (first one after one interval); per-window error rate, p99, RSS."""
    assert rig.service is not None
    host, port = rig.host_port
    pid = rig.service.pid
    t0 = time.monotonic()
    stop = asyncio.Event()
    pauses: list[float] = []
    rss: list[tuple[float, int]] = []

    async def pauser() -> None:
        while not stop.is_set():
            await asyncio.sleep(pause_every_s)
            if stop.is_set():
                break
            pauses.append(time.monotonic() - t0)
            await asyncio.to_thread(rig.client_pause, pause_ms)

    async def sampler() -> None:
        while not stop.is_set():
            rss.append((time.monotonic() - t0, rss_bytes(pid)))
            await asyncio.sleep(2.0)

    side = [asyncio.create_task(pauser()), asyncio.create_task(sampler())]
    outs = await open_loop(host, port, src, rate, seconds, deadline_ms)
    stop.set()
    for t in side:
        t.cancel()
    await asyncio.gather(*side, return_exceptions=True)
    windows = []
    n = max(1, int(np.ceil(seconds / window_s)))
    for k in range(n):
        a, b = k * window_s, (k + 1) * window_s
        w = [o for o in outs if a <= o.sent - t0 < b and o.status != -1]
        mem = [r for t, r in rss if a <= t < b] or [rss_bytes(pid)]
        windows.append(SoakWindow(a, len(w), sum(not (o.ok and o.took * 1e3 <= deadline_ms) for o in w),
                                  pct([o.took for o in w if o.status == 200], 99), max(mem) / 2**20,
                                  any(a - 1.0 <= p < b for p in pauses), status_counts(w)))  # fmt: skip
    return windows
