"""Real ``redis-server`` processes on free local ports, for tests and benchmarks.

:class:`LocalRedis` is one node; :class:`LocalCluster` is three masters joined with
``redis-cli --cluster create``. Both are context managers that stop exactly the
processes they started (by pid) and remove their working directory.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A free port P < 55000 whose cluster bus port P + 10000 is free too."""
    rng = random.Random()
    for _ in range(200):
        p = rng.randrange(20000, 55000)
        if _is_free(p) and _is_free(p + 10000):
            return p
    raise RuntimeError("no free port pair found")


class LocalRedis:
    """One ``redis-server`` (no persistence) on a free port; ``extra`` are more
    command-line options, e.g. ``["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]``."""

    def __init__(self, extra: list[str] | None = None, workdir: Path | None = None,
                 port: int | None = None) -> None:  # fmt: skip
        """``port``: a given port (e.g. to restart a killed server where clients expect
        it); default a free one."""
        if shutil.which("redis-server") is None:
            raise FileNotFoundError("redis-server is not on the PATH")
        self.port = port or free_port()
        self._own_dir = workdir is None
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="mmrank-redis-"))
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.dir), *(extra or [])]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def _wait(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server on port {self.port} exited ({self.proc.returncode})"
                )
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise TimeoutError(f"redis-server on port {self.port} did not answer in {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalRedis:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.stop()


class LocalCluster:
    """Three cluster-enabled masters, slots assigned by ``redis-cli --cluster create``."""

    def __init__(self, n: int = 3) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mmrank-cluster-"))
        self.nodes: list[LocalRedis] = []
        try:
            for i in range(n):
                d = self.dir / f"n{i}"
                d.mkdir()
                self.nodes.append(LocalRedis(["--cluster-enabled", "yes",
                                              "--cluster-config-file", "nodes.conf"], d))  # fmt: skip
            addrs = [f"127.0.0.1:{x.port}" for x in self.nodes]
            subprocess.run(
                ["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "0",
                 "--cluster-yes"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60,
            )  # fmt: skip
            self._wait_ok()
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def _wait_ok(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            infos = [x.client().cluster("info") for x in self.nodes]
            if all(
                i.get("cluster_state") == "ok" if isinstance(i, dict) else b"cluster_state:ok" in i
                for i in infos
            ):
                return
            time.sleep(0.1)
        raise TimeoutError("the cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for x in self.nodes:
            x.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.stop()
