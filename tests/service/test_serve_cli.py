"""``mmrank serve`` for real: uvicorn on a free port in a subprocess, asked over HTTP."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from svc_fixtures import World, shared_world

from feature_store.local_redis import free_port


@pytest.fixture(scope="session")
def w(tmp_path_factory: pytest.TempPathFactory, tiny_world: Path) -> World:
    return shared_world(tmp_path_factory.mktemp("svc"), tiny_world)


def test_mmrank_serve(w: World) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "mmrank.cli", "serve", "--repo", str(w.repo_a), "--embedded",
           str(w.store_file), "--port", str(port), "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, "mmrank serve exited"
            time.sleep(0.1)
        body = {"user_id": w.data.user_ids[0], "candidates": w.data.item_ids[:10], "top_k": 3}
        r = httpx.post(f"{url}/v1/rank", json=body, timeout=10)
        assert r.status_code == 200 and len(r.json()["items"]) == 3
        assert r.json()["model"]["version"] == "test-a"
    finally:
        proc.terminate()
        proc.wait(10)
