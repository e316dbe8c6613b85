"""``mmrank stack``: the docker-compose stack as local processes, for machines without
Docker.

The same parts in the same order with the same settings as ``docker-compose.yml``:

1. ``redis-server`` (:class:`feature_store.local_redis.LocalRedis`) with the compose
   file's memory policy, :data:`REDIS_POLICY` (``noeviction``: the loader fails closed
   when Redis is full instead of Redis silently evicting live item records);
2. the one-shot loader: ``mmrank load`` in a subprocess, the compose loader's command;
   the stack goes on only when it exits 0;
3. optionally Triton (:class:`service.triton_local.LocalTriton`, the Python-backend
   repository of :mod:`service.triton_repo`), which the service then uses as backend;
4. the ranking service: ``mmrank serve`` in a subprocess configured through
   ``MMRANK_*`` environment variables (as in compose), waited for on
   ``/v2/health/ready``.

The inputs live in one directory laid out like the compose file's ``/models`` mount
(:class:`StackInputs`); :func:`build_inputs` makes them (needs the ``train`` extra).

Guarantees: :meth:`LocalStack.stop` stops every process the stack started, by pid,
also when start-up failed half-way; the service gets SIGTERM and :data:`STOP_GRACE_S`
(longer than its drain time) before it is killed. Start-up failures raise
:class:`StackError` with the failing part's log tail.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_DIR = Path("runs/stack")  # also docker-compose.yml's default MMRANK_MODEL_DIR
# Redis memory policy, shared with docker-compose.yml (tests/deploy checks they agree).
# noeviction: a full Redis refuses writes, so the loader fails closed and the live
# version stays whole; an evicting policy would silently drop item records.
REDIS_POLICY = {"maxmemory-policy": "noeviction"}
REDIS_MAXMEMORY = "1gb"  # two versions of a 1M-item catalog at ~160 B per record fit
SERVICE_PORT = 8000  # the port the image's CMD and HEALTHCHECK use
READY_PATH = "/v2/health/ready"
# The service drains queued requests for up to 30 s on SIGTERM
# (service.models.ModelSlot.close); compose's stop_grace_period is longer, and so is this.
STOP_GRACE_S = 45.0


class StackError(RuntimeError):
    """A part of the stack did not start; the message names it and shows its log."""


@dataclass(frozen=True)
class StackInputs:
    """A stack directory: ``repo/`` (model repository), ``embeddings/`` (mmrank embed),
    ``world/`` (users and histories), ``ids.json`` (ids for the load generator)."""

    root: Path

    @property
    def repo(self) -> Path:
        return self.root / "repo"

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings"

    @property
    def world(self) -> Path:
        return self.root / "world"

    @property
    def ids(self) -> Path:
        return self.root / "ids.json"

    def missing(self) -> list[str]:
        """Parts not present (empty when the directory is complete)."""
        need = {
            "repo/manifest.json": self.repo / "manifest.json",
            "embeddings/": self.embeddings,
            "world/users.parquet": self.world / "users.parquet",
            "ids.json": self.ids,
        }
        return [name for name, p in need.items() if not p.exists()]


def write_ids(inputs: StackInputs) -> dict[str, int]:
    """``ids.json`` from the embeddings (items) and the world (users); the counts."""
    import pyarrow.parquet as pq

    from feature_store.embed import load_embeddings

    items = [str(i) for i in load_embeddings(inputs.embeddings).item_ids.tolist()]
    users = [str(u) for u in pq.read_table(inputs.world / "users.parquet",
                                           columns=["user_id"])["user_id"].to_pylist()]  # fmt: skip
    inputs.ids.write_text(json.dumps({"users": users, "items": items}) + "\n")
    return {"users": len(users), "items": len(items)}


def build_inputs(
    root: Path,
    *,
    users: int = 1500,
    items: int = 1500,
    seed: int = 0,
    d_model: int = 64,
    run: Path | None = None,
    threads: int = 2,
) -> StackInputs:
    """Fill ``root``: a synthetic world, a ranker exported from ``run`` (default: a
    CameNN ``candidate-isolated`` of width ``d_model`` with random weights: serving speed
    does not depend on training), the catalog embedded by its item tower, ``ids.json``.
    Imports torch."""
    import torch

    from data.world import ITEM_FIELDS, USER_FIELDS, WorldConfig, write_world
    from feature_store.catalogs import resolve
    from feature_store.embed import embed_catalog, save_embeddings
    from model_export.export import export_run
    from model_export.repository import open_repository

    inputs = StackInputs(Path(root))
    inputs.root.mkdir(parents=True, exist_ok=True)
    if not (inputs.world / "interactions.parquet").is_file():
        write_world(WorldConfig(seed=seed, n_users=users, n_items=items), inputs.world)
    if run is None:
        from models.camenn import CameNN, CameNNConfig
        from training.runs import save_run

        torch.manual_seed(seed)
        cfg = CameNNConfig(user_buckets=[f.buckets for f in USER_FIELDS],
                           item_buckets=[f.buckets for f in ITEM_FIELDS], d_model=d_model,
                           attention="candidate-isolated")  # fmt: skip
        run = inputs.root / "run"
        save_run(run, "camenn", CameNN(cfg).eval(), cfg, {"data": "stack-world"})
    export_run(Path(run), inputs.repo, force=True)
    _, cat, _ = resolve(f"world:{inputs.world}")
    e = embed_catalog(open_repository(inputs.repo), cat, threads=threads)
    save_embeddings(inputs.embeddings, e)
    counts = write_ids(inputs)
    log.info(
        "stack inputs in %s: %d users, %d items", inputs.root, counts["users"], counts["items"]
    )
    return inputs


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def service_env(redis_url: str, triton_url: str | None = None) -> dict[str, str]:
    """The ``MMRANK_*`` variables the stack gives the service (compose sets the same)."""
    env = {"MMRANK_STORE__KIND": "redis", "MMRANK_STORE__URL": redis_url,
           "MMRANK_BACKEND__KIND": "onnxruntime"}  # fmt: skip
    if triton_url:
        env |= {"MMRANK_BACKEND__KIND": "triton", "MMRANK_BACKEND__TRITON_URL": triton_url}
    return env


def wait_ready(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Return once ``url`` + ``/v2/health/ready`` answers 200; StackError on timeout or
    when ``proc`` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"the service exited ({proc.returncode}) before it was ready")
        try:
            with urllib.request.urlopen(url + READY_PATH, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise StackError(f"{url}{READY_PATH} was not ready within {timeout_s:.0f}s")


class LocalStack:
    """redis-server + loader + (Triton) + service, started by :meth:`start`."""

    def __init__(
        self,
        inputs: StackInputs,
        *,
        host: str = "127.0.0.1",
        port: int = SERVICE_PORT,
        triton: bool = False,
        server_cpus: str | None = None,
        env: dict[str, str] | None = None,
        ready_timeout_s: float = 120.0,
        workdir: Path | None = None,
    ) -> None:
        missing = inputs.missing()
        if missing:
            raise FileNotFoundError(
                f"{inputs.root} lacks {', '.join(missing)}; build it with "
                f"`mmrank stack --build` (or `mmrank stack build --out {inputs.root}`)"
            )
        if server_cpus and shutil.which("taskset") is None:
            raise ValueError("--server-cpus needs taskset, which is not on the PATH")
        self.inputs, self.host, self.port = inputs, host, port
        self.triton_enabled, self.server_cpus = triton, server_cpus
        self.extra_env = env or {}
        self.ready_timeout_s = ready_timeout_s
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="mmrank-stack-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.redis: Any = None
        self.triton: Any = None
        self.service: subprocess.Popen[bytes] | None = None
        self._triton_work: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _python(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "mmrank.cli", *args]

    def _load(self, redis_url: str) -> None:
        cmd = self._python("load", "--repo", str(self.inputs.repo), "--embeddings",
                           str(self.inputs.embeddings), "--data", f"world:{self.inputs.world}",
                           "--redis", redis_url, "--quiet")  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        (self.dir / "loader.log").write_text(res.stdout + res.stderr)
        if res.returncode != 0:
            raise StackError(
                f"the loader exited {res.returncode}:\n{_tail(self.dir / 'loader.log')}"
            )
        log.info("loader: %s", res.stdout.strip())

    def _start_triton(self) -> str:
        from service.triton_local import LocalTriton, TritonSetupError, ensure_triton
        from service.triton_repo import build_triton_repository

        try:
            install = ensure_triton()
            self._triton_work = Path(tempfile.mkdtemp(prefix="mmrank-stack-triton-"))
            build_triton_repository(self.inputs.repo, self._triton_work / "models")
            self.triton = LocalTriton(self._triton_work / "models", install=install)
        except (TritonSetupError, OSError) as exc:
            raise StackError(f"Triton did not start: {exc}") from exc
        return str(self.triton.grpc_url)

    def start(self) -> LocalStack:
        """Start every part in order; on any failure stop what was started and raise."""
        from feature_store.local_redis import LocalRedis

        with socket.socket() as probe:  # else another server on the port would look ready
            try:
                probe.bind((self.host, self.port))
            except OSError as exc:
                raise StackError(f"cannot serve on {self.host}:{self.port}: {exc}") from exc
        try:
            policy = [a for k, v in REDIS_POLICY.items() for a in (f"--{k}", v)]
            self.redis = LocalRedis(["--maxmemory", REDIS_MAXMEMORY, *policy])
            log.info("redis-server on %s (%s)", self.redis.url, REDIS_POLICY)
            self._load(self.redis.url)
            triton_url = self._start_triton() if self.triton_enabled else None
            env = os.environ | service_env(self.redis.url, triton_url) | self.extra_env
            cmd = self._python("serve", "--repo", str(self.inputs.repo), "--host", self.host,
                               "--port", str(self.port), "--log-level", "warning")  # fmt: skip
            if self.server_cpus:
                cmd = ["taskset", "-c", self.server_cpus, *cmd]
            with open(self.dir / "service.log", "wb") as out:
                self.service = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
            try:
                wait_ready(self.url, self.ready_timeout_s, self.service)
            except StackError as exc:
                raise StackError(f"{exc}; service log:\n{_tail(self.dir / 'service.log')}") from exc
            self._write_state(triton_url)
        except BaseException:
            self.stop()
            raise
        log.info("service ready on %s", self.url)
        return self

    def _write_state(self, triton_url: str | None) -> None:
        state = {"url": self.url, "redis": self.redis.url, "triton": triton_url,
                 "ids": str(self.inputs.ids.resolve()), "service_pid": self.service.pid if self.service else None,
                 "logs": str(self.dir)}  # fmt: skip
        (self.dir / "stack.json").write_text(json.dumps(state, indent=2) + "\n")

    def stop(self) -> None:
        """Stop the service (SIGTERM, then SIGKILL after STOP_GRACE_S), Triton, Redis."""
        if self.service is not None and self.service.poll() is None:
            self.service.terminate()
            try:
                self.service.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.warning("the service did not stop within %.0fs; killing it", STOP_GRACE_S)
                self.service.kill()
                self.service.wait()
        if self.triton is not None:
            self.triton.stop()
            self.triton = None
        if self._triton_work is not None:
            shutil.rmtree(self._triton_work, ignore_errors=True)
            self._triton_work = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.stop()
