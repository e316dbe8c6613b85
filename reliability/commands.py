"""``mmrank reliability faults|overload|soak``: the long, measured versions of
tests/reliability, on a stack directory (``mmrank stack --build-only``; built here if
missing, which needs the train extra). Each prints one line per result and a verdict
against issue 7's targets, writes JSON with ``--out``, and exits 1 when a target is
missed. Parsers only: the work is imported when a command runs."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

log = logging.getLogger("mmrank.reliability")


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _env(pairs: list[str]) -> dict[str, str]:
    from deploy.commands import _env_pairs

    return _env_pairs(pairs)


def _setup(args: argparse.Namespace, extra_env: dict[str, str] | None = None) -> tuple[Any, Any]:
    """(Rig, RequestSource) for the stack directory; the rig is not started yet."""
    from deploy.stack import StackInputs, build_inputs
    from feature_store.catalogs import resolve
    from feature_store.embed import build_version, load_embeddings
    from feature_store.loader import load_version
    from reliability.load import RequestSource
    from reliability.rig import Rig

    inputs = StackInputs(Path(args.dir))
    if inputs.missing():
        log.info("building stack inputs in %s (missing %s)", inputs.root, inputs.missing())
        build_inputs(inputs.root)
    data = build_version(
        load_embeddings(inputs.embeddings), resolve(f"world:{inputs.world}")[2], "r1"
    )

    def load(client: Any) -> None:
        load_version(client, data, "mmrank", grace_s=0)

    if args.client_cpus:
        os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
    ids = json.loads(inputs.ids.read_text())
    src = RequestSource.sample(ids["users"], ids["items"], 256, args.k, seed=0)
    env = (extra_env or {}) | _env(args.env)
    rig = Rig(inputs.repo, load, env, server_cpus=args.server_cpus, log_level="warning",
              triton=getattr(args, "triton", False))  # fmt: skip
    return rig, src


def _conditions(args: argparse.Namespace) -> str:
    load = os.getloadavg()
    return (f"conditions: K={args.k} candidates, server cpus {args.server_cpus or 'any'}, client "
            f"cpus {args.client_cpus or 'any'}, {os.cpu_count()} cores, load average "
            f"{load[0]:.1f}/{load[1]:.1f}, env {args.env or 'defaults'}")  # fmt: skip


def _write(args: argparse.Namespace, obj: dict[str, Any]) -> None:
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(obj, indent=2, default=str) + "\n")


def _faults(args: argparse.Namespace) -> int:
    from reliability.scenarios import redis_faults, run_fault, triton_faults

    rig, src = _setup(args, {"MMRANK_API__DEGRADED": args.degraded,
                             "MMRANK_BACKEND__TIMEOUT_MS": str(args.backend_timeout_ms)})  # fmt: skip
    catalog = redis_faults(args.fault_s, args.slow_ms) | triton_faults()
    names = args.faults.split(",")
    unknown = [n for n in names if n not in catalog]
    if unknown:
        raise ValueError(f"--faults: unknown {unknown}; known: {', '.join(catalog)}")
    if any(n.startswith("triton") for n in names) and not args.triton:
        raise ValueError("Triton faults need --triton (the service then scores on Triton)")
    reports = []
    with rig:
        _say(_conditions(args) + f"; deadline {args.deadline_ms:g} ms, {args.rate:g} req/s")
        for n in names:
            rep = asyncio.run(run_fault(rig, src, catalog[n], rate=args.rate, before_s=args.before_s,
                                        fault_s=args.fault_s, after_s=args.after_s,
                                        deadline_ms=args.deadline_ms))  # fmt: skip
            reports.append(rep)
            _say(rep.line())
    _write(args, {"faults": [r.as_dict() for r in reports]})
    return 0 if all(r.passed for r in reports) else 1


def _overload(args: argparse.Namespace) -> int:
    from reliability.load import rss_bytes
    from reliability.scenarios import judge_overload, overload, saturation

    rig, src = _setup(args)
    factors = [float(f) for f in args.factors.split(",")]
    if 1.0 not in factors:
        raise ValueError("--factors must include 1 (the reference step)")
    with rig:
        assert rig.service is not None
        host, port = rig.host_port
        _say(_conditions(args))
        rss0 = rss_bytes(rig.service.pid)
        sat, outs = asyncio.run(saturation(host, port, src, args.seconds, args.concurrency,
                                           args.deadline_ms))  # fmt: skip
        _say(f"saturation: {sat:.1f} full rankings/s with {args.concurrency} closed-loop clients "
             f"({len(outs)} requests in {args.seconds:g}s)")  # fmt: skip
        steps = asyncio.run(overload(rig, src, sat, factors, args.seconds, args.deadline_ms))
        alive = rig.service.alive()
    _say("| x sat | offered/s | goodput/s | accepted p50 ms | accepted p99 ms | 429 p99 ms | "
         "statuses | client drops | RSS MB |")  # fmt: skip
    _say("|---|---|---|---|---|---|---|---|---|")
    for s in steps:
        _say(f"| {s.factor:g} | {s.offered_rps:.1f} | {s.goodput_rps:.1f} | {s.accepted_p50_ms:.1f} | "
             f"{s.accepted_p99_ms:.1f} | {s.rejected_p99_ms:.1f} | {s.statuses} | {s.client_drops} | "
             f"{s.rss_mb:.0f} |")  # fmt: skip
    misses = judge_overload(steps, rss0)
    if not alive:
        misses.append("the service died")
    base = steps[factors.index(1.0)]
    for s in steps:
        if s.factor > 1:
            _say(f"{s.factor:g}x: goodput {s.goodput_rps / base.goodput_rps:.2f} of 1x (target >= 0.90), "
                 f"accepted p99 {s.accepted_p99_ms / base.accepted_p99_ms:.2f} x 1x (target <= 1.5), "
                 f"429 p99 {s.rejected_p99_ms:.1f} ms (target <= 15)")  # fmt: skip
    _say(
        f"RSS {rss0 / 2**20:.0f} MB at start, {steps[-1].rss_mb:.0f} MB at the end; service alive: {alive}"
    )
    _say("verdict: " + ("all targets met" if not misses else "MISSED: " + "; ".join(misses)))
    _write(args, {"saturation_rps": sat, "steps": [asdict(s) for s in steps], "misses": misses,
                  "conditions": _conditions(args)})  # fmt: skip
    return 0 if not misses else 1


def _soak(args: argparse.Namespace) -> int:
    import numpy as np

    from reliability.scenarios import saturation, soak

    rig, src = _setup(args)
    seconds = args.minutes * 60
    with rig:
        host, port = rig.host_port
        _say(_conditions(args))
        sat = (
            args.saturation_rps
            or asyncio.run(saturation(host, port, src, 15.0, 8, args.deadline_ms))[0]
        )
        rate = args.load * sat
        _say(f"soak: {rate:.1f} req/s ({args.load:.0%} of {sat:.1f}/s) for {args.minutes:g} min, "
             f"CLIENT PAUSE {args.pause_ms} ms every {args.pause_every_s:g}s")  # fmt: skip
        windows = asyncio.run(soak(rig, src, rate, seconds, args.pause_every_s, args.pause_ms,
                                   args.window_s, args.deadline_ms))  # fmt: skip
    _say("| from s | requests | errors | p99 ms | RSS MB | Redis pause | answers |")
    _say("|---|---|---|---|---|---|---|")
    for w in windows:
        _say(f"| {w.start_s:.0f} | {w.requests} | {w.errors} | {w.p99_ms:.1f} | {w.rss_mb:.0f} | "
             f"{w.paused} | {w.statuses} |")  # fmt: skip
    total = sum(w.requests for w in windows)
    errors = sum(w.errors for w in windows)
    quiet = [w for w in windows if not w.paused] or windows
    q_err = sum(w.errors for w in quiet) / max(1, sum(w.requests for w in quiet))
    p99s = [w.p99_ms for w in quiet if np.isfinite(w.p99_ms)]
    drift = p99s[-1] / p99s[0] if len(p99s) >= 2 else float("nan")
    rss_growth = windows[-1].rss_mb / windows[0].rss_mb - 1 if len(windows) >= 2 else float("nan")
    _say(f"error rate {errors / max(1, total):.4%} overall ({errors}/{total}), {q_err:.4%} in "
         f"windows without a pause; p99 drift (last / first quiet window) {drift:.2f}; "
         f"RSS growth first -> last window {rss_growth:+.1%} (target < 5%)")  # fmt: skip
    ok = rss_growth < 0.05
    _say("verdict: " + ("RSS target met" if ok else "RSS target MISSED"))
    _write(args, {"windows": [asdict(w) for w in windows], "error_rate": errors / max(1, total),
                  "quiet_error_rate": q_err, "p99_drift": drift, "rss_growth": rss_growth,
                  "rate": rate, "conditions": _conditions(args)})  # fmt: skip
    return 0 if ok else 1


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default="runs/stack", help="stack inputs (built if missing)")
    p.add_argument("--k", type=int, default=100, help="candidates per request")
    p.add_argument("--deadline-ms", type=float, default=1000.0, help="sent with every request")
    p.add_argument("--server-cpus", help="taskset CPU list for the service, e.g. 1")
    p.add_argument("--client-cpus", help="CPUs for this load generator, e.g. 0")
    p.add_argument("--env", action="append", default=[], metavar="MMRANK_X=V",
                   help="service settings (repeatable)")  # fmt: skip
    p.add_argument("--out", help="write the results as JSON here")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``reliability`` (faults, overload, soak) to the ``mmrank`` subcommands."""
    rel = sub.add_parser("reliability", help="fault injection, overload and soak runs (issue 7)")
    rs = rel.add_subparsers(dest="reliability_command", required=True)

    f = rs.add_parser("faults", help="Redis / Triton faults under steady load, judged")
    _common(f)
    f.add_argument("--faults", default="sigstop,kill,pause,slow",
                   help="comma list of sigstop, kill, pause, slow, triton-kill, triton-stop")  # fmt: skip
    f.add_argument("--triton", action="store_true", help="the service scores on a local Triton")
    f.add_argument("--rate", type=float, default=20.0, help="offered req/s (open loop)")
    f.add_argument("--fault-s", type=float, default=5.0, help="how long each fault lasts")
    f.add_argument("--before-s", type=float, default=3.0)
    f.add_argument("--after-s", type=float, default=8.0, help="load after the dependency is back")
    f.add_argument("--slow-ms", type=float, default=200.0, help="TCP delay each way (slow fault)")
    f.add_argument("--degraded", choices=["fail", "input_order"], default="fail")
    f.add_argument("--backend-timeout-ms", type=float, default=400.0,
                   help="backend call timeout, below the deadline (a frozen backend -> 503)")  # fmt: skip
    f.set_defaults(func=_faults)

    o = rs.add_parser("overload", help="saturation, then 1x / 2x / 5x of it, judged")
    _common(o)
    o.add_argument("--seconds", type=float, default=20.0, help="per step (and for saturation)")
    o.add_argument("--concurrency", type=int, default=4,
                   help="closed-loop clients for saturation (keep it <= api.max_in_flight)")  # fmt: skip
    o.add_argument("--factors", default="1,2,5", help="offered load as multiples of saturation")
    o.set_defaults(func=_overload)

    s = rs.add_parser("soak", help="~70%% of saturation with Redis pauses; error rate, p99, RSS")
    _common(s)
    s.add_argument("--minutes", type=float, default=10.0)
    s.add_argument("--load", type=float, default=0.7, help="share of saturation offered")
    s.add_argument("--saturation-rps", type=float, help="skip measuring saturation")
    s.add_argument("--pause-every-s", type=float, default=180.0)
    s.add_argument("--pause-ms", type=int, default=2000)
    s.add_argument("--window-s", type=float, default=60.0)
    s.set_defaults(func=_soak)
