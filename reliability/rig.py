"""The system under test, as real processes: ``redis-server`` -> :class:`DelayProxy`
-> ``mmrank serve`` (uvicorn, its own process), and the faults injected into it.

The service always reaches Redis through the proxy (0 ms delay unless the slow fault
is on), so every fault works on the same rig. Redis has no persistence (as in compose):
after a kill it comes back empty on the same port and the loader writes the version
again (:meth:`Rig.restart_redis`), which is what "Redis returns" means for a kill.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from deploy.stack import REDIS_POLICY, StackError, wait_ready
from feature_store.local_redis import LocalRedis, free_port
from reliability.proxy import DelayProxy

Loader = Callable[[Any], None]  # writes (and flips to) the serving version through a redis client


class ServiceProcess:
    """``mmrank serve`` on a free port; settings through ``MMRANK_*`` variables."""

    def __init__(self, repo: Path, redis_url: str, log_path: Path, env: dict[str, str] | None = None,
                 cpus: str | None = None, log_level: str = "info") -> None:  # fmt: skip
        self.repo, self.redis_url, self.log_path = repo, redis_url, log_path
        self.env, self.cpus, self.log_level = env or {}, cpus, log_level
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout_s: float = 120.0) -> ServiceProcess:
        cmd = [sys.executable, "-m", "mmrank.cli", "serve", "--repo", str(self.repo),
               "--redis", self.redis_url, "--port", str(self.port), "--log-level", self.log_level]  # fmt: skip
        if self.cpus:
            cmd = ["taskset", "-c", self.cpus, *cmd]
        env = os.environ | {"MMRANK_LOG_LEVEL": self.log_level.upper()} | self.env
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_ready(self.url, ready_timeout_s, self.proc)
        except StackError as exc:
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise StackError(f"{exc}\n{tail}") from exc
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def ready_status(self, timeout_s: float = 2.0) -> int:
        """/v2/health/ready's status; 0 when nothing answers (connection refused)."""
        try:
            with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=timeout_s) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (urllib.error.URLError, OSError):
            return 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 45.0) -> int | None:
        """SIGTERM, SIGKILL after ``grace_s``; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Rig:
    """redis-server + loader + delay proxy + service; a context manager that stops
    what it started."""

    def __init__(self, repo: Path, load: Loader, env: dict[str, str] | None = None,
                 server_cpus: str | None = None, workdir: Path | None = None,
                 log_level: str = "info", triton: bool = False) -> None:  # fmt: skip
        """``triton``: the service scores on a local ``tritonserver`` (the Python-backend
        repository of :mod:`service.triton_repo`) instead of in-process ONNX Runtime."""
        self.repo, self.load, self.env = repo, load, dict(env or {})
        self.use_triton = triton
        self.triton: Any = None
        self.server_cpus, self.log_level = server_cpus, log_level
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="mmrank-rel-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.redis: LocalRedis | None = None
        self.proxy: DelayProxy | None = None
        self.service: ServiceProcess | None = None

    def _redis_args(self) -> list[str]:
        return [a for k, v in REDIS_POLICY.items() for a in (f"--{k}", v)]

    def start(self) -> Rig:
        try:
            self.redis = LocalRedis(self._redis_args())
            self._load()
            self.proxy = DelayProxy("127.0.0.1", self.redis.port).start()
            if self.use_triton:
                self._start_triton()
            self.service = ServiceProcess(self.repo, self.proxy.url, self.dir / "service.log",
                                          self.env, self.server_cpus, self.log_level).start()  # fmt: skip
        except BaseException:
            self.stop()
            raise
        return self

    def _start_triton(self) -> None:
        from service.triton_local import LocalTriton, ensure_triton
        from service.triton_repo import build_triton_repository

        models = self.dir / "triton-models"
        build_triton_repository(self.repo, models)
        self.triton = LocalTriton(models, install=ensure_triton(), exit_timeout_s=1)
        self.env |= {"MMRANK_BACKEND__KIND": "triton",
                     "MMRANK_BACKEND__TRITON_URL": self.triton.grpc_url}  # fmt: skip

    def _load(self) -> None:
        assert self.redis is not None
        c = self.redis.client()
        try:
            self.load(c)
        finally:
            c.close()

    def service_log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the service's log (for a failure's message)."""
        return "" if self.service is None else "\n".join(self.service.log().splitlines()[-lines:])

    @property
    def host_port(self) -> tuple[str, int]:
        assert self.service is not None
        return "127.0.0.1", self.service.port

    # -- faults ------------------------------------------------------------------------
    def redis_pid(self) -> int:
        assert self.redis is not None
        return self.redis.proc.pid

    def sigstop(self) -> None:
        os.kill(self.redis_pid(), signal.SIGSTOP)

    def sigcont(self) -> None:
        os.kill(self.redis_pid(), signal.SIGCONT)

    def kill_redis(self) -> None:
        assert self.redis is not None
        self.redis.proc.kill()
        self.redis.proc.wait()

    def restart_redis(self) -> float:
        """A fresh (empty) redis-server on the same port, then the loader; seconds taken."""
        assert self.redis is not None
        t0 = time.monotonic()
        port = self.redis.port
        self.redis.stop()
        self.redis = LocalRedis(self._redis_args(), port=port)
        self._load()
        return time.monotonic() - t0

    def client_pause(self, ms: int) -> None:
        """``CLIENT PAUSE ms ALL``: every client's commands wait ``ms`` (Redis answers
        again by itself afterwards)."""
        assert self.redis is not None
        c = self.redis.client()
        try:
            c.execute_command("CLIENT", "PAUSE", int(ms), "ALL")
        finally:
            c.close()

    def slow(self, delay_ms: float) -> None:
        """Delay every chunk between the service and Redis by ``delay_ms`` each way."""
        assert self.proxy is not None
        self.proxy.delay_ms = delay_ms

    def triton_kill(self) -> None:
        self.triton.kill()

    def triton_start(self) -> None:
        """Start the killed Triton again on its ports; returns once its model is ready."""
        self.triton.start()

    def triton_pause(self) -> None:
        self.triton.pause()

    def triton_resume(self) -> None:
        self.triton.resume()

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
        if self.triton is not None:
            self.triton.stop()
            self.triton = None
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
        if self.redis is not None:
            if self.redis.proc.poll() is None:
                os.kill(self.redis.proc.pid, signal.SIGCONT)  # a stopped server cannot exit
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> Rig:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.stop()
