"""``mmrank bench``: DESIGN section 10 in one run on one machine.

The same requests (Zipf-distributed users and candidates, K in ``--k``, histories of at
most ``--n`` items) against, in this order:

- ``ceiling``: the model alone (ONNX Runtime, the same threads, the service's call
  sizes; no HTTP, no Redis): :func:`service.bench.model_only`, measured again after the
  servers (``after``); ratios to it use the mean of the two, and
  ``mmrank/ceiling_low`` / ``_high`` the faster and the slower of them, so the drift of
  a shared machine over the run shows beside the ratio;
- ``mmrank``: ``mmrank serve`` on ONNX Runtime in process, features from Redis;
- ``mmrank_triton``: ``mmrank serve`` with the Triton backend (a real ``tritonserver``
  from :mod:`service.triton_local`, one CPU instance with the same threads);
- ``naive``: :mod:`benchmarks.naive_service` (FastAPI + PyTorch eager + one Redis GET
  per key, no batching).

Every server (and Triton) runs pinned to ``--server-cpus``, the load generator and
Redis (another machine in a deployment) to ``--client-cpus``, the model alone to
``--server-cpus``. For each system
and K: throughput at saturation (closed loop, ``--concurrency`` connections) and
p50/p95/p99 under Poisson arrivals at ``--fractions`` of that system's saturation.
Before measuring, one request's scores from each server are compared with mmrank's
(``parity_max_abs_diff``): the systems compute the same thing.

Writes ``bench.json``, ``bench.md`` and ``bench.png`` to ``--out``. Speed is whatever
this machine gives; other jobs on it move the numbers (the load average before and
after is recorded), ratios within one run move less. On a loaded machine the
throughput ratio favours the servers (their several threads get a larger share of a
contended CPU than the model alone's one), so the CPU time per request of the model
alone and of the mmrank process (``mmrank/ceiling_cpu``) is reported beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from feature_store.embedded import read_embedded
from feature_store.loader import connect_sync, load_version
from feature_store.local_redis import LocalRedis, free_port
from service.bench import (
    Request,
    build_stack,
    closed_loop,
    make_requests,
    mmrank_env,
    model_only,
    open_loop,
    pinned,
    serving,
)
from service.settings import BatchingSettings

SYSTEMS = ("ceiling", "mmrank", "mmrank_triton", "naive")
LABELS = {
    "ceiling": "model only (ORT)",
    "mmrank": "mmrank (ORT in process)",
    "mmrank_triton": "mmrank (Triton backend)",
    "naive": "naive (FastAPI + torch eager + GET per key)",
}
COLORS = {"ceiling": "tab:blue", "mmrank": "tab:orange", "mmrank_triton": "tab:green",
          "naive": "tab:red"}  # fmt: skip
NAMESPACE = "mmrank"
NOT_GPU = ("CPUExecutionProvider", "AzureExecutionProvider")  # AzureEP: remote calls, no device


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())  # fmt: skip
    import onnxruntime as ort

    gpu = [p for p in ort.get_available_providers() if p not in NOT_GPU]
    versions = {}
    for pkg in ("onnxruntime", "torch", "fastapi", "uvicorn", "redis"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "system": platform.platform(), "gpu_providers": gpu, "versions": versions}  # fmt: skip


def _scores(port: int, req: Request) -> dict[str, float]:
    http = urllib.request.Request(f"http://127.0.0.1:{port}/v1/rank", data=req.body,
                                  headers={"content-type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(http, timeout=60) as resp:
        body = json.loads(resp.read())
    return {i["item_id"]: i["score"] for i in body["items"] if i["score"] is not None}


def _measure(port: int, pid: int | None, reqs: list[Request], args: Any,
             fractions: list[float]) -> dict[str, Any]:  # fmt: skip
    sat = asyncio.run(closed_loop("127.0.0.1", port, reqs, args.concurrency, args.seconds, pid))
    loads = [asyncio.run(open_loop("127.0.0.1", port, reqs, f * sat["throughput_rps"],
                                   args.seconds)) | {"fraction": f}
             for f in fractions]  # fmt: skip
    return {"saturation": sat, "loads": loads}


@contextlib.contextmanager
def _triton(repo: Path, work: Path, threads: int, cpus: str | None) -> Iterator[str]:
    """A local tritonserver (pinned to ``cpus``) serving ``repo``; yields its gRPC URL."""
    from service.triton_local import LocalTriton, ensure_triton
    from service.triton_repo import build_triton_repository

    install = ensure_triton()
    models = build_triton_repository(repo, Path(tempfile.mkdtemp(prefix="triton-", dir=work)),
                                     instances=1, threads=threads, max_queue_size=None)  # fmt: skip
    with pinned(cpus):  # the server and its Python-backend stubs inherit the CPU set
        server = LocalTriton(models, install=install)
    try:
        yield server.grpc_url
    finally:
        server.stop()


def run(args: Any) -> dict[str, Any]:
    """Measure everything (see the module docstring); returns the JSON document."""
    load_before = os.getloadavg()
    work = Path(args.work or tempfile.mkdtemp(prefix="mmrank-bench-"))
    work.mkdir(parents=True, exist_ok=True)  # Triton's model repository goes here
    if args.repo:
        repo, store = Path(args.repo), Path(args.store)
    else:
        repo, store = build_stack(work, args.items, args.users)
    ks = [int(k) for k in str(args.k).split(",")]
    fractions = [float(f) for f in str(args.fractions).split(",")]
    rows = args.max_batch_rows or BatchingSettings().max_batch_rows
    reqs = {k: make_requests(repo, store, k, args.n, args.requests, seed=k, zipf=args.zipf)
            for k in ks}  # fmt: skip
    res: dict[str, dict[str, Any]] = {s: {} for s in SYSTEMS}
    skipped: dict[str, str] = {}
    scores: dict[str, dict[str, float]] = {}
    with pinned(args.server_cpus):
        for k in ks:
            res["ceiling"][str(k)] = {"saturation": model_only(repo, reqs[k], args.threads,
                                                               args.seconds, rows)}  # fmt: skip
    with contextlib.ExitStack() as stack:
        with pinned(args.client_cpus):  # Redis: beside the load generator (elsewhere in a
            rd = stack.enter_context(LocalRedis(["--maxmemory", "0"]))  # deployment)
        client = connect_sync(rd.url)
        try:
            load_version(client, read_embedded(store), NAMESPACE, grace_s=0.0)
        finally:
            client.close()
        stack.enter_context(pinned(args.client_cpus))
        py = sys.executable
        serve = [py, "-m", "mmrank.cli", "serve", "--repo", str(repo), "--redis", rd.url,
                 "--log-level", "warning"]  # fmt: skip
        for name in SYSTEMS[1:]:
            if name == "mmrank_triton" and args.no_triton:
                skipped[name] = "--no-triton"
                continue
            if name == "naive" and args.no_naive:
                skipped[name] = "--no-naive"
                continue
            port = free_port()
            with contextlib.ExitStack() as sys_stack:
                env = mmrank_env(args.threads, rows, MMRANK_STORE__NAMESPACE=NAMESPACE)
                if name == "naive":
                    cmd = [py, "-m", "benchmarks.naive_service", "--repo", str(repo), "--redis",
                           rd.url, "--namespace", NAMESPACE, "--threads", str(args.threads),
                           "--port", str(port)]  # fmt: skip
                    ready = "/ready"
                else:
                    cmd, ready = [*serve, "--port", str(port)], "/v2/health/ready"
                    if name == "mmrank_triton":
                        try:
                            url = sys_stack.enter_context(
                                _triton(repo, work, args.threads, args.server_cpus)
                            )
                        except Exception as exc:  # no Triton here: say so, measure the rest
                            skipped[name] = f"Triton could not start: {exc}"
                            continue
                        env |= {"MMRANK_BACKEND__KIND": "triton",
                                "MMRANK_BACKEND__TRITON_URL": url}  # fmt: skip
                try:
                    server = sys_stack.enter_context(
                        serving(cmd, port, args.server_cpus, env, ready_path=ready)
                    )
                except RuntimeError as exc:  # it did not start: say so, measure the rest
                    skipped[name] = str(exc)
                    continue
                scores[name] = _scores(port, reqs[ks[0]][0])
                pid = server.pid if name != "mmrank_triton" else None  # Triton's CPU is elsewhere
                for k in ks:
                    res[name][str(k)] = _measure(port, pid, reqs[k], args, fractions)
    with pinned(args.server_cpus):  # again, the servers gone: how far the machine drifted
        for k in ks:
            res["ceiling"][str(k)]["after"] = model_only(repo, reqs[k], args.threads,
                                                         args.seconds, rows)  # fmt: skip
    ref = scores.get("mmrank", {})
    parity = {n: max((abs(s[i] - ref[i]) for i in ref), default=0.0)
              for n, s in scores.items() if set(s) == set(ref)}  # fmt: skip
    for n, s in scores.items():
        if set(s) != set(ref):
            parity[n] = float("inf")  # scored other items: not the same computation
    ratios: dict[str, dict[str, float]] = {}
    for key in map(str, ks):
        tp = {s: res[s][key]["saturation"]["throughput_rps"] for s in SYSTEMS if key in res[s]}
        ceil = [res["ceiling"][key][w] for w in ("saturation", "after")]  # before, after
        tp["ceiling"] = statistics.fmean(c["throughput_rps"] for c in ceil)
        r: dict[str, float] = {}
        if "mmrank" in tp:
            r["mmrank/ceiling"] = tp["mmrank"] / tp["ceiling"]
            r["mmrank/ceiling_low"] = tp["mmrank"] / max(c["throughput_rps"] for c in ceil)
            r["mmrank/ceiling_high"] = tp["mmrank"] / min(c["throughput_rps"] for c in ceil)
            cpu = res["mmrank"][key]["saturation"].get("cpu_ms_per_request")
            if cpu:
                r["mmrank/ceiling_cpu"] = (
                    statistics.fmean(c["cpu_ms_per_request"] for c in ceil) / cpu
                )
            if "naive" in tp:
                r["mmrank/naive"] = tp["mmrank"] / tp["naive"]
        if "mmrank_triton" in tp:
            r["mmrank_triton/ceiling"] = tp["mmrank_triton"] / tp["ceiling"]
        ratios[key] = r
    return {
        "machine": machine()
        | {"load_average_before": load_before, "load_average_after": os.getloadavg()},
        "setup": {
            "model": "CameNN candidate-isolated d=64 (random weights)",
            "k": ks,
            "max_hist": args.n,
            "zipf": args.zipf,
            "requests_per_k": args.requests,
            "ort_threads": args.threads,
            "torch_threads": args.threads,
            "max_batch_rows": rows,
            "concurrency": args.concurrency,
            "seconds": args.seconds,
            "fractions": fractions,
            "server_cpus": args.server_cpus,
            "client_cpus": args.client_cpus,
            "features": "Redis (local redis-server) for every server",
            "repo": str(repo),
        },
        "results": res,
        "ratios": ratios,
        "targets": {"mmrank/ceiling": 0.85, "mmrank/naive": 20.0, "at_k": 500},
        "parity_max_abs_diff": parity,
        "skipped": skipped,
        "created_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _tp(sat: dict[str, Any]) -> str:
    errors = sat.get("errors", 0)
    return f"{sat['throughput_rps']:.1f}" + (f" ({errors} errors)" if errors else "")


def render_markdown(doc: dict[str, Any]) -> str:
    """The tables of ``doc`` (:func:`run`'s result)."""
    m, s, res = doc["machine"], doc["setup"], doc["results"]
    lines = [
        f"`mmrank bench` ({doc['created_at']}): {s['model']}, histories <= {s['max_hist']}, "
        f"Zipf({s['zipf']}) users and items, {s['ort_threads']} ORT/torch thread(s), "
        f"max_batch_rows {s['max_batch_rows']}; servers on CPUs {s['server_cpus'] or 'any'}, "
        f"load generator on {s['client_cpus'] or 'any'}; features from {s['features']}.",
        f"Machine: {m['cpu']}, {m['cores']} cores, GPU providers: "
        f"{', '.join(m['gpu_providers']) or 'none'}; load average before "
        f"{m['load_average_before'][0]:.2f}, after {m['load_average_after'][0]:.2f}.",
        "",
        "Throughput at saturation (req/s answered 200; errors are not counted). The model "
        "alone is measured before and after the servers (before / after); ratios to it use "
        "the mean of the two:",
        "",
        "| K | " + " | ".join(LABELS[x] for x in SYSTEMS) + " | mmrank / ceiling | "
        "mmrank / ceiling, CPU per request | Triton / ceiling | mmrank / naive |",
        "|---" * (len(SYSTEMS) + 5) + "|",
    ]
    for k in map(str, s["k"]):
        cells = [_tp(res[x][k]["saturation"]) if k in res[x] else "–" for x in SYSTEMS]
        cells[0] += f" / {res['ceiling'][k]['after']['throughput_rps']:.1f}"
        r = doc["ratios"][k]
        ratio = [f"{r[x]:.2f}" if x in r else "–"
                 for x in ("mmrank/ceiling", "mmrank/ceiling_cpu", "mmrank_triton/ceiling",
                           "mmrank/naive")]  # fmt: skip
        lines.append(f"| {k} | " + " | ".join(cells + ratio) + " |")
    lines += ["", "Latency under Poisson arrivals at fractions of each system's saturation (ms):",
              "", "| system | K | offered req/s | p50 | p95 | p99 | errors |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for x in SYSTEMS[1:]:
        for k, r in res[x].items():
            for ld in r["loads"]:
                lines.append(f"| {LABELS[x]} | {k} | {ld['rate_rps']:.1f} ({ld['fraction']:.0%}) "
                             f"| {ld['p50_ms']:.1f} | {ld['p95_ms']:.1f} | {ld['p99_ms']:.1f} "
                             f"| {ld['errors']} |")  # fmt: skip
    par = ", ".join(f"{n} {d:.1g}" for n, d in doc["parity_max_abs_diff"].items())
    lines += ["", f"Score parity with mmrank on one request (max abs diff): {par or 'n/a'}."]
    for n, why in doc["skipped"].items():
        lines.append(f"Not measured: {LABELS[n]}: {why}.")
    t = doc["targets"]
    k = str(t["at_k"])
    if k in doc["ratios"]:
        r = doc["ratios"][k]
        lines.append(
            f"Targets at K={k}: mmrank/ceiling {r.get('mmrank/ceiling', float('nan')):.2f} "
            f"({r.get('mmrank/ceiling_low', float('nan')):.2f}-"
            f"{r.get('mmrank/ceiling_high', float('nan')):.2f} against the faster and the "
            f"slower of the two model-alone runs; by CPU per request {r.get('mmrank/ceiling_cpu', float('nan')):.2f}; "
            f"target >= {t['mmrank/ceiling']}), mmrank/naive "
            f"{r.get('mmrank/naive', float('nan')):.1f} (target >= {t['mmrank/naive']:g})."
        )
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> None:
    """Throughput at saturation by K, and latency against offered load (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, ks = doc["results"], [str(k) for k in doc["setup"]["k"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for x in SYSTEMS:
        got = [k for k in ks if k in res[x]]
        if got:
            a.plot([int(k) for k in got], [res[x][k]["saturation"]["throughput_rps"] for k in got],
                   marker="o", color=COLORS[x], label=LABELS[x])  # fmt: skip
    a.set(xlabel="candidates per request (K)", ylabel="requests/s at saturation", yscale="log",
          xscale="log", title="Throughput at saturation")  # fmt: skip
    a.legend(fontsize=8)
    k = "500" if "500" in ks else ks[len(ks) // 2]
    for x in SYSTEMS[1:]:
        if k in res[x]:
            loads = res[x][k]["loads"]
            rate = [ld["rate_rps"] for ld in loads]
            b.plot(rate, [ld["p50_ms"] for ld in loads], marker="o", color=COLORS[x],
                   label=f"{LABELS[x]} p50")  # fmt: skip
            b.plot(rate, [ld["p99_ms"] for ld in loads], marker="^", linestyle="--",
                   color=COLORS[x], label=f"{LABELS[x]} p99")  # fmt: skip
    b.set(xlabel="offered load (requests/s)", ylabel="latency (ms)", yscale="log",
          xscale="log", title=f"Latency at fractions of saturation, K={k}")  # fmt: skip
    b.legend(fontsize=7)
    fig.suptitle(f"mmrank bench on {doc['machine']['cpu']} ({doc['machine']['cores']} cores)",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(doc: dict[str, Any], out: Path) -> dict[str, Path]:
    """``bench.json``, ``bench.md`` and ``bench.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "md": out / "bench.md", "png": out / "bench.png"}
    paths["json"].write_text(json.dumps(doc, indent=2) + "\n")
    paths["md"].write_text(render_markdown(doc))
    plot(doc, paths["png"])
    return paths
