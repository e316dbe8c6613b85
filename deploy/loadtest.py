"""``mmrank loadtest``: Locust headless against a running stack, then a report and an
SLO verdict.

1. ``locust -f loadtests/locustfile.py --headless`` in a subprocess (optionally pinned
   with ``taskset``), offered load in steps (:class:`loadtests.locustfile.StepLoad`);
   Locust's CSV files (``locust_stats.csv``, ``locust_stats_history.csv``, ...) and the
   per-request log ``requests.csv`` land in ``--out``;
2. :func:`analyze` turns ``requests.csv`` into one row per step: offered and achieved
   requests/s, p50/p95/p99 latency of the successful requests, error rate (any
   non-200 answer or a wrong body), plus p99 per K;
3. ``steps.csv``, ``summary.json``, ``report.md`` and ``latency.png`` (latency
   percentiles against offered load) are written;
4. the verdict: every step whose offered load is at most ``--slo-at-rps`` (default:
   every step) must have p99 <= ``--slo-p99-ms`` and error rate <= ``--slo-error-rate``.

Exit codes: 0 the SLO is met, 1 it is missed, 2 bad input or Locust failed.
``--report-only`` re-judges an existing ``requests.csv`` with other thresholds.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LOCUSTFILE = Path(__file__).resolve().parent.parent / "loadtests" / "locustfile.py"


class LoadTestError(RuntimeError):
    """Locust could not run, or produced nothing to judge."""


@dataclass
class Slo:
    p99_ms: float = 500.0
    error_rate: float = 0.01
    at_rps: float | None = None  # judge only steps offering at most this; None: all

    def __post_init__(self) -> None:
        if not self.p99_ms > 0 or not 0 <= self.error_rate <= 1:
            raise ValueError("--slo-p99-ms must be > 0 and --slo-error-rate in [0, 1]")


@dataclass
class Step:
    offered_rps: float
    requests: int
    achieved_rps: float
    ok: int
    error_rate: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    server_p50_ms: float
    p99_by_k: dict[int, float]
    errors: dict[str, int]
    judged: bool = False
    met: bool = True
    why: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]


def read_requests(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise LoadTestError(f"{path} not found: no requests were logged")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise LoadTestError(f"{path} holds no requests: the load generator sent nothing")
    return rows


def analyze(rows: list[dict[str, str]], slo: Slo) -> list[Step]:
    """One :class:`Step` per offered load, in order, judged against ``slo``."""
    by_step: dict[float, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        by_step[float(r["offered_rps"])].append(r)
    steps = []
    for offered in sorted(by_step):
        rs = by_step[offered]
        ts = [float(r["t"]) for r in rs]
        span = max(max(ts) - min(ts), 1e-9)
        good = [r for r in rs if not r["error"]]
        lat = [float(r["latency_ms"]) for r in good]
        by_k: dict[int, list[float]] = defaultdict(list)
        for r in good:
            by_k[int(r["k"])].append(float(r["latency_ms"]))
        errors: dict[str, int] = defaultdict(int)
        for r in rs:
            if r["error"]:
                errors[r["error"]] += 1
        st = Step(
            offered_rps=offered,
            requests=len(rs),
            achieved_rps=(len(rs) - 1) / span if len(rs) > 1 else 0.0,
            ok=len(good),
            error_rate=1 - len(good) / len(rs),
            p50_ms=percentile(lat, 50),
            p95_ms=percentile(lat, 95),
            p99_ms=percentile(lat, 99),
            server_p50_ms=percentile([float(r["server_ms"]) for r in good], 50),
            p99_by_k={k: percentile(v, 99) for k, v in sorted(by_k.items())},
            errors=dict(errors),
        )
        st.judged = slo.at_rps is None or offered <= slo.at_rps
        if st.judged:
            if not st.p99_ms <= slo.p99_ms:  # NaN (no success) misses too
                st.why.append(f"p99 {st.p99_ms:.1f} ms > {slo.p99_ms:g} ms")
            if st.error_rate > slo.error_rate:
                st.why.append(f"error rate {st.error_rate:.2%} > {slo.error_rate:.2%}")
            st.met = not st.why
        steps.append(st)
    return steps


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.1f}"


def render_markdown(steps: list[Step], slo: Slo, meta: dict[str, Any]) -> str:
    met = all(s.met for s in steps)
    ks = sorted({k for s in steps for k in s.p99_by_k})
    lines = [
        "# mmrank load test",
        "",
        f"**SLO {'met' if met else 'MISSED'}**: p99 <= {slo.p99_ms:g} ms and error rate <= "
        f"{slo.error_rate:.2%} at every step offering "
        + ("any load" if slo.at_rps is None else f"<= {slo.at_rps:g} req/s")
        + ".",
        "",
        f"Target {meta.get('host')}; {meta.get('machine')}; load generator CPU "
        f"{meta.get('locust_cpu_s', math.nan):.1f} s over {meta.get('wall_s', math.nan):.1f} s "
        f"wall ({meta.get('locust_cpu_share', math.nan):.0%} of a core). Mix: {meta.get('mix')}. "
        "Latency is client-side, over successful requests; errors are non-200 answers or "
        "wrong bodies.",
        "",
        "| offered req/s | achieved req/s | requests | error rate | p50 ms | p95 ms | p99 ms | "
        "server p50 ms | " + " | ".join(f"p99 K={k}" for k in ks) + " | SLO |",
        "|" + "---|" * (9 + len(ks)),
    ]
    for s in steps:
        verdict = ("met" if s.met else "missed: " + "; ".join(s.why)) if s.judged else "not judged"
        lines.append(
            f"| {s.offered_rps:g} | {s.achieved_rps:.1f} | {s.requests} | {s.error_rate:.2%} | "
            f"{_fmt(s.p50_ms)} | {_fmt(s.p95_ms)} | {_fmt(s.p99_ms)} | {_fmt(s.server_p50_ms)} | "
            + " | ".join(_fmt(s.p99_by_k.get(k, math.nan)) for k in ks)
            + f" | {verdict} |"
        )
    errs: dict[str, int] = defaultdict(int)
    for s in steps:
        for e, n in s.errors.items():
            errs[e] += n
    if errs:
        lines += ["", "Errors: " + ", ".join(f"{e} x{n}" for e, n in sorted(errs.items()))]
    lines += ["", "![latency against offered load](latency.png)", ""]
    return "\n".join(lines)


def plot(steps: list[Step], slo: Slo, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [s.offered_rps for s in steps]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, attr in (("p50", "p50_ms"), ("p95", "p95_ms"), ("p99", "p99_ms")):
        ax.plot(x, [getattr(s, attr) for s in steps], marker="o", label=name)
    ax.axhline(slo.p99_ms, color="red", linestyle="--", linewidth=1, label="p99 SLO")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(x, [s.achieved_rps for s in steps], color="gray", linestyle=":", marker="x",
             label="achieved req/s")  # fmt: skip
    ax2.set_ylabel("achieved requests/s")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    ax.set_title("mmrank: client latency percentiles against offered load")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_report(out: Path, slo: Slo, meta: dict[str, Any]) -> tuple[bool, list[Step]]:
    """Analyse ``out/requests.csv`` and write steps.csv, summary.json, report.md and
    latency.png; (SLO met?, steps)."""
    steps = analyze(read_requests(out / "requests.csv"), slo)
    met = all(s.met for s in steps)
    with open(out / "steps.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["offered_rps", "achieved_rps", "requests", "error_rate", "p50_ms", "p95_ms",
                    "p99_ms", "server_p50_ms", "judged", "met"])  # fmt: skip
        for s in steps:
            w.writerow([s.offered_rps, f"{s.achieved_rps:.3f}", s.requests, f"{s.error_rate:.5f}",
                        s.p50_ms, s.p95_ms, s.p99_ms, s.server_p50_ms, s.judged, s.met])  # fmt: skip
    summary = {"slo": asdict(slo), "met": met, "meta": meta, "steps": [asdict(s) for s in steps]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "report.md").write_text(render_markdown(steps, slo, meta))
    plot(steps, slo, out / "latency.png")
    return met, steps


def check_mix(step_rps: str, k_mix: str, unknown: float, missing: float) -> list[float]:
    """The offered loads; ValueError naming the flag when any load option is malformed
    (checked here so Locust is never started with options its locustfile rejects)."""
    try:
        steps = [float(x) for x in step_rps.split(",") if x.strip()]
    except ValueError:
        steps = []
    if not steps or any(not x > 0 for x in steps):
        raise ValueError(f"--steps {step_rps!r}: want positive requests/s, e.g. 2,4,8")
    try:
        pairs = [p.partition(":") for p in k_mix.split(",")]
        ok = all(int(k) >= 1 and float(w or 1) > 0 for k, _, w in pairs)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"--k-mix {k_mix!r}: want K:weight pairs, e.g. 100:0.5,500:0.3,1000:0.2")
    for name, rate in (("--unknown-user-rate", unknown), ("--missing-item-rate", missing)):
        if not 0 <= rate <= 1:
            raise ValueError(f"{name} {rate}: want a fraction in [0, 1]")
    return steps


def _check_host(host: str) -> None:
    """ValueError unless ``host`` answers ``/v2/health/live`` (any HTTP status counts)."""
    import urllib.error
    import urllib.request

    if not host.startswith(("http://", "https://")):
        raise ValueError(f"--host {host!r}: want a base URL such as http://127.0.0.1:8000")
    try:
        urllib.request.urlopen(host.rstrip("/") + "/v2/health/live", timeout=5).close()
    except urllib.error.HTTPError:
        pass  # it answers; the load test will tell how well
    except (urllib.error.URLError, OSError) as exc:
        raise ValueError(
            f"no service answers at {host} ({exc}); start one with `mmrank stack`"
        ) from exc


def run_locust(
    host: str,
    ids: Path,
    out: Path,
    *,
    step_rps: str,
    step_seconds: float,
    user_rps: float,
    k_mix: str,
    unknown_user_rate: float,
    missing_item_rate: float,
    deadline_ms: float,
    seed: int,
    client_cpus: str | None = None,
    locustfile: Path = LOCUSTFILE,
) -> dict[str, Any]:
    """Run Locust headless to the end of its step shape; its wall and CPU time."""
    if not locustfile.is_file():
        raise ValueError(f"locustfile {locustfile} not found (give --locustfile)")
    if not ids.is_file():
        raise ValueError(f"ids file {ids} not found (the stack directory's ids.json)")
    steps = check_mix(step_rps, k_mix, unknown_user_rate, missing_item_rate)
    if step_seconds <= 0 or user_rps <= 0:
        raise ValueError("--step-seconds and --user-rps must be > 0")
    _check_host(host)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "--host", host,
           "--csv", str(out / "locust"), "--csv-full-history", "--only-summary",
           "--exit-code-on-error", "0", "--loglevel", "WARNING",
           "--ids-file", str(ids), "--step-rps", step_rps, "--step-seconds", str(step_seconds),
           "--user-rps", str(user_rps), "--k-mix", k_mix,
           "--unknown-user-rate", str(unknown_user_rate),
           "--missing-item-rate", str(missing_item_rate), "--deadline-ms", str(deadline_ms),
           "--seed", str(seed), "--request-log", str(out / "requests.csv")]  # fmt: skip
    if client_cpus:
        if shutil.which("taskset") is None:
            raise ValueError("--client-cpus needs taskset, which is not on the PATH")
        cmd = ["taskset", "-c", client_cpus, *cmd]
    budget = len(steps) * step_seconds + 120  # the shape ends it; this bounds a hang
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(out / "locust.log", "wb") as logf:
        try:
            res = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, timeout=budget)
        except subprocess.TimeoutExpired as exc:
            raise LoadTestError(f"locust ran past {budget:.0f}s; see {out / 'locust.log'}") from exc
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if res.returncode != 0:
        tail = "\n".join((out / "locust.log").read_text(errors="replace").splitlines()[-20:])
        raise LoadTestError(f"locust exited {res.returncode}:\n{tail}")
    return {"wall_s": wall, "locust_cpu_s": cpu, "locust_cpu_share": cpu / max(wall, 1e-9)}


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


def main_loadtest(args: Any) -> int:
    """The ``mmrank loadtest`` command; returns the exit code."""
    import logging

    log = logging.getLogger("mmrank.loadtest")
    slo = Slo(args.slo_p99_ms, args.slo_error_rate, args.slo_at_rps)
    out = Path(args.out)
    meta: dict[str, Any] = {"host": args.host, "machine": machine(),
                            "mix": f"K {args.k_mix}, zipf s 1.0, unknown users "
                                   f"{args.unknown_user_rate:.0%}, missing items "
                                   f"{args.missing_item_rate:.0%}, Poisson arrivals, steps "
                                   f"{args.steps} req/s x {args.step_seconds:g} s"}  # fmt: skip
    try:
        if args.report_only:
            old = out / "summary.json"
            if old.is_file():
                meta = json.loads(old.read_text()).get("meta", meta)
        else:
            meta |= run_locust(
                args.host, Path(args.ids), out, step_rps=args.steps,
                step_seconds=args.step_seconds, user_rps=args.user_rps, k_mix=args.k_mix,
                unknown_user_rate=args.unknown_user_rate,
                missing_item_rate=args.missing_item_rate, deadline_ms=args.deadline_ms,
                seed=args.seed, client_cpus=args.client_cpus,
                locustfile=Path(args.locustfile) if args.locustfile else LOCUSTFILE,
            )  # fmt: skip
        met, steps = write_report(out, slo, meta)
    except LoadTestError as exc:
        log.error("%s", exc)
        return 2
    sys.stdout.write((out / "report.md").read_text())
    sys.stdout.write(f"\nreport: {out / 'report.md'}, plot: {out / 'latency.png'}\n")
    if not met:
        missed = [f"{s.offered_rps:g} req/s ({'; '.join(s.why)})" for s in steps if not s.met]
        log.error("SLO missed at %s", ", ".join(missed))
        return 1
    return 0
