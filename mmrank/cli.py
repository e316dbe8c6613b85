"""The ``mmrank`` console script. Each subcommand imports only what it needs, so a
serving install (no torch) can run the serving commands."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from training.loop import TrainSettings

log = logging.getLogger("mmrank")


def _world(args: argparse.Namespace) -> int:
    from data.world import WorldConfig, write_world

    cfg = WorldConfig(seed=args.seed)
    if args.users:
        cfg.n_users = args.users
    if args.items:
        cfg.n_items = args.items
    counts = write_world(cfg, Path(args.out))
    log.info("world written to %s: %s", args.out, counts)
    return 0


def _settings(args: argparse.Namespace) -> TrainSettings:
    from training.loop import TrainSettings

    s = TrainSettings(seed=args.seed, progress=not args.quiet, threads=args.threads)
    for name in ("epochs", "max_minutes", "cands_per_batch", "max_hist", "lora_epochs",
                 "align_steps", "ema_decay"):  # fmt: skip
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    return s


def _train(args: argparse.Namespace) -> int:
    from training.train import train_run

    overrides = {"attention": args.attention} if args.model == "camenn" else {}
    m = train_run(args.model, args.data, Path(args.out), _settings(args), overrides)
    summary = {k: v for k, v in m.items() if k != "history"}
    log.info("run written to %s: %s", args.out, json.dumps(summary))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate_run

    m = evaluate_run(Path(args.run), baselines=args.baselines, progress=not args.quiet)
    log.info("%s", (Path(args.run) / "report.md").read_text())
    log.debug("%s", m)
    return 0


def _demo(args: argparse.Namespace) -> int:
    """From nothing to a serving stack: world -> CameNN (candidate-isolated) ->
    evaluation -> export -> embed -> load (embedded store, or Redis with --redis) ->
    serve, with an example request printed before the service starts."""
    from data.world import WorldConfig, write_world
    from feature_store.catalogs import resolve
    from feature_store.embed import build_version, embed_catalog
    from model_export.export import export_run
    from model_export.repository import open_repository
    from training.evaluate import evaluate_run
    from training.loop import TrainSettings
    from training.train import train_run

    out = Path(args.out)
    steps = 7 if args.serve else 6
    log.info("[1/%d] synthetic world -> %s", steps, out / "world")
    write_world(WorldConfig(seed=args.seed), out / "world")
    log.info("[2/%d] training CameNN (candidate-isolated)", steps)
    # the demo model's budget is 5 minutes on 2 cores: no epoch starts that would end past
    # --max-minutes (4.5; measured session 5: ~105 s per epoch here, 2 epochs)
    settings = TrainSettings(seed=args.seed, progress=not args.quiet, threads=args.threads,
                             max_minutes=args.max_minutes)  # fmt: skip
    train_run(
        "camenn", str(out / "world"), out / "run", settings, {"attention": "candidate-isolated"}
    )
    log.info("[3/%d] evaluating against the oracle%s", steps,
             " and LR/DIN/BST" if args.baselines else "")  # fmt: skip
    m = evaluate_run(out / "run", baselines=args.baselines, progress=not args.quiet)
    log.info("\n%s", (out / "run" / "report.md").read_text())
    log.info("test AUC %.4f vs oracle %.4f", m["test_auc"], m["oracle_auc"])
    log.info("[4/%d] exporting to ONNX -> %s", steps, out / "repo")
    export_run(out / "run", out / "repo", force=True)
    repo = open_repository(out / "repo")
    log.info("[5/%d] embedding the catalog with the exported item tower", steps)
    _, cat, users = resolve(f"world:{out / 'world'}")
    e = embed_catalog(repo, cat, threads=args.threads)
    data = build_version(e, users)
    if args.redis:
        from feature_store.loader import connect_sync, load_version

        log.info("[6/%d] loading version %s into %s", steps, data.manifest.version, args.redis)
        client = connect_sync(args.redis, False)
        try:
            load_version(client, data, "mmrank", grace_s=300.0)
        finally:
            client.close()
    else:
        from feature_store.embedded import write_embedded

        log.info("[6/%d] writing version %s to the embedded store %s", steps,
                 data.manifest.version, out / "store.npz")  # fmt: skip
        write_embedded(out / "store.npz", data)
    example = {"user_id": data.user_ids[0], "candidates": data.item_ids[:5], "top_k": 3}
    curl = (f"curl -s -X POST http://{args.host}:{args.port}/v1/rank -H 'content-type: "
            f"application/json' -d '{json.dumps(example)}'")  # fmt: skip
    (out / "example_request.sh").write_text(curl + "\n")
    if not args.serve:
        sys.stdout.write(f"stack ready in {out}; serve it with:\n  {_serve_cmd(args, out)}\n"
                         f"then try:\n  {curl}\n")  # fmt: skip
        return 0
    log.info("[7/%d] serving on http://%s:%d (Ctrl-C stops)", steps, args.host, args.port)
    sys.stdout.write(f"\ntry, once it reports ready:\n  {curl}\n\n")
    sys.stdout.flush()
    args.repo, args.embedded, args.cluster = str(out / "repo"), None, False
    if not args.redis:
        args.embedded = str(out / "store.npz")
    return _serve(args)


def _serve_cmd(args: argparse.Namespace, out: Path) -> str:
    store = f"--redis {args.redis}" if args.redis else f"--embedded {out / 'store.npz'}"
    return f"mmrank serve --repo {out / 'repo'} {store} --port {args.port}"


def _serve(args: argparse.Namespace) -> int:
    from service.app import create_app, serve
    from service.settings import Settings

    overrides: dict[str, Any] = {"repo": args.repo}
    if args.embedded:
        overrides["store"] = {"kind": "embedded", "path": args.embedded}
    elif args.redis:
        overrides["store"] = {"kind": "cluster" if args.cluster else "redis", "url": args.redis}
    settings = Settings(**overrides)
    serve(create_app(settings), settings, args.host, args.port, args.log_level)
    return 0


def _bench_service(args: argparse.Namespace) -> int:
    from service.bench import render, render_merge, run_bench, run_merge

    res: Any = run_merge(args) if args.merge else run_bench(args)
    sys.stdout.write(render_merge(res) if args.merge else render(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from benchmarks.side_by_side import render_markdown, run, write_outputs

    doc = run(args)
    paths = write_outputs(doc, Path(args.out))
    sys.stdout.write(render_markdown(doc))
    log.info("bench: %s", ", ".join(str(p) for p in paths.values()))
    return 0


def _ceilings(args: argparse.Namespace) -> int:
    from training.ceilings import ceilings

    m = ceilings(Path(args.data), args.seed)
    if args.out:
        Path(args.out).write_text(json.dumps(m, indent=2))
    log.info("%s", json.dumps(m, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    from model_export.export import export_run

    m = export_run(
        Path(args.run),
        Path(args.out),
        fp16=args.fp16,
        opset=args.opset,
        version=args.version,
        force=args.force,
    )
    diffs = {k: f"{g.parity_max_abs_diff:.2g} (tol {g.tolerance:g})" for k, g in m.graphs.items()}
    log.info(
        "repository %s: %s version %s; ONNX Runtime vs PyTorch max abs diff %s",
        args.out,
        m.name,
        m.version,
        diffs,
    )
    return 0


def _bench_model(args: argparse.Namespace) -> int:
    from model_export import bench
    from model_export.repository import open_repository

    repos = [open_repository(r) for r in args.repos]
    timing = {"threads": args.threads, "min_runs": args.min_runs, "min_seconds": args.min_seconds}
    latency = [
        row
        for repo in repos
        for row in bench.bench_repository(
            repo, args.k, args.n, optimization=args.optimization, **timing
        )
    ]
    levels = []
    if args.levels:
        levels = [
            row for r in repos for row in bench.bench_levels(r, args.levels_k, args.n, **timing)
        ]
    sys.stdout.write(bench.render_markdown(latency, levels))
    if args.json:
        Path(args.json).write_text(json.dumps(bench.to_json(latency, levels), indent=2))
    return 0


def _bar(total: int, desc: str, quiet: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=quiet, leave=False)


def _embed(args: argparse.Namespace) -> int:
    import time

    from feature_store.catalogs import resolve
    from feature_store.embed import embed_catalog, save_embeddings
    from model_export.repository import open_repository

    repo = open_repository(args.repo)
    name, cat, _ = resolve(args.data)
    t0 = time.perf_counter()
    with _bar(len(cat.item_ids), "embed", args.quiet) as bar:
        e = embed_catalog(repo, cat, batch=args.batch, threads=args.threads, progress=bar.update)
    secs = time.perf_counter() - t0
    e.meta["data"] = name
    save_embeddings(Path(args.out), e)
    n = len(e.item_ids)
    sys.stdout.write(
        f"embedded {n} items of {name} with {repo.manifest.name} {repo.manifest.version} "
        f"in {secs:.2f}s ({n / max(secs, 1e-9):,.0f} items/s) -> {args.out}\n"
    )
    return 0


def _load(args: argparse.Namespace) -> int:
    from feature_store.catalogs import resolve
    from feature_store.embed import build_version, load_embeddings
    from feature_store.embedded import write_embedded
    from feature_store.loader import connect_sync, load_version
    from model_export.manifest import ITEM_TOWER
    from model_export.repository import read_manifest

    e = load_embeddings(Path(args.embeddings))
    m = read_manifest(Path(args.repo))
    tower_sha = m.files.get(m.graphs[ITEM_TOWER].file)
    if (e.meta["model_version"], e.meta["item_tower_sha256"]) != (m.version, tower_sha):
        raise ValueError(
            f"{args.embeddings} was built by {e.meta['model_name']} {e.meta['model_version']}, "
            f"not by the item tower of {args.repo} ({m.name} {m.version}); run `mmrank embed`"
        )
    users = resolve(args.data)[2] if args.data else None
    data = build_version(e, users, args.version, args.key_buckets,
                         {"embeddings": str(args.embeddings), "data": args.data})  # fmt: skip
    if args.embedded:
        write_embedded(Path(args.embedded), data)
        sys.stdout.write(f"wrote version {data.manifest.version} to {args.embedded}\n")
        return 0
    if not args.redis:
        raise ValueError("give --redis URL (with --cluster for Redis Cluster) or --embedded FILE")
    client = connect_sync(args.redis, args.cluster)
    try:
        with _bar(len(data.item_ids), "load", args.quiet) as bar:
            rep = load_version(client, data, args.namespace, grace_s=args.grace,
                               progress=bar.update)  # fmt: skip
    finally:
        client.close()
    sys.stdout.write(
        f"loaded version {rep.version} ({rep.items} items, {rep.users} users) in "
        f"{rep.write_seconds:.2f}s ({rep.items_per_s:,.0f} items/s), verified in "
        f"{rep.verify_seconds:.2f}s; pointer flipped from {rep.previous}; "
        f"deleted {rep.deleted or 'none'}\n"
    )
    return 0


def _audit(args: argparse.Namespace) -> int:
    from feature_store.audit import audit_rows, judged_count, to_csv
    from feature_store.embed import load_embeddings

    e = load_embeddings(Path(args.embeddings))
    desc = None
    if e.meta.get("data") == "hm":
        from data.hm import article_texts

        desc = article_texts()
    rows = audit_rows(e, args.threshold, desc)
    text = to_csv(rows)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    sys.stderr.write(
        f"audit: {len(rows)} of {judged_count(e)} items with text and image flagged "
        f"(ITA or TIA < {args.threshold})\n"
    )
    return 0


def _bench_store(args: argparse.Namespace) -> int:
    import contextlib

    from feature_store.bench import bench_store
    from feature_store.local_redis import LocalCluster, LocalRedis

    targets: list[tuple[str, str, bool]] = []
    with contextlib.ExitStack() as stack:
        single = args.redis or stack.enter_context(LocalRedis(["--maxmemory", "0"])).url
        targets.append(("single node", single, False))
        if not args.no_cluster:
            cluster = args.cluster_url or stack.enter_context(LocalCluster()).url
            targets.append(("3-master cluster", cluster, True))
        lines = [
            f"feature store: {args.items:,} items (160-byte records), reads of "
            f"{args.hist} history + {args.cand} candidate items, {args.reads} reads each\n",
            "| target | load items/s | read | p50 ms | p99 ms | mean ms | Redis MGET ms/read |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, url, is_cluster in targets:
            with _bar(args.items, f"load {label}", args.quiet) as bar:
                rep, timings = bench_store(url, is_cluster, n_items=args.items, hist=args.hist,
                                           cand=args.cand, reads=args.reads,
                                           progress=bar.update)  # fmt: skip
            for t in timings:
                server = "" if t.server_ms is None else f"{t.server_ms:.3f}"
                lines.append(f"| {label} | {rep.items_per_s:,.0f} | {t.name} | {t.p50_ms:.3f} | "
                             f"{t.p99_ms:.3f} | {t.mean_ms:.3f} | {server} |")  # fmt: skip
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _align(args: argparse.Namespace) -> int:
    from data.hm import USER_FIELDS, load_hm_catalog
    from training.align import AlignSettings, train_align

    if args.data != "hm":
        raise ValueError("mmrank align trains on --data hm (the catalog without interactions)")
    s = AlignSettings(seed=args.seed, threads=args.threads, progress=not args.quiet)
    if args.epochs:
        s.epochs = args.epochs
    m = train_align(load_hm_catalog(), Path(args.out), s, "hm", USER_FIELDS)
    t = m["test"]
    sys.stdout.write(
        f"held-out ({m['items']['test']} items, {int(t['negative_pairs'])} negative pairs per "
        f"head): ITA {t['ita_accuracy']:.3f} (pos {t['ita_pos_accuracy']:.3f}, neg "
        f"{t['ita_neg_accuracy']:.3f}), TIA {t['tia_accuracy']:.3f} (pos "
        f"{t['tia_pos_accuracy']:.3f}, neg {t['tia_neg_accuracy']:.3f}); train ITA "
        f"{m['train']['ita_accuracy']:.3f} TIA {m['train']['tia_accuracy']:.3f}; run -> {args.out}\n"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmrank", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    w = sub.add_parser("world", help="write a synthetic world with known ground truth")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--out", required=True)
    w.add_argument("--users", type=int)
    w.add_argument("--items", type=int)
    w.set_defaults(func=_world)

    def training_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")

    t = sub.add_parser("train", help="train item tower + ranker end to end")
    t.add_argument("--model", choices=["camenn", "em3", "lr", "din", "bst"], required=True)
    t.add_argument("--data", required=True, help="a world directory or 'movielens'")
    t.add_argument("--out", required=True)
    t.add_argument(
        "--attention", choices=["full", "candidate-isolated"], default="candidate-isolated"
    )
    t.add_argument("--epochs", type=int)
    t.add_argument(
        "--max-minutes", type=float, help="time cap: stop before an epoch that would end past it"
    )
    t.add_argument("--cands-per-batch", type=int)
    t.add_argument("--max-hist", type=int)
    t.add_argument("--lora-epochs", type=int, help="EM3: epochs of the LoRA stage (of --epochs)")
    t.add_argument("--align-steps", type=int, help="CameNN: ITA/TIA-only steps after CVR training")
    t.add_argument("--ema-decay", type=float, help="weight averaging decay per step (0 = off)")
    training_flags(t)
    t.set_defaults(func=_train)

    e = sub.add_parser("evaluate", help="test metrics, optional baselines, report.md")
    e.add_argument("run")
    e.add_argument("--baselines", action="store_true", help="also train LR, DIN and BST")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_evaluate)

    ce = sub.add_parser("ceilings", help="what a world lets a model reach (from its hidden truth)")
    ce.add_argument("--data", required=True, help="a world directory")
    ce.add_argument("--seed", type=int, default=0)
    ce.add_argument("--out", help="also write the numbers to this JSON file")
    ce.set_defaults(func=_ceilings)

    x = sub.add_parser("export", help="ONNX ranker + item tower, manifest, Triton configs")
    x.add_argument("run")
    x.add_argument("--out", required=True, help="model repository directory to write")
    x.add_argument("--fp16", action="store_true", help="also write float16 graphs (GPU)")
    x.add_argument("--opset", type=int, default=18)
    x.add_argument("--version", help="model version string (default: weights sha256[:12])")
    x.add_argument("--force", action="store_true", help="replace an existing --out")
    x.set_defaults(func=_export)

    bm = sub.add_parser("bench-model", help="model-only ONNX Runtime CPU latency per request")
    bm.add_argument("repos", nargs="+", metavar="REPO")
    bm.add_argument("--k", type=int, nargs="+", default=[100, 500, 1000], help="candidates")
    bm.add_argument("--n", type=int, default=50, help="history length")
    bm.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    bm.add_argument(
        "--optimization",
        choices=["disable", "basic", "extended", "all"],
        default="extended",
        help="graph optimisation level",
    )
    bm.add_argument("--levels", action="store_true", help="also compare optimisation levels")
    bm.add_argument("--levels-k", type=int, default=500, help="K for the level comparison")
    bm.add_argument("--min-runs", type=int, default=5, help="timed runs per measurement, at least")
    bm.add_argument("--min-seconds", type=float, default=0.5, help="time per measurement, at least")
    bm.add_argument("--json", help="also write the results as JSON here")
    bm.set_defaults(func=_bench_model)

    al = sub.add_parser("align", help="train a CameNN item tower on ITA + TIA alone (H&M)")
    al.add_argument("--data", default="hm", help="hm (the only catalog without interactions)")
    al.add_argument("--out", required=True)
    al.add_argument("--epochs", type=int)
    training_flags(al)
    al.set_defaults(func=_align)

    em = sub.add_parser("embed", help="run the exported item tower over a catalog")
    em.add_argument("--repo", required=True, help="model repository (mmrank export)")
    em.add_argument("--data", required=True, help="hm, movielens, world:PATH or a world PATH")
    em.add_argument("--out", required=True, help="embeddings directory to write")
    em.add_argument("--batch", type=int, default=256, help="items per ONNX Runtime call")
    em.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    em.add_argument("--quiet", action="store_true")
    em.set_defaults(func=_embed)

    ld = sub.add_parser("load", help="write a new embedding version, verify, flip the pointer")
    ld.add_argument("--repo", required=True, help="the model repository the embeddings came from")
    ld.add_argument("--embeddings", required=True, help="embeddings directory (mmrank embed)")
    ld.add_argument("--data", help="also load this dataset's users (world:PATH, PATH, movielens)")
    ld.add_argument("--redis", help="redis://host:port/db (any node with --cluster)")
    ld.add_argument("--cluster", action="store_true", help="the URL is a Redis Cluster node")
    ld.add_argument("--embedded", help="write the embedded store file instead of Redis")
    ld.add_argument("--namespace", default="mmrank", help="key prefix")
    ld.add_argument("--version", help="version name (default: model version + UTC time)")
    ld.add_argument("--grace", type=float, default=300.0,
                    help="seconds a superseded version stays before deletion")  # fmt: skip
    ld.add_argument("--key-buckets", type=int, default=64, help="cluster hash-tag buckets")
    ld.add_argument("--quiet", action="store_true")
    ld.set_defaults(func=_load)

    au = sub.add_parser("audit", help="CSV of items whose ITA/TIA say text and image disagree")
    au.add_argument("--embeddings", required=True, help="embeddings directory (mmrank embed)")
    au.add_argument("--threshold", type=float, default=0.5, help="flag ITA or TIA below this")
    au.add_argument("--out", help="CSV file (default: stdout)")
    au.set_defaults(func=_audit)

    bs = sub.add_parser("bench-store", help="feature store load rate and read latency")
    bs.add_argument("--redis", help="single node URL (default: start a local redis-server)")
    bs.add_argument("--cluster-url", help="cluster node URL (default: start a local 3-master one)")
    bs.add_argument("--no-cluster", action="store_true", help="single node only")
    bs.add_argument("--items", type=int, default=50_000)
    bs.add_argument("--hist", type=int, default=50)
    bs.add_argument("--cand", type=int, default=500)
    bs.add_argument("--reads", type=int, default=500)
    bs.add_argument("--quiet", action="store_true")
    bs.set_defaults(func=_bench_store)

    def serve_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--redis", help="redis://host:port/db (default: MMRANK_STORE__* settings)")
        sp.add_argument("--host", default="127.0.0.1")
        sp.add_argument("--port", type=int, default=8000)
        sp.add_argument("--log-level", default="info", help="uvicorn log level")

    sv = sub.add_parser("serve", help="the ranking service (settings also from MMRANK_* env)")
    sv.add_argument("--repo", required=True, help="model repository (mmrank export)")
    sv.add_argument("--embedded", help="serve from this embedded store file instead of Redis")
    sv.add_argument("--cluster", action="store_true", help="--redis names a Redis Cluster node")
    serve_flags(sv)
    sv.set_defaults(func=_serve)

    bsv = sub.add_parser(
        "bench-service", help="end to end vs model only, interleaved rounds in one run (CPU)"
    )
    bsv.add_argument("--repo", help="model repository (default: build a demo-sized CameNN)")
    bsv.add_argument("--store", help="embedded store file of --repo's embeddings")
    bsv.add_argument("--work", help="directory for the built stack (default: a temp dir)")
    bsv.add_argument("--items", type=int, default=1500)
    bsv.add_argument("--users", type=int, default=1500)
    bsv.add_argument("--k", type=int, default=500, help="candidates per request")
    bsv.add_argument("--n", type=int, default=50, help="history items per request, at most")
    bsv.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    bsv.add_argument("--max-batch-rows", type=int,
                     help="the service's batching.max_batch_rows; model only splits the same "
                     "way (default: the setting's default)")  # fmt: skip
    bsv.add_argument("--concurrency", type=int, default=8, help="connections at saturation")
    bsv.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    bsv.add_argument("--rounds", type=int, default=3,
                     help="interleaved rounds of all four measurements; medians reported")  # fmt: skip
    bsv.add_argument("--server-cpus", help="taskset CPU list for the server, e.g. 1")
    bsv.add_argument(
        "--client-cpus",
        help="CPU list for the load generator (the model-only run uses --server-cpus)",
    )
    bsv.add_argument("--json", help="also write the results as JSON here")
    bsv.add_argument("--merge", type=int, nargs="+", metavar="M",
                     help="only measure the model alone: one call of M requests against M "
                     "calls of one, at --k (what batching.max_user_rows trades)")  # fmt: skip
    bsv.set_defaults(func=_bench_service)

    bb = sub.add_parser("bench", help="model only vs mmrank (ORT, Triton) vs a naive service")
    for flag, kw in (("--out", {"default": "runs/bench", "help": "bench.json/.md/.png here"}),
                     ("--k", {"default": "100,500,1000", "help": "candidates per request"}),
                     ("--n", {"type": int, "default": 50, "help": "history items, at most"}),
                     ("--zipf", {"type": float, "default": 1.0, "help": "users/items exponent"}),
                     ("--requests", {"type": int, "default": 200, "help": "distinct per K"}),
                     ("--seconds", {"type": float, "default": 10.0, "help": "per measurement"}),
                     ("--fractions", {"default": "0.5,0.8", "help": "of saturation, latency"}),
                     ("--concurrency", {"type": int, "default": 8}),
                     ("--threads", {"type": int, "default": 1, "help": "ORT / torch threads"}),
                     ("--max-batch-rows", {"type": int}), ("--server-cpus", {}),
                     ("--client-cpus", {}), ("--repo", {}), ("--store", {}), ("--work", {}),
                     ("--items", {"type": int, "default": 1500}),
                     ("--users", {"type": int, "default": 1500})):  # fmt: skip
        bb.add_argument(flag, **kw)
    bb.add_argument("--no-triton", action="store_true")
    bb.add_argument("--no-naive", action="store_true")
    bb.set_defaults(func=_bench)

    d = sub.add_parser("demo", help="world -> model -> export -> embed -> load -> serve")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--baselines", action="store_true", help="also train LR, DIN and BST")
    d.add_argument(
        "--max-minutes",
        type=float,
        default=4.5,
        help="training time cap (no epoch starts that would end past it)",
    )
    d.add_argument("--no-serve", dest="serve", action="store_false",
                   help="build the stack, print the serve command and the example, exit")  # fmt: skip
    serve_flags(d)
    training_flags(d)
    d.set_defaults(func=_demo)

    from deploy.commands import register  # stack, loadtest (deploy/)
    from reliability.commands import register as register_reliability  # faults, overload, soak

    register(sub)
    register_reliability(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from feature_store.errors import FeatureStoreError  # no dependencies

    try:
        return int(args.func(args))
    except (FileNotFoundError, ValueError, FeatureStoreError) as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
