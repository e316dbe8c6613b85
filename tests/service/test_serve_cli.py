"""``mmrank serve`` for real: uvicorn on a free port in a subprocess, asked over HTTP."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from svc_fixtures import World, shared_world

from feature_store.local_redis import free_port
from service.settings import ApiSettings


@pytest.fixture(scope="session")
def w(tmp_path_factory: pytest.TempPathFactory, tiny_world: Path) -> World:
    return shared_world(tmp_path_factory.mktemp("svc"), tiny_world)


@contextmanager
def served(w: World, env: dict[str, str] | None = None,
           procs: list[subprocess.Popen[bytes]] | None = None) -> Iterator[str]:  # fmt: skip
    """``mmrank serve`` on a free port until ready; its URL; terminated on exit (unless
    it has exited already). The process is appended to ``procs`` when given."""
    port = free_port()
    cmd = [sys.executable, "-m", "mmrank.cli", "serve", "--repo", str(w.repo_a), "--embedded",
           str(w.store_file), "--port", str(port), "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **(env or {})},
        stderr=subprocess.PIPE if procs is not None else None,
    )
    if procs is not None:
        procs.append(proc)
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
        yield url
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(10)


def test_mmrank_serve(w: World) -> None:
    with served(w) as url:
        body = {"user_id": w.data.user_ids[0], "candidates": w.data.item_ids[:10], "top_k": 3}
        r = httpx.post(f"{url}/v1/rank", json=body, timeout=10)
        assert r.status_code == 200 and len(r.json()["items"]) == 3
        assert r.json()["model"]["version"] == "test-a"


def test_ctrl_c_stops_serve_cleanly(w: World) -> None:
    """Ctrl-C (SIGINT) on ``mmrank serve`` (and so on the demo): readiness first, then a
    clean exit 0, no traceback."""
    procs: list[subprocess.Popen[bytes]] = []
    with served(w, {"MMRANK_SHUTDOWN__UNREADY_S": "2"}, procs) as url:
        proc = procs[0]
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        assert httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 503
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err, err.decode()[-2000:]


def test_serve_without_a_model_says_why_in_one_line(w: World, tmp_path: Path) -> None:
    """``mmrank serve`` on a repository that is not one, or whose ranker file is
    corrupt: it exits non-zero with the reason in one line, no traceback."""
    broken = tmp_path / "broken"
    shutil.copytree(w.repo_a, broken)
    onnx = broken / "ranker" / "1" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:100])
    for repo, reason in ((tmp_path / "nothing", "is not a model repository"),
                         (broken, "ChecksumError")):  # fmt: skip
        cmd = [sys.executable, "-m", "mmrank.cli", "serve", "--repo", str(repo), "--embedded",
               str(w.store_file), "--port", str(free_port())]  # fmt: skip
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert p.returncode != 0
        line = next(x for x in p.stderr.splitlines() if "mmrank cannot start" in x)
        assert reason in line, p.stderr[-2000:]
        assert "Traceback" not in p.stderr, p.stderr[-2000:]


def _closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(1.0)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except TimeoutError:
        return False


def test_serve_closes_idle_connections_after_keep_alive_s(w: World) -> None:
    """``api.keep_alive_s`` reaches uvicorn: an idle connection is kept (and reused)
    shorter than it and closed by the server after it."""
    with served(w, {"MMRANK_API__KEEP_ALIVE_S": "2"}) as url:
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=5)

        def live() -> None:
            conn.request("GET", "/v2/health/live")
            r = conn.getresponse()
            r.read()
            assert r.status == 200

        try:
            live()
            sock = conn.sock
            assert sock is not None
            time.sleep(0.5)
            assert not _closed_by_server(sock)
            live()
            assert conn.sock is sock  # the same connection, reused
            time.sleep(3.0)
            assert _closed_by_server(sock)
        finally:
            conn.close()
    assert ApiSettings().keep_alive_s > 60  # the default outlasts a 60 s balancer idle timeout


def _metric(text: str, name: str) -> float:
    """The value of a metric line ``name`` (with its labels) in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_a_client_that_leaves_is_not_scored(w: World) -> None:
    """A request whose client disconnects while it waits for its batch is dropped before
    inference: counted as client_gone (499), no rows scored for it. The batch waits
    2 s for more rows, so the client (gone after 0.3 s) leaves first."""
    with served(w, {"MMRANK_BATCHING__MAX_DELAY_MS": "2000"}) as url:
        host, port = url.removeprefix("http://").split(":")
        body = (b'{"user_id": "%s", "candidates": ["%s"]}'
                % (w.data.user_ids[0].encode(), w.data.item_ids[0].encode()))  # fmt: skip
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"POST /v1/rank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                         b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
            time.sleep(0.3)
        time.sleep(2.5)  # past the batch's delay
        m = httpx.get(f"{url}/metrics", timeout=5).text
        assert _metric(m, 'mmrank_rejections_total{reason="client_gone"}') == 1
        assert _metric(m, 'mmrank_requests_total{outcome="client_gone"}') == 1
        assert _metric(m, "mmrank_batch_rows_count") == 0  # nothing reached inference
        # the service answers the next client as usual (a deadline past the batch's delay)
        r = httpx.post(f"{url}/v1/rank", json=json.loads(body), timeout=10,
                       headers={ApiSettings().deadline_header: "5000"})  # fmt: skip
        assert r.status_code == 200 and r.json()["items"][0]["item_id"] == w.data.item_ids[0]
