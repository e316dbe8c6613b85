"""The ``mmrank stack`` and ``mmrank loadtest`` subcommands (registered by
:func:`register` from ``mmrank.cli``). Parsers only: the work is imported when a
command runs, so building the parser imports nothing heavy."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

log = logging.getLogger("mmrank.stack")


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    env = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k.startswith("MMRANK_"):
            raise ValueError(f"--env {p!r}: want MMRANK_NAME=VALUE")
        env[k] = v
    return env


def _stack(args: argparse.Namespace) -> int:
    from deploy.stack import LocalStack, StackError, StackInputs, build_inputs

    inputs = StackInputs(Path(args.dir))
    env = _env_pairs(args.env)
    if args.rebuild or args.build_only or inputs.missing():
        try:
            import torch  # noqa: F401 (only to fail early with a clear message)
        except ImportError as exc:
            raise ValueError(
                f"{inputs.root} lacks {', '.join(inputs.missing()) or 'nothing'} and building it "
                "needs the train extra (torch): scripts/setup.sh train, or give a complete --dir"
            ) from exc
        log.info("building the stack inputs in %s", inputs.root)
        build_inputs(inputs.root, users=args.users, items=args.items, seed=args.seed,
                     d_model=args.d_model, run=Path(args.run) if args.run else None)  # fmt: skip
    if args.build_only:
        return 0
    stack = LocalStack(inputs, host=args.host, port=args.port, triton=args.triton,
                       server_cpus=args.server_cpus, env=env,
                       workdir=Path(args.logs) if args.logs else None)  # fmt: skip
    try:
        stack.start()
    except StackError as exc:
        log.error("%s", exc)
        return 1
    try:
        sys.stdout.write(
            f"mmrank stack ready: {stack.url} (redis {stack.redis.url}"
            + (f", triton {stack.triton.grpc_url}" if stack.triton else "")
            + f"); logs and stack.json in {stack.dir}\nload it with:\n  mmrank loadtest --host "
            f"{stack.url} --ids {inputs.ids}\n"
            + ("Ctrl-C stops it\n" if args.seconds is None else f"stopping in {args.seconds:g}s\n")
        )
        sys.stdout.flush()
        stop_signals = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        if args.seconds is None:
            signal.sigwait(stop_signals)
        else:
            signal.sigtimedwait(stop_signals, args.seconds)
    finally:
        log.info("stopping the stack")
        stack.stop()
    return 0


def _loadtest(args: argparse.Namespace) -> int:
    from deploy.loadtest import main_loadtest

    return main_loadtest(args)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``stack`` and ``loadtest`` to the ``mmrank`` subcommands."""
    st = sub.add_parser("stack", help="the compose stack as local processes (no Docker)")
    st.add_argument("--dir", default="runs/stack",
                    help="stack inputs: repo/, embeddings/, world/, ids.json (built if missing)")  # fmt: skip
    st.add_argument("--build-only", action="store_true", help="build --dir, do not start")
    st.add_argument("--rebuild", action="store_true", help="rebuild --dir before starting")
    st.add_argument("--run", help="export this trained run (default: random-weight CameNN)")
    st.add_argument("--users", type=int, default=1500, help="world users when building")
    st.add_argument("--items", type=int, default=1500, help="world items when building")
    st.add_argument("--d-model", type=int, default=64, help="CameNN width when building")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--host", default="127.0.0.1")
    st.add_argument("--port", type=int, default=8000)
    st.add_argument("--triton", action="store_true",
                    help="serve the ranker from a local Triton (builds .venv-triton once)")  # fmt: skip
    st.add_argument("--server-cpus", help="taskset CPU list for the service, e.g. 1")
    st.add_argument("--env", action="append", default=[], metavar="MMRANK_X=V",
                    help="extra service settings (repeatable)")  # fmt: skip
    st.add_argument("--logs", help="directory for logs and stack.json (default: a temp dir)")
    st.add_argument("--seconds", type=float, help="stop after this long (default: on Ctrl-C)")
    st.set_defaults(func=_stack)

    lt = sub.add_parser("loadtest", help="Locust headless against a running stack; SLO verdict")
    lt.add_argument("--host", default="http://127.0.0.1:8000", help="the service's base URL")
    lt.add_argument("--ids", default="runs/stack/ids.json", help="the stack's ids.json")
    lt.add_argument("--out", default="runs/loadtest", help="CSV, report.md, latency.png here")
    lt.add_argument("--steps", default="2,4,8,16,32", help="offered load per step, req/s")
    lt.add_argument("--step-seconds", type=float, default=30.0)
    lt.add_argument("--user-rps", type=float, default=0.5, help="req/s per simulated user")
    lt.add_argument("--k-mix", default="100:0.5,500:0.3,1000:0.2", help="K:weight,...")
    lt.add_argument("--unknown-user-rate", type=float, default=0.02)
    lt.add_argument("--missing-item-rate", type=float, default=0.05)
    lt.add_argument("--deadline-ms", type=float, default=1000.0, help="sent per request")
    lt.add_argument("--seed", type=int, default=0)
    lt.add_argument("--slo-p99-ms", type=float, default=500.0)
    lt.add_argument("--slo-error-rate", type=float, default=0.01)
    lt.add_argument("--slo-at-rps", type=float,
                    help="judge only steps offering at most this (default: every step)")  # fmt: skip
    lt.add_argument("--client-cpus", help="taskset CPU list for Locust, e.g. 0")
    lt.add_argument("--locustfile", help="default: loadtests/locustfile.py of this checkout")
    lt.add_argument("--report-only", action="store_true",
                    help="re-judge --out's requests.csv; run no load")  # fmt: skip
    lt.set_defaults(func=_loadtest)
