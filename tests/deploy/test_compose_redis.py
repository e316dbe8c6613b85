"""The compose file's Redis, run for real: its exact command line (ACL users, memory
policy) on a local redis-server, its health check command, the real loader (writes
as ``loader``; refused as ``ranker``) and the real feature-store reader (reads as
``ranker``, cannot write)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from deploy_fixtures import shared_inputs

from deploy.checks import load_compose, sample_env
from deploy.stack import StackInputs
from feature_store.local_redis import free_port
from feature_store.reader import RedisSettings, RedisStore

ROOT = Path(__file__).resolve().parents[2]
ENV = sample_env()

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")


@pytest.fixture(scope="module")
def compose_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """(port, health check shell command) of redis-server started with compose's args."""
    svc = load_compose(ROOT / "docker-compose.yml", ENV)["services"]["redis"]
    cmd = [str(x) for x in svc["command"]]
    assert cmd[0] == "redis-server"
    i = cmd.index("--port")
    port = free_port()
    cmd[i + 1] = str(port)
    d = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([*cmd, "--bind", "127.0.0.1", "--dir", str(d)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    health = test[1].replace("redis-cli ", f"redis-cli -p {port} ", 1)
    try:
        yield port, health
    finally:
        proc.terminate()
        proc.wait(10)


def _healthy(health: str) -> bool:
    return subprocess.run(["sh", "-c", health], capture_output=True, timeout=10).returncode == 0


def test_healthcheck_passes_and_fails_for_real(compose_redis: tuple[int, str]) -> None:
    port, health = compose_redis
    deadline = time.monotonic() + 10
    while not _healthy(health):
        assert time.monotonic() < deadline, "compose's redis health check never passed"
        time.sleep(0.1)
    # the same check against a port nothing listens on fails
    assert not _healthy(health.replace(f"-p {port}", f"-p {free_port()}"))


def test_default_user_is_off(compose_redis: tuple[int, str]) -> None:
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=compose_redis[0], socket_timeout=5).ping()


def _url(user: str, port: int) -> str:
    return f"redis://{user}:{ENV[f'MMRANK_REDIS_{user.upper()}_PASSWORD']}@127.0.0.1:{port}/0"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> StackInputs:
    return shared_inputs(tmp_path_factory)


def _load(inputs: StackInputs, url: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "mmrank.cli", "load", "--repo", str(inputs.repo), "--embeddings",
           str(inputs.embeddings), "--data", f"world:{inputs.world}", "--redis", url, "--quiet"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_loader_writes_ranker_reads_only(
    compose_redis: tuple[int, str], inputs: StackInputs
) -> None:
    port = compose_redis[0]
    refused = _load(inputs, _url("ranker", port))
    assert refused.returncode != 0
    assert "NOPERM" in refused.stderr or "permission" in refused.stderr.lower(), refused.stderr
    assert "Traceback" not in refused.stderr, "a refused write must be a clear error"

    ok = _load(inputs, _url("loader", port))
    assert ok.returncode == 0, ok.stderr
    assert "loaded version" in ok.stdout

    async def read() -> tuple[bool, str, int]:
        store = RedisStore(RedisSettings(url=_url("ranker", port)))
        try:
            m = await store.manifest()
            batch = await store.read_items(["i0", "i1", "no-such-item"])
            return await store.ping(), m.version, len(batch.missing)
        finally:
            await store.close()

    pong, version, missing = asyncio.run(read())
    assert pong and version and missing == 1
    ranker = redis.Redis.from_url(_url("ranker", port), socket_timeout=5)
    with pytest.raises(redis.exceptions.NoPermissionError):
        ranker.set("mmrank:current", "hijacked")
    with pytest.raises(redis.exceptions.NoPermissionError):
        ranker.get("not-mmrank-key")
